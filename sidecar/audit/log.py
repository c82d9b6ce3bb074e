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

The file side — creation, locking, rotation — is :mod:`sidecar.audit.sink`; continuing the chain
after a crash and setting aside a torn record is :mod:`sidecar.audit.recovery`. Rotated files are
never deleted: retention is the operator's decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from sidecar import __version__
from sidecar.audit.record import (
    AuditRecord,
    ephemeral_hmac_key,
    format_time,
    hmac_key_id,
    load_hmac_key,
)
from sidecar.audit.recovery import NotAnAuditLog
from sidecar.audit.sink import CommitFailed, FileSink, reason_of
from sidecar.config import Config, check_max_file_bytes
from sidecar.errors import AuditUnavailable, ConfigError

log = logging.getLogger(__name__)

#: Records a fail-open log queues before it drops new ones.
MAX_QUEUE: Final = 100_000

Waiter = asyncio.Future[None]


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
        check_max_file_bytes(max_file_bytes)
        self.path = os.path.abspath(path)
        self.fail_closed = fail_closed
        self.hmac_key_ephemeral = hmac_key is None
        self.hmac_key: bytes = ephemeral_hmac_key(hmac_key_env) if hmac_key is None else hmac_key
        self._clock = clock
        self._retry_interval = retry_interval
        self._sink = FileSink(self.path, max_file_bytes, clock)
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
        except ConfigError:  # the host check refused the directory or the file: stop start-up
            self._executor.shutdown(wait=True)
            self._state = "closed"
            raise
        except (NotAnAuditLog, CommitFailed, OSError) as exc:
            reason = exc.reason if isinstance(exc, CommitFailed) else reason_of(exc)
            if self.fail_closed or isinstance(exc, NotAnAuditLog):
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
            self._sink.note_reason(reason)  # the executor is idle: no race
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
            except CommitFailed:
                pass  # reported to the waiters and in health
            except Exception:  # a bug: keep the writer alive, refuse the records
                log.exception("audit writer failed")
                self._fail(batch, 0, "internal error in the audit writer")

    async def _commit(
        self, records: list[AuditRecord], batch: list[tuple[AuditRecord, Waiter | None]]
    ) -> None:
        """Commit ``records`` (those of ``batch``, or the log's own) in the executor and settle
        the waiters of ``batch``. Re-raises :class:`CommitFailed`.
        """
        assert self._loop is not None and self._executor is not None
        started = time.perf_counter()
        try:
            done = await self._loop.run_in_executor(
                self._executor, self._sink.commit, records, self._dropped_since_ok
            )
        except CommitFailed as exc:
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
