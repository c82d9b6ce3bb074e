"""KEKs in memory: the :class:`Kek` record, a bounded LRU of unwrapped KEKs, and single-flight.

A blob names its KEK by id; opening it needs the KEK unwrapped by the backend. :class:`KekCache`
keeps the unwrapped ones (least recently used dropped first) and counts hits and misses;
:class:`SingleFlight` makes concurrent requests for the same KEK share one backend call.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from sidecar.keys import envelope

_T = TypeVar("_T")

REFUSED_SECONDS: Final = 30.0
"""How long a KEK the backend refused to unwrap is refused locally, without asking again."""
REFUSED_CAPACITY: Final = 4096
"""The most refused KEKs remembered (the oldest forgotten first)."""


@dataclass(slots=True)
class Kek:
    """A KEK in sidecar memory (``created_at``: Unix seconds it was made or went live)."""

    key_name: str
    kek_id: bytes
    cipher: envelope.KekCipher
    wrapped: bytes = field(repr=False)
    root_version: int
    created_at: float
    uses: int = 0
    #: When (Unix seconds) and after how many uses its successor is fetched; set when it goes live.
    prefetch_at: float = float("inf")
    prefetch_uses: int = 1 << 62
    #: The header of every blob this KEK seals without an expiry, encoded once.
    header_bytes: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.header_bytes = self.header(None).encode()

    def header(self, expires_at: int | None) -> envelope.Header:
        """The authenticated header of a blob this KEK seals (``expires_at``: Unix seconds)."""
        return envelope.Header(
            self.key_name, self.root_version, self.kek_id, self.wrapped, expires_at
        )


class KekCache:
    """Unwrapped KEKs by id, at most ``capacity`` of them; ``hits``/``misses`` count lookups."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, Kek] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, kek_id: bytes, wrapped: bytes) -> Kek | None:
        """The cached KEK with this id and wrapped bytes (no LRU touch, not counted)."""
        kek = self._entries.get(kek_id)
        return kek if kek is not None and kek.wrapped == wrapped else None

    def hit(self, kek: Kek) -> Kek:
        """Count a lookup answered by ``kek`` and mark it recently used."""
        self._entries.move_to_end(kek.kek_id)
        self.hits += 1
        return kek

    def miss(self) -> None:
        """Count a lookup the cache could not answer."""
        self.misses += 1

    def put(self, kek: Kek) -> None:
        """Hold ``kek``, dropping the least recently used beyond ``capacity``."""
        self._entries[kek.kek_id] = kek
        self._entries.move_to_end(kek.kek_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def drop(self, key_name: str, below_version: int | None = None) -> set[bytes]:
        """Drop the KEKs of ``key_name`` (only those under a root version below
        ``below_version``, if given). Returns their ids."""
        dropped = {
            kek_id
            for kek_id, kek in self._entries.items()
            if kek.key_name == key_name
            and (below_version is None or kek.root_version < below_version)
        }
        for kek_id in dropped:
            del self._entries[kek_id]
        return dropped

    def count(self, key_name: str) -> int:
        """How many KEKs of ``key_name`` are held."""
        return sum(1 for kek in self._entries.values() if kek.key_name == key_name)


class RefusedKeks:
    """KEK ids the backend refused to unwrap lately: a short, bounded negative cache.

    A flood of forged blobs sharing one forged wrapped KEK then costs one backend call per
    :data:`REFUSED_SECONDS`, not one per blob. Times are Unix seconds.
    """

    def __init__(self, seconds: float = REFUSED_SECONDS, capacity: int = REFUSED_CAPACITY) -> None:
        self.seconds = seconds
        self.capacity = capacity
        self._until: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def add(self, kek_id: bytes, now: float) -> None:
        """Remember that the backend refused ``kek_id`` at ``now``."""
        self._until[kek_id] = now + self.seconds
        self._until.move_to_end(kek_id)
        while len(self._until) > self.capacity:
            self._until.popitem(last=False)

    def holds(self, kek_id: bytes, now: float) -> bool:
        """Whether ``kek_id`` was refused less than :attr:`seconds` before ``now``."""
        until = self._until.get(kek_id)
        if until is None:
            return False
        if now < until:
            return True
        del self._until[kek_id]
        return False

    def clear(self) -> None:
        """Forget every refusal (a cache flush)."""
        self._until.clear()


class SingleFlight:
    """At most one running call per flight key; concurrent callers share its result."""

    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Future[Any]] = {}

    def __contains__(self, flight: Hashable) -> bool:
        return flight in self._inflight

    def run(self, flight: Hashable, start: Callable[[], Awaitable[_T]]) -> asyncio.Future[_T]:
        """The running call for ``flight``, started with ``start()`` if there is none.

        The result is shielded: a cancelled caller does not cancel the call others share.
        """
        future = self._inflight.get(flight)
        if future is None:
            future = asyncio.ensure_future(start())
            self._inflight[flight] = future
            future.add_done_callback(lambda _: self._inflight.pop(flight, None))
        return asyncio.shield(future)
