"""Single-use key pools: data keys issued ahead in batches, each handed out once.

A pool asks the sidecar for data keys with ``batch_input`` datakey requests on its own
connection, in the background, so ``take()`` is an in-memory pop. Every key in it was issued,
authorized and audited by the sidecar like any other (one audit record per item of the batch).

The rules, the same for ``KeyPool`` (a refill thread) and ``AsyncKeyPool`` (a refill task):

- **Used once.** ``take()`` removes the key it returns; the pool keeps no copy.
- **Never older than ``max_age``** seconds, counted from the moment the request that issued it
  was sent. Older keys are dropped and overwritten, never handed out. The refiller wakes when
  the oldest key is due, so an idle pool does not keep keys past ``max_age`` either.
- **Never more than ``size``** keys, counting those in a refill still in flight.
- **Refilled on demand.** One refill at a time, when a quarter of ``size`` (at most ``batch``)
  is missing, and only while the pool is used: a pool nobody took from for ``max_age`` lets its
  keys expire and asks for no more until the next ``take()``, which then waits for one refill.
- **Errors reach ``take()``.** The takers waiting for a failed refill raise its error
  (``PermissionDenied``, ``SidecarUnreachable``, ...), and so does the next ``take()`` that
  finds the pool empty; the one after that tries again. In the background a failed refill is
  retried at most once a second (``max_age`` if shorter) while keys remain, so a refused pool
  never spins; a ``RateLimited`` one waits for its ``retry_after`` and raises until then.
- **Wiped on close.** Held keys are ``bytearray``\\s, overwritten with zeros when handed out (the
  caller gets its own ``bytes``), dropped or closed. ``close()`` waits for a refill in flight
  and overwrites what it brings. Python cannot overwrite the transient copies made while an
  answer is decoded; they are freed at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from sidecar.client import _calls
from sidecar.client._calls import DataKey, read_answer
from sidecar.client._errors import SidecarUnreachable
from sidecar.errors import RateLimited

if TYPE_CHECKING:
    from sidecar.client._transport import AsyncUnixTransport, UnixTransport

#: A pool's ``size`` and ``max_age`` (seconds) unless the caller says otherwise.
DEFAULT_POOL_SIZE = 256
DEFAULT_MAX_AGE = 5.0
#: The most keys one refill asks for: the sidecar's default ``max_batch_items``.
MAX_BATCH = 1000

_tuple_new = tuple.__new__  # DataKey without the named tuple's Python-level __new__

#: A monotonic clock in seconds; injectable so tests can age keys without sleeping.
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class PoolStats:
    """What a pool did so far (counts of keys; never key bytes).

    Every issued key is, or will be, exactly one of taken, expired or discarded (wiped unused
    at close), or still held: ``issued == taken + expired + discarded + held``.
    """

    issued: int
    taken: int
    expired: int
    discarded: int
    held: int
    refills: int
    refill_errors: int


class _PoolCore:
    """A pool's keys and rules, with no I/O and no locking (each pool kind adds its own)."""

    def __init__(
        self,
        key: str,
        *,
        context: Mapping[str, str] | None,
        bits: int,
        size: int,
        max_age: float,
        batch: int | None,
        now: Clock,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError("size must be a positive integer")
        if not max_age > 0:
            raise ValueError("max_age must be a positive number of seconds")
        batch = min(size, MAX_BATCH) if batch is None else batch
        if not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be an integer from 1 to {MAX_BATCH}")
        _calls.key_segment(key)  # a bad name fails here, not in the refiller
        self.key = key
        self.context = dict(context) if context else None
        self.bits = bits
        self.size = size
        self.max_age = float(max_age)
        self.batch = batch
        self.low = max(1, min(batch, size // 4))
        self.now = now
        self.zeros = bytes(bits // 8)
        #: (issued_at, plaintext, ciphertext, key_version, expires_at), oldest first.
        self.held: collections.deque[tuple[float, bytearray, str, int, int | None]] = (
            collections.deque()
        )
        self.in_flight = 0
        self.active_until = now() + self.max_age  # the first fill starts at once
        #: No refill before this (a RateLimited answer's retry_after), not even on demand.
        self.not_before = 0.0
        #: No background refill before this after a failure; a take on an empty pool may.
        self.backoff_until = 0.0
        self.error: BaseException | None = None
        self.last_error: BaseException | None = None
        self.failures = 0
        self.closed = False
        self.issued = self.taken = self.expired = self.discarded = self.refills = 0

    def pop(self) -> DataKey | None:
        """The oldest key still young enough, removed from the pool; ``None`` if there is none."""
        held = self.held
        now = self.now()
        self.active_until = now + self.max_age
        while held:
            issued_at, plaintext, ciphertext, key_version, expires_at = held.popleft()
            if now - issued_at < self.max_age:
                key = _tuple_new(DataKey, (bytes(plaintext), ciphertext, key_version, expires_at))
                plaintext[:] = self.zeros
                self.taken += 1
                return key
            plaintext[:] = self.zeros
            self.expired += 1
        return None

    def refill_size(self) -> int:
        """How many keys to ask for now (0: none), dropping expired keys first."""
        now = self.now()
        self.drop_expired(now)
        if (
            self.closed
            or self.in_flight
            or now < self.not_before
            or now < self.backoff_until
            or now >= self.active_until
        ):
            return 0
        missing = self.size - len(self.held)
        if missing < self.low:
            return 0
        return min(missing, self.batch)

    def drop_expired(self, now: float) -> None:
        held = self.held
        while held and now - held[0][0] >= self.max_age:
            held.popleft()[1][:] = self.zeros
            self.expired += 1

    def seconds_to_next_expiry(self) -> float | None:
        if not self.held:
            return None
        return max(0.0, self.held[0][0] + self.max_age - self.now())

    def landed(self, keys: list[DataKey], issued_at: float) -> None:
        self.in_flight = 0
        self.issued += len(keys)
        self.refills += 1
        for key in keys:
            assert key.plaintext is not None
            plaintext = bytearray(key.plaintext)
            if self.closed:
                plaintext[:] = self.zeros
                self.discarded += 1
            else:
                self.held.append(
                    (issued_at, plaintext, key.ciphertext, key.key_version, key.expires_at)
                )

    def failed(self, error: BaseException) -> None:
        self.in_flight = 0
        self.error = self.last_error = error
        self.failures += 1
        now = self.now()
        # No retry in the background for a while: a refused pool must not spin.
        self.backoff_until = now + min(1.0, self.max_age)
        if isinstance(error, RateLimited):
            self.not_before = now + error.retry_after

    def demand(self) -> None:
        """A take found the pool empty: refill now (unless rate limited)."""
        self.active_until = self.now() + self.max_age
        self.backoff_until = 0.0

    def error_for(self, failures_seen: int) -> BaseException | None:
        """The refill error a taker must raise: one it waited for, or one nobody raised yet."""
        if self.failures != failures_seen and self.last_error is not None:
            self.error = None
            return self.last_error
        if self.error is not None:
            error, self.error = self.error, None
            return error
        if self.now() < self.not_before and self.last_error is not None:
            return self.last_error
        return None

    def close(self) -> None:
        self.closed = True
        while self.held:
            self.held.popleft()[1][:] = self.zeros
            self.discarded += 1

    def stats(self) -> PoolStats:
        return PoolStats(
            issued=self.issued,
            taken=self.taken,
            expired=self.expired,
            discarded=self.discarded,
            held=len(self.held),
            refills=self.refills,
            refill_errors=self.failures,
        )

    def call(self, n: int) -> _calls.Call[list[DataKey]]:
        return _calls.datakeys(
            self.key, n, bits=self.bits, context=self.context, ttl=None, wrapped=False
        )

    def describe(self, kind: str) -> str:
        return f"{kind}(key={self.key!r}, held={len(self.held)}, size={self.size})"


def _waited_too_long(core: _PoolCore, seconds: float) -> SidecarUnreachable:
    return SidecarUnreachable(
        f"No data key for {core.key!r} arrived from the sidecar within {seconds:g} s."
    )


class KeyPool:
    """Single-use data keys of one key and context, refilled by a background thread.

    Made by ``Client.key_pool``; use it as a context manager or call ``close()``. ``take()``
    blocks only when the pool is empty, for one refill at most (bounded by the client's
    timeout). Safe to share between threads.
    """

    def __init__(
        self,
        transport: UnixTransport,
        key: str,
        *,
        context: Mapping[str, str] | None = None,
        bits: int = 256,
        size: int = DEFAULT_POOL_SIZE,
        max_age: float = DEFAULT_MAX_AGE,
        batch: int | None = None,
        now: Clock = time.monotonic,
    ) -> None:
        self._core = _PoolCore(
            key, context=context, bits=bits, size=size, max_age=max_age, batch=batch, now=now
        )
        self._transport = transport
        self._wait_limit = transport.timeout + 1.0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._thread = threading.Thread(
            target=self._refill_loop, name=f"kms-sidecar key pool {key}", daemon=True
        )
        self._thread.start()

    def __repr__(self) -> str:
        return self._core.describe("KeyPool")

    def __enter__(self) -> KeyPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def key(self) -> str:
        return self._core.key

    @property
    def context(self) -> dict[str, str] | None:
        return dict(self._core.context) if self._core.context else None

    def take(self) -> DataKey:
        """A data key no one else got, at most ``max_age`` old.

        Raises the error of a failed refill (see the module's rules), ``SidecarUnreachable``
        if no key arrived in time, ``RuntimeError`` once the pool is closed.
        """
        core = self._core
        with self._lock:  # the plain lock: ``with`` on the Condition costs a Python call
            if core.closed:
                raise RuntimeError("The key pool is closed.")
            key = core.pop()
            if key is None:
                return self._take_waiting()
            if not core.in_flight and core.size - len(core.held) >= core.low:
                self._changed.notify()
            return key

    def stats(self) -> PoolStats:
        """Counts of keys issued, taken, expired and discarded so far."""
        with self._changed:
            return self._core.stats()

    def close(self) -> None:
        """Wipe every held key and stop the refill thread (after a refill in flight lands)."""
        with self._changed:
            self._core.close()
            self._changed.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(self._wait_limit)
        self._transport.close()

    def _take_waiting(self) -> DataKey:
        core = self._core
        seen = core.failures
        deadline = time.monotonic() + self._wait_limit
        while True:
            key = core.pop()
            if key is not None:
                return key
            error = core.error_for(seen)
            if error is not None:
                raise error
            core.demand()
            self._changed.notify_all()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _waited_too_long(core, self._wait_limit)
            self._changed.wait(remaining)
            if core.closed:
                raise RuntimeError("The key pool is closed.")

    def _refill_loop(self) -> None:
        core = self._core
        while True:
            with self._changed:
                while True:
                    if core.closed:
                        return
                    n = core.refill_size()
                    if n:
                        core.in_flight = n
                        break
                    due = core.seconds_to_next_expiry()
                    self._changed.wait(None if due is None else min(max(due, 0.001), core.max_age))
            issued_at = core.now()
            try:
                call = core.call(n)
                answer = self._transport.send(call.method, call.path, call.encoded_body())
                keys = read_answer(
                    call, status=answer.status, retry_after=answer.retry_after, raw=answer.body
                )
            except Exception as exc:  # every failure goes to the takers
                with self._changed:
                    core.failed(exc)
                    self._changed.notify_all()
                continue
            with self._changed:
                core.landed(keys, issued_at)
                self._changed.notify_all()


class AsyncKeyPool:
    """Single-use data keys of one key and context, refilled by a background task.

    Made by ``AsyncClient.key_pool`` inside a running event loop; use it as an async context
    manager or call ``aclose()``. ``await take()`` waits only when the pool is empty.
    """

    def __init__(
        self,
        transport: AsyncUnixTransport,
        key: str,
        *,
        context: Mapping[str, str] | None = None,
        bits: int = 256,
        size: int = DEFAULT_POOL_SIZE,
        max_age: float = DEFAULT_MAX_AGE,
        batch: int | None = None,
        now: Clock = time.monotonic,
    ) -> None:
        self._core = _PoolCore(
            key, context=context, bits=bits, size=size, max_age=max_age, batch=batch, now=now
        )
        self._transport = transport
        self._wait_limit = transport.timeout + 1.0
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()  # RuntimeError outside a loop, before any task exists
        self._task = loop.create_task(self._refill_loop(), name=f"kms-sidecar key pool {key}")

    def __repr__(self) -> str:
        return self._core.describe("AsyncKeyPool")

    async def __aenter__(self) -> AsyncKeyPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def key(self) -> str:
        return self._core.key

    @property
    def context(self) -> dict[str, str] | None:
        return dict(self._core.context) if self._core.context else None

    async def take(self) -> DataKey:
        """A data key no one else got, at most ``max_age`` old; see ``KeyPool.take``."""
        core = self._core
        if core.closed:
            raise RuntimeError("The key pool is closed.")
        key = core.pop()
        if key is None:
            return await self._take_waiting()
        if not core.in_flight and core.size - len(core.held) >= core.low:
            self._wake.set()
        return key

    def stats(self) -> PoolStats:
        """Counts of keys issued, taken, expired and discarded so far."""
        return self._core.stats()

    async def aclose(self) -> None:
        """Wipe every held key and stop the refill task (after a refill in flight lands)."""
        self._core.close()
        self._wake.set()
        self._changed.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self._wait_limit)
        except (TimeoutError, asyncio.TimeoutError):
            self._task.cancel()
        await self._transport.aclose()

    async def _take_waiting(self) -> DataKey:
        core = self._core
        seen = core.failures
        deadline = time.monotonic() + self._wait_limit
        while True:
            key = core.pop()
            if key is not None:
                return key
            error = core.error_for(seen)
            if error is not None:
                raise error
            core.demand()
            self._wake.set()
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _waited_too_long(core, self._wait_limit)
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except (TimeoutError, asyncio.TimeoutError):
                raise _waited_too_long(core, self._wait_limit) from None
            if core.closed:
                raise RuntimeError("The key pool is closed.")

    async def _refill_loop(self) -> None:
        core = self._core
        while True:
            n = core.refill_size()
            while not n:
                if core.closed:
                    return
                self._wake.clear()
                due = core.seconds_to_next_expiry()
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(),
                        None if due is None else min(max(due, 0.001), core.max_age),
                    )
                n = core.refill_size()
            core.in_flight = n
            issued_at = core.now()
            try:
                call = core.call(n)
                answer = await self._transport.send(call.method, call.path, call.encoded_body())
                keys = read_answer(
                    call, status=answer.status, retry_after=answer.retry_after, raw=answer.body
                )
            except Exception as exc:  # every failure goes to the takers
                core.failed(exc)
            else:
                core.landed(keys, issued_at)
            self._changed.set()
