"""The audit file itself: opened and locked, its chain continued, group commits appended and
made durable, rotated by size. Every method of :class:`FileSink` runs in the log's one thread.

The file is created with mode 0600 (its directory 0700), locked with ``flock`` against a second
writer, and rotated when it would exceed ``max_file_bytes``: ``audit.log`` is renamed
``audit.log.<UTC time>`` (``-2``, ``-3``... on a clash) and the chain continues in a new
``audit.log``.

The host is checked as sshd's StrictModes does (:mod:`sidecar.strict_modes`): the directory
and every one above it must be writable only by root or the sidecar's user (sticky excepted),
and an existing file others may write is set to 0600, with a warning. When the live file is
deleted, moved or replaced under the sidecar, the next commit notices (its inode changed), logs
at ERROR, opens a new file and writes a ``file_replaced`` record there first (then the
``resumed`` record saying why writing moved on); ``audit verify`` refuses a chain that starts
with one, since the records before it are gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sidecar.audit.chain import GENESIS, seal
from sidecar.audit.durable import free_name, fsync_dir, stamp, write_all
from sidecar.audit.record import AuditRecord, format_time
from sidecar.audit.recovery import NotAnAuditLog, latest_rotated, scan_tail, set_aside
from sidecar.errors import ConfigError
from sidecar.strict_modes import check_directory, tighten_file

log = logging.getLogger(__name__)

#: Bytes handed to one ``write`` call; a larger group is written in several, then fsync'd once.
WRITE_CHUNK: Final = 1 << 20

_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
#: Where the OS has it, every write is durable when it returns (one syscall, one GIL release per
#: group instead of write + fdatasync). Elsewhere the group ends with an explicit fdatasync.
_O_DSYNC: Final[int] = getattr(os, "O_DSYNC", 0)
_APPEND_FLAGS: Final = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | _O_DSYNC


class CommitFailed(Exception):
    """A group commit failed after ``durable`` of its records were made durable."""

    def __init__(self, reason: str, durable: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.durable = durable


@dataclass(frozen=True, slots=True)
class Committed:
    """Where the chain stands after a commit, and how many of the caller's records it wrote."""

    seq: int
    head: str
    written: int


def reason_of(exc: BaseException) -> str:
    """Why ``exc`` stopped a write, in words such as ``"ENOSPC: No space left on device"``."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        return f"{name}: {exc.strerror or os.strerror(exc.errno)}"
    return str(exc) or type(exc).__name__


class FileSink:
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
        for a path that cannot be written and :class:`NotAnAuditLog` for a foreign file.
        """
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        check_directory(self.directory, setting="audit.path", holds="the audit log")
        self._open()

    def _open(self) -> None:
        tighten_file(self.path, setting="audit.path")
        fd = os.open(self.path, _APPEND_FLAGS, 0o600)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise NotAnAuditLog(f"{self.path} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise NotAnAuditLog(
                    f"another process (a second sidecar?) is writing {self.path}"
                ) from None
            if info.st_size == 0:
                fsync_dir(self.directory)  # the new file's name must survive a crash too
            self.carry.extend(self._continue_chain(fd, info.st_size))
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.ident = fd, (info.st_dev, info.st_ino)
        self.size, self.unsynced = os.fstat(fd).st_size, 0

    def _continue_chain(self, fd: int, size: int) -> list[AuditRecord]:
        extra: list[AuditRecord] = []
        valid_end, last = scan_tail(fd, size)
        if valid_end < size:
            extra.append(set_aside(fd, self.path, valid_end, size, self.clock()))
        if self.seq is None:  # first open: the files say where the chain is
            if last is None:
                last = latest_rotated(self.path)
            self.seq, self.head = last if last is not None else (0, GENESIS)
        elif last is None:
            if size > 0 or self.seq > 0:
                self.note_reason(
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
                self.note_reason(
                    f"the audit file does not end with seq {self.seq}, the last record written"
                )
        return extra

    def note_reason(self, reason: str) -> None:
        if self.resume_reason is None:
            self.resume_reason = reason
            self.failed_since = self.clock()

    def _still_ours(self) -> bool:
        try:
            info = os.stat(self.path)
        except OSError:
            return False
        return (info.st_dev, info.st_ino) == self.ident

    def _record_replaced(self) -> None:
        """The live file is no longer at the path: say so in the log and, first, in the chain."""
        assert self.fd is not None and self.ident is not None
        try:
            links = os.fstat(self.fd).st_nlink
        except OSError:
            links = 0
        how = "deleted" if links == 0 else "moved or replaced"
        log.error(
            "audit log %s was %s under the sidecar (inode %d); records up to seq %s were in it. "
            "Continuing the chain in a new file, which records the gap",
            self.path,
            how,
            self.ident[1],
            self.seq,
        )
        self.carry.append(
            AuditRecord(
                {
                    "event": "file_replaced",
                    "time": format_time(self.clock()),
                    "how": how,
                    "previous_inode": self.ident[1],
                    "previous_last_seq": self.seq,
                }
            )
        )

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- writing -------------------------------------------------------------------------------

    def commit(self, batch: list[AuditRecord], dropped: int) -> Committed:
        """Chain ``batch`` after the head, append it and make it durable. Raises
        :class:`CommitFailed` saying how many leading records of ``batch`` were made durable.
        ``dropped`` is told in the ``resumed`` record, if one is due.
        """
        try:
            if self.fd is not None and not self._still_ours():
                self._record_replaced()
                self.close()
                self.note_reason("the audit file was moved, replaced or removed")
            if self.fd is None:
                if self.seq is None:  # never opened: as at start, make the directory too
                    self.open_at_start()
                else:
                    self._open()
        except (OSError, NotAnAuditLog, ConfigError) as exc:
            self.close()
            self.note_reason(reason_of(exc))
            raise CommitFailed(reason_of(exc), 0) from exc
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
            reason = reason_of(exc) if isinstance(exc, OSError) else "internal error"
            if not isinstance(exc, OSError):
                log.error("audit commit failed", exc_info=exc)
            self.note_reason(reason)
            raise CommitFailed(reason, max(0, durable - len(extra))) from exc
        self.seq, self.head = seq, head
        self._settle_extra(extra, len(extra))
        return Committed(seq, head, len(batch))

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
            write_all(self.fd, data)
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
        target = free_name(f"{self.path}.{stamp(self.clock())}")
        os.rename(self.path, target)
        self.close()
        fd = os.open(self.path, _APPEND_FLAGS | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fsync_dir(self.directory)
            info = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.ident, self.size, self.unsynced = fd, (info.st_dev, info.st_ino), 0, 0
        log.info("audit log rotated: %s", target)
