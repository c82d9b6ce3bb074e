"""The audit log writer: records chained, group-committed and fsync'd off the event loop.

Lifecycle: ``log = AuditLog.from_config(config)`` → ``await log.open()`` → ``await
log.write(record)`` per request → ``await log.close()``.

One writer task takes every record queued since its last commit and hands them as one group to a
dedicated thread, which chains them, appends them with a single ``write`` and makes them durable
with one ``fdatasync``; records queued while that runs form the next group. So the number of
fsyncs per second stays at about 1 / (fsync time) however many requests arrive, and the loop never
blocks on the disk.

Durability modes (``audit.fail_closed``):

* ``True``: ``write`` returns only when its record is on disk; if it cannot be written, ``write``
  raises :class:`~sidecar.errors.AuditUnavailable` and the request must be refused.
* ``False``: ``write`` returns at once; a record that cannot be written is counted in
  ``stats().records_dropped`` and in the ``resumed`` record written when the log recovers.

When writing fails (ENOSPC, EIO, the file or its directory removed or replaced), ``healthy``
turns false and ``last_error`` says why; every later group, and a probe every
``retry_interval`` seconds while idle, opens the file again, so the log recovers by itself when
the disk is fixed and then writes a ``resumed`` record.

The file is created with mode 0600 (its directory 0700), locked with ``flock`` against a second
writer, and rotated when it would exceed ``max_file_bytes``: ``audit.log`` is renamed
``audit.log.<UTC time>`` (``-2``, ``-3``... on a clash) and the chain continues in a new
``audit.log``. Rotated files are never deleted: retention is the operator's decision.

At start the tail of the file is read to continue the chain. Bytes after the last complete, valid
record (a record torn by a crash) are copied to ``<path>.torn-<UTC time>`` and cut off, and a
``recovered`` record carrying their length and SHA-256 continues the chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from sidecar import __version__
from sidecar.audit.chain import GENESIS, MalformedRecord, parse_record, seal
from sidecar.audit.record import (
    AuditRecord,
    ephemeral_hmac_key,
    format_time,
    hmac_key_id,
    load_hmac_key,
)
from sidecar.config import Config
from sidecar.errors import AuditUnavailable, ConfigError

log = logging.getLogger(__name__)

#: Bytes handed to one ``write`` call; a larger group is written in several, then fsync'd once.
WRITE_CHUNK: Final = 1 << 20
#: The most bytes after the last valid record that start-up sets aside as a torn record. More
#: means the file is not a crash-torn audit log, and start-up stops.
MAX_TORN_BYTES: Final = 16 << 20
#: Records a fail-open log queues before it drops new ones.
MAX_QUEUE: Final = 100_000

_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
#: Where the OS has it, every write is durable when it returns (one syscall, one GIL release per
#: group instead of write + fdatasync). Elsewhere the group ends with an explicit fdatasync.
_O_DSYNC: Final[int] = getattr(os, "O_DSYNC", 0)
_APPEND_FLAGS: Final = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | _O_DSYNC

Fields = Mapping[str, object]
Waiter = asyncio.Future[None]


class _NotAnAuditLog(Exception):
    """The file at the audit path does not end like an audit log (or another process holds it)."""


class _CommitFailed(Exception):
    """A group commit failed after ``durable`` of its records were made durable."""

    def __init__(self, reason: str, durable: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.durable = durable


@dataclass(frozen=True, slots=True)
class AuditStats:
    """Counters for metrics. Latency is of the last group commit (write + fdatasync), in ms."""

    records_written: int
    records_dropped: int
    write_failures: int
    queue_depth: int
    groups: int
    mean_group_size: float
    max_group_size: int
    last_group_size: int
    last_write_latency_ms: float
    healthy: bool
    head_seq: int


@dataclass(frozen=True, slots=True)
class _Committed:
    seq: int
    head: str
    written: int


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        return f"{name}: {exc.strerror or os.strerror(exc.errno)}"
    return str(exc) or type(exc).__name__


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _stamp(unix_seconds: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(unix_seconds))


class _FileSink:
    """The file side of the log. Every method runs in the log's one executor thread."""

    def __init__(self, path: str, max_file_bytes: int, clock: Callable[[], float]) -> None:
        self.path = os.path.abspath(path)
        self.directory = os.path.dirname(self.path)
        self.max_file_bytes = max_file_bytes
        self.clock = clock
        self.fd: int | None = None
        self.ident: tuple[int, int] | None = None
        self.size = 0  # bytes of the current file known durable
        self.unsynced = 0  # bytes written after those, not yet known durable
        #: The chain position: ``None`` until the first open has read it from the files.
        self.seq: int | None = None
        self.head = GENESIS
        #: Why writing stopped, until a ``resumed`` record has said so.
        self.resume_reason: str | None = None
        self.failed_since: float | None = None
        #: The log's own records (``recovered``) waiting to be written ahead of the next group.
        self.carry: list[AuditRecord] = []

    # -- opening -------------------------------------------------------------------------------

    def open_at_start(self) -> None:
        """Open the file, read the chain position, set aside a torn tail. Raises ``OSError``
        for a path that cannot be written and :class:`_NotAnAuditLog` for a foreign file.
        """
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, _APPEND_FLAGS, 0o600)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _NotAnAuditLog(f"{self.path} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _NotAnAuditLog(
                    f"another process (a second sidecar?) is writing {self.path}"
                ) from None
            if info.st_size == 0:
                _fsync_dir(self.directory)  # the new file's name must survive a crash too
            elif info.st_mode & 0o022:
                log.warning("audit log %s is writable by group or others", self.path)
            self.carry.extend(self._continue_chain(fd, info.st_size))
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.ident = fd, (info.st_dev, info.st_ino)
        self.size, self.unsynced = os.fstat(fd).st_size, 0

    def _continue_chain(self, fd: int, size: int) -> list[AuditRecord]:
        extra: list[AuditRecord] = []
        valid_end, last = _scan_tail(fd, size)
        if valid_end < size:
            extra.append(self._set_aside(fd, valid_end, size))
        if self.seq is None:  # first open: the files say where the chain is
            if last is None:
                last = self._latest_rotated()
            self.seq, self.head = last if last is not None else (0, GENESIS)
        elif last is None:
            if size > 0 or self.seq > 0:
                self._note_reason(
                    "the audit file was removed or replaced; continuing the chain in a new file"
                )
        elif last[1] != self.head:
            if last[0] > self.seq:
                log.warning(
                    "audit log %s holds records up to seq %d written by a failed "
                    "commit; continuing after them",
                    self.path,
                    last[0],
                )
                self.seq, self.head = last
            else:
                log.error(
                    "audit log %s does not end with the last record written (seq %d); "
                    "`audit verify` will show the gap",
                    self.path,
                    self.seq,
                )
                self._note_reason(
                    f"the audit file does not end with seq {self.seq}, the last record written"
                )
        return extra

    def _note_reason(self, reason: str) -> None:
        if self.resume_reason is None:
            self.resume_reason = reason
            self.failed_since = self.clock()

    def _set_aside(self, fd: int, valid_end: int, size: int) -> AuditRecord:
        torn = os.pread(fd, size - valid_end, valid_end)
        now = self.clock()
        target = _free_name(f"{self.path}.torn-{_stamp(now)}")
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(out, torn)
            os.fsync(out)
        finally:
            os.close(out)
        _fsync_dir(self.directory)
        os.ftruncate(fd, valid_end)
        os.fsync(fd)
        log.warning(
            "audit log %s ended with %d bytes of a torn record; moved them to %s",
            self.path,
            len(torn),
            target,
        )
        return AuditRecord(
            {
                "event": "recovered",
                "time": format_time(now),
                "torn_bytes": len(torn),
                "torn_sha256": hashlib.sha256(torn).hexdigest(),
                "torn_file": os.path.basename(target),
            }
        )

    def _latest_rotated(self) -> tuple[int, str] | None:
        """The chain position at the end of the newest rotated file: the live file may be
        missing after a crash between rotation's rename and create.
        """
        pattern = re.compile(re.escape(os.path.basename(self.path)) + r"\.\d{8}T\d{6}Z(-\d+)?$")
        best: tuple[int, str] | None = None
        for name in os.listdir(self.directory):
            if not pattern.fullmatch(name):
                continue
            try:
                fd = os.open(os.path.join(self.directory, name), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _, last = _scan_tail(fd, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
            except (OSError, _NotAnAuditLog) as exc:
                log.warning("cannot read rotated audit log %s: %s", name, exc)
                continue
            if last is not None and (best is None or last[0] > best[0]):
                best = last
        return best

    def _still_ours(self) -> bool:
        try:
            info = os.stat(self.path)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self.ident

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- writing -------------------------------------------------------------------------------

    def commit(self, batch: list[AuditRecord], dropped: int) -> _Committed:
        """Chain ``batch`` after the head, append it and make it durable. Raises
        :class:`_CommitFailed` saying how many leading records of ``batch`` were made durable.
        ``dropped`` is told in the ``resumed`` record, if one is due.
        """
        try:
            if self.fd is not None and not self._still_ours():
                self.close()
                self._note_reason("the audit file was moved, replaced or removed")
            if self.fd is None:
                if self.seq is None:  # never opened: as at start, make the directory too
                    self.open_at_start()
                else:
                    self._open()
        except (OSError, _NotAnAuditLog) as exc:
            self.close()
            self._note_reason(_reason(exc))
            raise _CommitFailed(_reason(exc), 0) from exc
        extra = list(self.carry)
        if self.resume_reason is not None:
            extra.append(
                AuditRecord(
                    {
                        "event": "resumed",
                        "time": format_time(self.clock()),
                        "reason": self.resume_reason,
                        "since": format_time(self.failed_since or self.clock()),
                        "dropped": dropped,
                    }
                )
            )
        records = extra + batch
        assert self.seq is not None
        seq, head, size = self.seq, self.head, self.size
        durable = 0  # leading records of ``records`` known to be on disk
        chunk: list[bytes] = []
        chunk_bytes = 0
        try:
            for index, record in enumerate(records):
                line, digest = seal(
                    record.fields, seq=seq + 1, prev=head, canonical=record.canonical
                )
                if (
                    self.max_file_bytes
                    and size + chunk_bytes + len(line) > self.max_file_bytes
                    and size + chunk_bytes > 0
                ):
                    self._flush(chunk, sync=True)
                    durable, self.seq, self.head = index, seq, head
                    self._rotate()
                    size, chunk, chunk_bytes = 0, [], 0
                chunk.append(line)
                chunk_bytes += len(line)
                seq, head = seq + 1, digest
                if chunk_bytes >= WRITE_CHUNK:
                    self._flush(chunk, sync=False)
                    size, chunk, chunk_bytes = size + chunk_bytes, [], 0
            self._flush(chunk, sync=True)
        except Exception as exc:
            self._abandon()
            self._settle_extra(extra, durable)
            reason = _reason(exc) if isinstance(exc, OSError) else "internal error"
            if not isinstance(exc, OSError):
                log.error("audit commit failed", exc_info=exc)
            self._note_reason(reason)
            raise _CommitFailed(reason, max(0, durable - len(extra))) from exc
        self.seq, self.head = seq, head
        self._settle_extra(extra, len(extra))
        return _Committed(seq, head, len(batch))

    def _settle_extra(self, extra: list[AuditRecord], durable: int) -> None:
        """Forget the log's own records that reached the disk."""
        written = min(durable, len(extra))
        carried = min(written, len(self.carry))
        del self.carry[:carried]
        if written > carried:  # the ``resumed`` record is on disk
            self.resume_reason = self.failed_since = None

    def _flush(self, chunk: list[bytes], *, sync: bool) -> None:
        assert self.fd is not None
        if chunk:
            data = b"".join(chunk)
            _write_all(self.fd, data)
            self.unsynced += len(data)
        if sync:
            if not _O_DSYNC and self.unsynced:
                _fdatasync(self.fd)
            self.size, self.unsynced = self.size + self.unsynced, 0

    def _abandon(self) -> None:
        """After a failed write: cut the file back to its durable end, then close it; the next
        commit opens it again and sets aside anything the cut could not remove.
        """
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
        self.close()

    def _rotate(self) -> None:
        assert self.fd is not None
        target = _free_name(f"{self.path}.{_stamp(self.clock())}")
        os.rename(self.path, target)
        self.close()
        fd = os.open(self.path, _APPEND_FLAGS | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _fsync_dir(self.directory)
            info = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.ident, self.size, self.unsynced = fd, (info.st_dev, info.st_ino), 0, 0
        log.info("audit log rotated: %s", target)


def _free_name(name: str) -> str:
    candidate, n = name, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _scan_tail(fd: int, size: int) -> tuple[int, tuple[int, str] | None]:
    """The end offset of the last complete record with a valid hash, and its ``(seq, hash)``.

    ``(0, None)`` when there is none. Raises :class:`_NotAnAuditLog` when more than
    :data:`MAX_TORN_BYTES` follow it, or when a file with no record does not look like the torn
    start of one (so a mistyped path never gets truncated).
    """
    if size == 0:
        return 0, None
    window = 1 << 16
    while True:
        start = max(0, size - window)
        data = os.pread(fd, size - start, start)
        pos = data.rfind(b"\n")
        while pos != -1:
            line_start = data.rfind(b"\n", 0, pos) + 1
            if line_start == 0 and start > 0:
                break  # the line may begin before the window
            try:
                record = parse_record(data[line_start : pos + 1])
            except MalformedRecord:
                record = None
            if record is not None and record.hash_ok:
                if size - (start + pos + 1) > MAX_TORN_BYTES:
                    raise _NotAnAuditLog("too much data follows the last valid audit record")
                return start + pos + 1, (record.seq, record.hash)
            pos = line_start - 1
        if start == 0:
            # With no valid record, only the torn first write of a new log is set aside: one
            # partial line (the first group holds just the ``start`` record), or zeros.
            content = data.strip(b"\0")
            if not content or (content.startswith(b"{") and b"\n" not in content):
                return 0, None
            raise _NotAnAuditLog("it holds no valid audit record")
        if window >= MAX_TORN_BYTES:
            raise _NotAnAuditLog("too much data follows the last valid audit record")
        window *= 4


class AuditLog:
    """The tamper-evident audit log of one sidecar. See the module docstring.

    ``hmac_key`` hashes context values and subjects (:func:`~sidecar.audit.audit_record` takes
    it from here); ``None`` makes a random key for this process and logs a warning.
    ``max_file_bytes`` of 0 never rotates. ``clock`` (Unix seconds) stamps the log's own records
    and file names.
    """

    def __init__(
        self,
        path: str,
        *,
        hmac_key: bytes | None = None,
        hmac_key_env: str = "KMS_AUDIT_HMAC_KEY",
        fail_closed: bool = True,
        max_file_bytes: int = 100 * 1_048_576,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_file_bytes < 0:
            raise ConfigError("audit.max_file_bytes: must be positive, or 0 to never rotate")
        self.path = os.path.abspath(path)
        self.fail_closed = fail_closed
        self.hmac_key_ephemeral = hmac_key is None
        self.hmac_key: bytes = ephemeral_hmac_key(hmac_key_env) if hmac_key is None else hmac_key
        self._clock = clock
        self._retry_interval = retry_interval
        self._sink = _FileSink(self.path, max_file_bytes, clock)
        self._state = "new"  # new → open → closing → closed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._pending: list[tuple[AuditRecord, Waiter | None]] = []
        self._healthy = False
        self._last_error: str | None = None
        self._seq = 0
        self._head: str | None = None
        self._written = 0
        self._dropped = 0
        self._dropped_since_ok = 0
        self._failures = 0
        self._groups = 0
        self._group_records = 0
        self._max_group = 0
        self._last_group = 0
        self._last_latency_ms = 0.0

    @classmethod
    def from_config(
        cls, config: Config, *, environ: Mapping[str, str] | None = None
    ) -> AuditLog | None:
        """The log ``config.audit`` describes, not yet opened; ``None`` when ``audit.path`` is
        empty (audit disabled, with a warning). Raises ``ConfigError`` for a bad HMAC key.
        """
        audit = config.audit
        if not audit.path:
            log.warning("audit.path is empty: key operations are not audited")
            return None
        return cls(
            config.resolve_path(audit.path),
            hmac_key=load_hmac_key(audit.hmac_key_env, environ),
            hmac_key_env=audit.hmac_key_env,
            fail_closed=audit.fail_closed,
            max_file_bytes=audit.max_file_bytes,
        )

    # -- state for health and metrics ---------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """Whether the last attempt to write succeeded (false before ``open``)."""
        return self._healthy

    @property
    def last_error(self) -> str | None:
        """Why the most recent write failed, such as ``"ENOSPC: No space left on device"``.
        Kept after recovery; ``healthy`` says whether it still applies.
        """
        return self._last_error

    @property
    def head(self) -> str | None:
        """The hash of the last durable record: give it to ``audit verify --head``."""
        return self._head

    @property
    def head_seq(self) -> int:
        """The seq of the last durable record (0 before any)."""
        return self._seq

    def stats(self) -> AuditStats:
        return AuditStats(
            records_written=self._written,
            records_dropped=self._dropped,
            write_failures=self._failures,
            queue_depth=len(self._pending),
            groups=self._groups,
            mean_group_size=self._group_records / self._groups if self._groups else 0.0,
            max_group_size=self._max_group,
            last_group_size=self._last_group,
            last_write_latency_ms=self._last_latency_ms,
            healthy=self._healthy,
            head_seq=self._seq,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file, continue the chain and write a ``start`` record.

        Raises ``ConfigError`` naming ``audit.path`` when the file at the path is not an audit
        log or another process writes it, and, with ``fail_closed``, when it cannot be written.
        Without ``fail_closed`` an unwritable path is logged and retried.
        """
        if self._state != "new":
            raise RuntimeError("an AuditLog is opened once")
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kms-audit")
        self._wakeup = asyncio.Event()
        start = AuditRecord(
            {
                "event": "start",
                "time": format_time(self._clock()),
                "pid": os.getpid(),
                "version": __version__,
                "fail_closed": self.fail_closed,
                "hmac_key_id": hmac_key_id(self.hmac_key),
                "hmac_key_ephemeral": self.hmac_key_ephemeral,
            }
        )
        try:
            await self._loop.run_in_executor(self._executor, self._sink.open_at_start)
            await self._commit([start], [])
        except (_NotAnAuditLog, _CommitFailed, OSError) as exc:
            reason = exc.reason if isinstance(exc, _CommitFailed) else _reason(exc)
            if self.fail_closed or isinstance(exc, _NotAnAuditLog):
                self._executor.shutdown(wait=True)
                self._state = "closed"
                raise ConfigError(
                    f"audit.path: cannot write the audit log {self.path}: {reason}"
                ) from None
            log.error(
                "audit log %s cannot be written (%s); continuing without it and "
                "retrying, because audit.fail_closed is false",
                self.path,
                reason,
            )
            self._healthy, self._last_error = False, reason
            self._sink._note_reason(reason)  # the executor is idle: no race
            self._pending.append((start, None))
        self._state = "open"
        self._task = asyncio.create_task(self._run(), name="kms-audit-writer")

    async def write(self, record: AuditRecord) -> None:
        """Queue ``record``; with ``fail_closed``, return once it is durable.

        Raises :class:`~sidecar.errors.AuditUnavailable` (``fail_closed`` only) when the record
        could not be written or the log is closed. Cancelling the caller does not unqueue it.
        """
        if not isinstance(record, AuditRecord):
            raise TypeError("write() takes a record made by audit_record()")
        if self._state != "open":
            if self._state == "new":
                raise RuntimeError("AuditLog.write() before open()")
            if self.fail_closed:
                raise AuditUnavailable("The audit log is closed; key operations are refused.")
            self._dropped += 1
            return
        assert self._loop is not None and self._wakeup is not None
        if not self.fail_closed:
            if len(self._pending) >= MAX_QUEUE:
                self._dropped += 1
                self._dropped_since_ok += 1
                return
            self._pending.append((record, None))
            self._wakeup.set()
            return
        done = self._loop.create_future()
        self._pending.append((record, done))
        self._wakeup.set()
        await done

    async def write_all(self, records: Sequence[AuditRecord]) -> None:
        """Queue ``records`` in order, as :meth:`write` does each, committed in one group: with
        ``fail_closed``, return once the last (and so every one) is durable.
        """
        if len(records) <= 1:
            for record in records:
                await self.write(record)
            return
        if self._state != "open" or not self.fail_closed:
            for record in records:
                await self.write(record)  # never waits: queues, drops or raises
            return
        assert self._loop is not None and self._wakeup is not None
        for record in records:
            if not isinstance(record, AuditRecord):
                raise TypeError("write_all() takes records made by audit_record()")
        done = self._loop.create_future()
        self._pending.extend((record, None) for record in records[:-1])
        self._pending.append((records[-1], done))
        self._wakeup.set()
        await done

    async def close(self) -> None:
        """Write every queued record and a ``stop`` record, then close the file. Idempotent."""
        if self._state == "new":
            self._state = "closed"
            return
        if self._state == "open":
            assert self._wakeup is not None
            self._state = "closing"  # the writer drains the queue, then writes ``stop``
            self._wakeup.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        if self._state != "closed":
            self._state = "closed"
            assert self._loop is not None and self._executor is not None
            await self._loop.run_in_executor(self._executor, self._sink.close)
            self._executor.shutdown(wait=True)

    # -- the writer ----------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wakeup is not None
        stopped = False
        while True:
            if not self._pending and self._state != "open":
                if stopped:
                    return
                stopped = True
                stop = {
                    "event": "stop",
                    "time": format_time(self._clock()),
                    "records": self._written,
                }
                self._pending.append((AuditRecord(stop), None))
            if not self._pending:
                if self._healthy:
                    await self._wakeup.wait()
                else:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), self._retry_interval)
                self._wakeup.clear()
                if not self._pending and self._healthy:
                    continue
            batch, self._pending = self._pending, []
            try:
                await self._commit([record for record, _ in batch], batch)
            except _CommitFailed:
                pass  # reported to the waiters and in health
            except Exception:  # a bug: keep the writer alive, refuse the records
                log.exception("audit writer failed")
                self._fail(batch, 0, "internal error in the audit writer")

    async def _commit(
        self, records: list[AuditRecord], batch: list[tuple[AuditRecord, Waiter | None]]
    ) -> None:
        """Commit ``records`` (those of ``batch``, or the log's own) in the executor and settle
        the waiters of ``batch``. Re-raises :class:`_CommitFailed`.
        """
        assert self._loop is not None and self._executor is not None
        started = time.perf_counter()
        try:
            done = await self._loop.run_in_executor(
                self._executor, self._sink.commit, records, self._dropped_since_ok
            )
        except _CommitFailed as exc:
            self._fail(batch, exc.durable, exc.reason)
            raise
        self._last_latency_ms = (time.perf_counter() - started) * 1000.0
        self._seq, self._head = done.seq, done.head
        if not self._healthy and self._last_error is not None and self._groups:
            log.warning("audit log %s is writable again", self.path)
        self._healthy = True
        self._dropped_since_ok = 0
        self._groups += 1
        self._written += done.written
        self._group_records += done.written
        self._last_group = done.written
        self._max_group = max(self._max_group, done.written)
        for _, waiter in batch:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _fail(
        self,
        batch: list[tuple[AuditRecord, Waiter | None]],
        durable: int,
        reason: str,
    ) -> None:
        if self._healthy or self._last_error != reason:
            log.error("audit log %s cannot be written: %s", self.path, reason)
        self._healthy = False
        self._last_error = reason
        self._failures += 1
        self._written += durable
        for index, (_, waiter) in enumerate(batch):
            if index < durable:
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif waiter is None:
                self._dropped += 1
                self._dropped_since_ok += 1
            elif not waiter.done():
                waiter.set_exception(AuditUnavailable())
