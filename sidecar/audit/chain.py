"""The hash chain that makes the audit log tamper-evident, and its verifier.

Every record carries ``seq`` (1, 2, 3, ... across all files), ``prev`` (the ``hash`` of the
record before it; 64 zeros for seq 1) and ``hash``::

    hash = SHA-256( canonical_json(record without "hash") )          lowercase hex

**Canonical JSON**: keys sorted by code point, no whitespace (``","`` and ``":"``), strings as
UTF-8 without ``\\u`` escapes except for ``"``, ``\\``, and control characters (``\\n``, ``\\t``,
``\\u001f``...), integers in decimal; there are no floats. This is ``json.dumps(record,
sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()`` in Python. A line in the
file is that text with ``,"hash":"<hex>"`` added before the closing brace, then ``\\n``.

An edit to any record changes its hash; re-hashing it breaks the ``prev`` of the next one; so a
forger must rewrite every later record. That is why the running sidecar reports its **head**
(the hash of the last record written): ship it somewhere the host cannot rewrite, and
:func:`verify` with ``head`` then also catches a rewritten or cut-off tail.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, TextIO

GENESIS: Final = "0" * 64
RECORD_VERSION: Final = 1
#: How far :func:`verify` looks past a break to tell a reordering from a deletion.
LOOKAHEAD: Final = 1000

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TORN_FILE = re.compile(r"\.torn-\d{8}T\d{6}Z(?:-\d+)?$")

BreakKind = Literal[
    "edited", "deleted", "reordered", "inserted", "bad_json", "torn", "truncated", "unreadable"
]


class MalformedRecord(ValueError):
    """A line that is not a chained audit record (not JSON, or missing chain fields)."""


_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(record: Mapping[str, object]) -> bytes:
    """The canonical bytes of ``record`` (see the module docstring). Raises ``ValueError`` for a
    float, NaN, or a string that is not valid Unicode.
    """
    if any(type(v) is float for v in _scalars(record)):
        raise ValueError("audit records hold no floats")
    try:
        return _CANONICAL.encode(record).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the record holds a string that is not valid Unicode") from None


def _scalars(value: object) -> Iterator[object]:
    if isinstance(value, Mapping):
        for item in value.values():
            yield from _scalars(item)
    elif isinstance(value, list):
        for item in value:
            yield from _scalars(item)
    else:
        yield value


def record_hash(record: Mapping[str, object]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``record`` without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def seal(
    fields: Mapping[str, object],
    *,
    seq: int,
    prev: str,
    canonical: tuple[str, str, str] | None = None,
) -> tuple[bytes, str]:
    """The file line (ending in ``\n``) of ``fields`` chained at ``seq`` after ``prev``, and its
    hash. ``fields`` must not hold ``v``, ``seq``, ``prev`` or ``hash``. ``canonical`` is the
    pre-rendered form of a request record (:attr:`AuditRecord.canonical`), used instead of
    encoding ``fields`` again.
    """
    if canonical is not None:
        before_prev, before_seq, after_seq = canonical
        text = f'{before_prev}"prev":"{prev}",{before_seq}"seq":{seq},{after_seq},"v":1}}'
        encoded = text.encode("utf-8")
    else:
        body = dict(fields)
        body["v"] = RECORD_VERSION
        body["seq"] = seq
        body["prev"] = prev
        encoded = _CANONICAL.encode(body).encode("utf-8")  # log's own records: plain values
    digest = hashlib.sha256(encoded).hexdigest()
    return b"".join((encoded[:-1], b',"hash":"', digest.encode(), b'"}\n')), digest


@dataclass(frozen=True, slots=True)
class ChainedRecord:
    """A parsed line: its fields (with the chain fields), and whether its hash matches."""

    fields: Mapping[str, object]
    seq: int
    prev: str
    hash: str
    hash_ok: bool

    @property
    def event(self) -> object:
        return self.fields.get("event")


def parse_record(line: bytes) -> ChainedRecord:
    """Parse one line (with or without its ``\\n``). Raises :class:`MalformedRecord`."""
    try:
        fields = json.loads(line)
    except (ValueError, RecursionError):
        raise MalformedRecord("not valid JSON") from None
    if not isinstance(fields, dict):
        raise MalformedRecord("not a JSON object")
    if fields.get("v") != RECORD_VERSION or isinstance(fields.get("v"), bool):
        raise MalformedRecord(f"unknown record version {fields.get('v')!r}")
    seq, prev, digest = fields.get("seq"), fields.get("prev"), fields.get("hash")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise MalformedRecord("no valid seq")
    if not isinstance(prev, str) or not _HEX64.fullmatch(prev):
        raise MalformedRecord("no valid prev hash")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise MalformedRecord("no valid hash")
    try:
        hash_ok = record_hash(fields) == digest
    except ValueError:
        hash_ok = False
    return ChainedRecord(fields, seq, prev, digest, hash_ok)


# -- verification --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Break:
    """The first place the chain does not hold. ``line`` is 1-based; ``seq`` is ``None`` when the
    line could not be read as a record.
    """

    kind: BreakKind
    file: str
    line: int | None
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file} line {self.line}"
        if self.seq is not None:
            where += f" (seq {self.seq})"
        return f"{where}: {self.kind}: {self.message}"


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """What :func:`verify` found. ``problem`` is ``None`` when the chain holds.

    ``files`` are in the order checked (by their first record's seq). ``head_seq`` is the seq of
    the record whose hash is the ``head`` given, if found. ``notes`` are facts worth telling that
    are not breaks (recovered torn records, a chain that starts after seq 1, skipped files).
    """

    problem: Break | None
    records: int
    first_seq: int | None
    last_seq: int | None
    last_hash: str | None
    files: tuple[str, ...]
    head_seq: int | None = None
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(slots=True)
class _Entry:
    file: str
    line: int
    complete: bool
    record: ChainedRecord | None
    error: str | None


def _read_entries(paths: Sequence[str]) -> Iterator[_Entry]:
    for path in paths:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, 1):  # binary lines split on b"\n" only
                complete = raw.endswith(b"\n")
                try:
                    record = parse_record(raw)
                except MalformedRecord as exc:
                    yield _Entry(path, number, complete, None, str(exc))
                else:
                    yield _Entry(path, number, complete, record, None)


class _Lookahead:
    def __init__(self, entries: Iterator[_Entry]) -> None:
        self._entries = entries
        self._buffer: deque[_Entry] = deque()

    def __iter__(self) -> _Lookahead:
        return self

    def __next__(self) -> _Entry:
        if self._buffer:
            return self._buffer.popleft()
        return next(self._entries)

    def peek(self, count: int) -> list[_Entry]:
        while len(self._buffer) < count:
            try:
                self._buffer.append(next(self._entries))
            except StopIteration:
                break
        return list(self._buffer)[:count]


def _first_seq(path: str) -> int | None:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if number > LOOKAHEAD:
                return None
            try:
                return parse_record(raw).seq - (number - 1)
            except MalformedRecord:
                continue
    return None


def _order(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """The record files in chain order, and notes on files left out. Raises ``OSError``."""
    seen: set[str] = set()
    keyed: list[tuple[float, int, str]] = []
    notes: list[str] = []
    for index, path in enumerate(paths):
        real = os.path.realpath(path)
        if real in seen:
            notes.append(f"{path}: given twice; checked once")
            continue
        seen.add(real)
        if _TORN_FILE.search(path):
            notes.append(f"{path}: skipped: bytes set aside from a torn record, not records")
            continue
        first = _first_seq(path)
        keyed.append((float("inf") if first is None else first, index, path))
    keyed.sort()
    return [path for _, _, path in keyed], notes


def verify(paths: Sequence[str], head: str | None = None) -> VerifyResult:
    """Check the chain through ``paths``: the live file and any rotated ones, in any order.

    Stops at the first break and names it (file, line, seq, and why: edited, deleted, reordered,
    inserted, bad_json, torn). With ``head`` (the hash the running sidecar reports as its last
    record), a log that does not contain that record was cut short: ``truncated``. Records after
    the head are fine (written after it was read). Unreadable files give ``unreadable``.
    """
    if head is not None:
        head = head.strip().lower()
    try:
        ordered, notes = _order(paths)
        return _verify_ordered(ordered, head, notes)
    except OSError as exc:
        name = exc.filename if isinstance(exc.filename, str) else "?"
        problem = Break("unreadable", name, None, None, exc.strerror or str(exc))
        return VerifyResult(problem, 0, None, None, None, tuple(paths))


def _verify_ordered(paths: list[str], head: str | None, notes: list[str]) -> VerifyResult:
    entries = _Lookahead(_read_entries(paths))
    last: _Entry | None = None
    last_record: ChainedRecord | None = None
    first_seq: int | None = None
    head_seq: int | None = None
    count = 0
    problem: Break | None = None

    for entry in entries:
        problem = _check(entry, last, entries)
        if problem is not None:
            break
        record = entry.record
        assert record is not None
        if last_record is None:
            first_seq = record.seq
            if record.event == "file_replaced":
                problem = Break(
                    "deleted",
                    entry.file,
                    entry.line,
                    record.seq,
                    f"the live audit file was {record.fields.get('how')} while the sidecar ran; "
                    f"the records up to seq {record.fields.get('previous_last_seq')} it held "
                    "are not in the files given",
                )
                break
            if record.seq > 1:
                notes.append(
                    f"the chain starts at seq {record.seq} ({entry.file} line {entry.line}): "
                    "the records before it are in files not given, or were removed"
                )
        if record.event == "file_replaced" and last_record is not None:
            notes.append(
                f"{entry.file} line {entry.line} (seq {record.seq}): the live audit file was "
                f"{record.fields.get('how')} while the sidecar ran; its records are among the "
                "files given"
            )
        if record.event == "recovered":
            notes.append(
                f"{entry.file} line {entry.line} (seq {record.seq}): a torn record of "
                f"{record.fields.get('torn_bytes')} bytes was set aside at start "
                f"(sha256 {record.fields.get('torn_sha256')}, in {record.fields.get('torn_file')})"
            )
        if head is not None and record.hash == head:
            head_seq = record.seq
        count += 1
        last, last_record = entry, record

    if problem is None and head is not None and head_seq is None:
        if last is None or last_record is None:
            problem = Break(
                "truncated",
                paths[-1] if paths else "-",
                None,
                None,
                "the files hold no records, but the sidecar reports a head",
            )
        else:
            problem = Break(
                "truncated",
                last.file,
                last.line,
                last_record.seq,
                f"the head {head} is not in these files: records after seq {last_record.seq} "
                "were cut off, or the head belongs to another log",
            )
    if head_seq is not None and last_record is not None and last_record.seq > head_seq:
        notes.append(f"{last_record.seq - head_seq} records follow the head (seq {head_seq})")
    return VerifyResult(
        problem=problem,
        records=count,
        first_seq=first_seq,
        last_seq=last_record.seq if last_record else None,
        last_hash=last_record.hash if last_record else None,
        files=tuple(paths),
        head_seq=head_seq,
        notes=tuple(notes),
    )


def _check(entry: _Entry, last: _Entry | None, ahead: _Lookahead) -> Break | None:
    """Why ``entry`` does not continue the chain after ``last`` (``None`` if it does)."""

    def at(where: _Entry, kind: BreakKind, message: str) -> Break:
        seq = where.record.seq if where.record else None
        return Break(kind, where.file, where.line, seq, message)

    if not entry.complete:
        return at(
            entry,
            "torn",
            "the last line is incomplete (a crash while writing, or a line "
            "still being written); the sidecar sets it aside when it starts",
        )
    record = entry.record
    if record is None:
        return at(entry, "bad_json", f"the line is not an audit record: {entry.error}")
    prior = last.record if last else None

    def links(candidate: _Entry, seq: int, prev: str) -> bool:
        r = candidate.record
        return r is not None and r.hash_ok and r.seq == seq and r.prev == prev

    nxt = ahead.peek(1)
    if not record.hash_ok:
        if prior is not None and nxt and links(nxt[0], prior.seq + 1, prior.hash):
            return at(
                entry,
                "inserted",
                "this record is not part of the chain: the next record follows the one before it",
            )
        return at(entry, "edited", "the record's content does not match its hash")
    if prior is None or last is None:
        if record.seq == 1 and record.prev != GENESIS:
            return at(
                entry, "edited", "the first record (seq 1) must follow the all-zero genesis hash"
            )
        return None
    expected = prior.seq + 1
    if record.seq == expected and record.prev == prior.hash:
        return None
    if record.seq == expected:
        if nxt and links(nxt[0], expected, prior.hash):
            return at(
                entry,
                "inserted",
                "this record does not follow the one before it, but the next one does",
            )
        return at(
            last,
            "edited",
            "the record was changed and re-hashed: the next record points to a different hash",
        )
    if record.seq > expected:
        for later in ahead.peek(LOOKAHEAD):
            if links(later, expected, prior.hash):
                return at(
                    entry,
                    "reordered",
                    f"seq {record.seq} comes before seq {expected} "
                    f"({later.file} line {later.line})",
                )
        missing = (
            f"seq {expected}"
            if record.seq == expected + 1
            else f"seq {expected} to {record.seq - 1}"
        )
        return at(entry, "deleted", f"records are missing before this one: {missing}")
    if record.hash == prior.hash:
        return at(entry, "inserted", "a copy of the record before it")
    if record.seq == prior.seq and record.prev == prior.prev:
        if nxt and links(nxt[0], record.seq + 1, record.hash):
            return at(
                last,
                "inserted",
                "this record is not part of the chain: the record "
                "after it takes the same place and is followed",
            )
        return at(entry, "inserted", f"a second record claims seq {record.seq}")
    return at(entry, "inserted", f"seq {record.seq} appears again after seq {prior.seq}")


def verify_command(
    paths: Sequence[str], head: str | None = None, *, out: TextIO | None = None
) -> int:
    """``kms-sidecar audit verify FILE... [--head HASH]``: print the result, return the exit code.

    0 the chain holds (and contains ``head``, if given); 1 it is broken; 2 a file could not be
    read or ``head`` is not a 64-digit hex hash.
    """
    out = out or sys.stdout
    if head is not None and not _HEX64.fullmatch(head.strip().lower()):
        print(f"error: --head must be the 64 hex digits of a record hash, got {head!r}", file=out)
        return 2
    result = verify(paths, head)
    problem = result.problem
    if problem is not None and problem.kind == "unreadable":
        print(f"error: cannot read {problem.file}: {problem.message}", file=out)
        return 2
    if problem is None:
        span = f"seq {result.first_seq} to {result.last_seq}" if result.records else "no records"
        print(f"OK: {result.records} records ({span}) in {len(result.files)} file(s)", file=out)
        if result.last_hash:
            print(f"  last hash {result.last_hash}", file=out)
        if result.head_seq is not None:
            print(f"  head found at seq {result.head_seq}", file=out)
    else:
        print(f"BROKEN: {problem}", file=out)
        print(f"  {result.records} records before it hold", file=out)
    for note in result.notes:
        print(f"  note: {note}", file=out)
    return 0 if problem is None else 1
