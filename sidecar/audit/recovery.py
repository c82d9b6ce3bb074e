"""Reading where an audit file's chain ends, and setting aside a record torn by a crash.

At start the tail of the file is read to continue the chain. Bytes after the last complete, valid
record are copied to ``<path>.torn-<UTC time>`` and cut off, and a ``recovered`` record carrying
their length and SHA-256 continues the chain. A file that does not end like an audit log is
never cut: :class:`NotAnAuditLog` stops start-up instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Final

from sidecar.audit.chain import MalformedRecord, parse_record
from sidecar.audit.durable import free_name, fsync_dir, stamp, write_all
from sidecar.audit.record import AuditRecord, format_time

log = logging.getLogger(__name__)

#: The most bytes after the last valid record that start-up sets aside as a torn record. More
#: means the file is not a crash-torn audit log, and start-up stops.
MAX_TORN_BYTES: Final = 16 << 20


class NotAnAuditLog(Exception):
    """The file at the audit path does not end like an audit log (or another process holds it)."""


def scan_tail(fd: int, size: int) -> tuple[int, tuple[int, str] | None]:
    """The end offset of the last complete record with a valid hash, and its ``(seq, hash)``.

    ``(0, None)`` when there is none. Raises :class:`NotAnAuditLog` when more than
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
                    raise NotAnAuditLog("too much data follows the last valid audit record")
                return start + pos + 1, (record.seq, record.hash)
            pos = line_start - 1
        if start == 0:
            # With no valid record, only the torn first write of a new log is set aside: one
            # partial line (the first group holds just the ``start`` record), or zeros.
            content = data.strip(b"\0")
            if not content or (content.startswith(b"{") and b"\n" not in content):
                return 0, None
            raise NotAnAuditLog("it holds no valid audit record")
        if window >= MAX_TORN_BYTES:
            raise NotAnAuditLog("too much data follows the last valid audit record")
        window *= 4


def set_aside(fd: int, path: str, valid_end: int, size: int, now: float) -> AuditRecord:
    """Copy the bytes of ``fd`` (the log at ``path``) after ``valid_end`` to
    ``<path>.torn-<UTC time>``, cut them off, and return the ``recovered`` record telling so."""
    directory = os.path.dirname(path)
    torn = os.pread(fd, size - valid_end, valid_end)
    target = free_name(f"{path}.torn-{stamp(now)}")
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(out, torn)
        os.fsync(out)
    finally:
        os.close(out)
    fsync_dir(directory)
    os.ftruncate(fd, valid_end)
    os.fsync(fd)
    log.warning(
        "audit log %s ended with %d bytes of a torn record; moved them to %s",
        path,
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


def latest_rotated(path: str) -> tuple[int, str] | None:
    """The chain position at the end of the newest rotated file: the live file may be
    missing after a crash between rotation's rename and create.
    """
    directory = os.path.dirname(path)
    pattern = re.compile(re.escape(os.path.basename(path)) + r"\.\d{8}T\d{6}Z(-\d+)?$")
    best: tuple[int, str] | None = None
    for name in os.listdir(directory):
        if not pattern.fullmatch(name):
            continue
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _, last = scan_tail(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
        except (OSError, NotAnAuditLog) as exc:
            log.warning("cannot read rotated audit log %s: %s", name, exc)
            continue
        if last is not None and (best is None or last[0] > best[0]):
            best = last
    return best
