"""Key pools for many encryption contexts of one key: one pool per context, least recently used
closed first (``Client.key_pools``, ``AsyncClient.key_pools``)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Mapping
from types import TracebackType

from sidecar.client._calls import DataKey
from sidecar.client._pool import AsyncKeyPool, KeyPool


class KeyPools:
    """``KeyPool``\\s of one key for many contexts, at most ``max_contexts`` (least recently used
    closed first). Made by ``Client.key_pools``; ``take(context)`` as ``KeyPool.take``.
    """

    def __init__(self, make: Callable[[Mapping[str, str] | None], KeyPool], max_contexts: int):
        if max_contexts < 1:
            raise ValueError("max_contexts must be at least 1")
        self._make = make
        self._max = max_contexts
        self._pools: collections.OrderedDict[tuple[tuple[str, str], ...], KeyPool] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"KeyPools(contexts={len(self._pools)}, max_contexts={self._max})"

    def __enter__(self) -> KeyPools:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._pools)

    def pool(self, context: Mapping[str, str] | None = None) -> KeyPool:
        """The pool for ``context``, made on first use."""
        name = _context_key(context)
        evicted = None
        with self._lock:
            if self._closed:
                raise RuntimeError("The key pools are closed.")
            pool = self._pools.get(name)
            if pool is not None:
                self._pools.move_to_end(name)
                return pool
            pool = self._pools[name] = self._make(context)
            if len(self._pools) > self._max:
                _, evicted = self._pools.popitem(last=False)
        if evicted is not None:
            evicted.close()
        return pool

    def take(self, context: Mapping[str, str] | None = None) -> DataKey:
        """A single-use data key bound to ``context``."""
        return self.pool(context).take()

    def close(self) -> None:
        """Close every pool (wiping their keys)."""
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.close()


class AsyncKeyPools:
    """``AsyncKeyPool``\\s of one key for many contexts, at most ``max_contexts`` (LRU).

    Made by ``AsyncClient.key_pools``; ``await take(context)`` as ``AsyncKeyPool.take``.
    """

    def __init__(
        self, make: Callable[[Mapping[str, str] | None], AsyncKeyPool], max_contexts: int
    ) -> None:
        if max_contexts < 1:
            raise ValueError("max_contexts must be at least 1")
        self._make = make
        self._max = max_contexts
        self._pools: collections.OrderedDict[tuple[tuple[str, str], ...], AsyncKeyPool] = (
            collections.OrderedDict()
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncKeyPools(contexts={len(self._pools)}, max_contexts={self._max})"

    async def __aenter__(self) -> AsyncKeyPools:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __len__(self) -> int:
        return len(self._pools)

    async def pool(self, context: Mapping[str, str] | None = None) -> AsyncKeyPool:
        """The pool for ``context``, made on first use."""
        if self._closed:
            raise RuntimeError("The key pools are closed.")
        name = _context_key(context)
        pool = self._pools.get(name)
        if pool is not None:
            self._pools.move_to_end(name)
            return pool
        pool = self._pools[name] = self._make(context)
        if len(self._pools) > self._max:
            _, evicted = self._pools.popitem(last=False)
            await evicted.aclose()
        return pool

    async def take(self, context: Mapping[str, str] | None = None) -> DataKey:
        """A single-use data key bound to ``context``."""
        return await (await self.pool(context)).take()

    async def aclose(self) -> None:
        """Close every pool (wiping their keys)."""
        self._closed = True
        pools = list(self._pools.values())
        self._pools.clear()
        for pool in pools:
            await pool.aclose()


def _context_key(context: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(context.items())) if context else ()
