"""Token buckets: how many requests a caller may make under one policy rule.

A rate such as ``"2000/s"`` is a bucket holding at most 2000 tokens that refills at 2000 tokens a
second: a caller may burst up to one unit's worth of requests, then continues at the steady rate.
Time is passed in (``now``, seconds, any monotonic origin) so tests need no sleeping.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

_RATE = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$", re.IGNORECASE
)
_PER_UNIT = {
    "s": 1.0, "sec": 1.0, "second": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0,
    "h": 3600.0, "hour": 3600.0,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` requests per ``period`` seconds; also the burst size."""

    count: float
    period: float

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}[self.period]
        count = int(self.count) if self.count.is_integer() else self.count
        return f"{count}/{unit}"


def parse_rate(text: str) -> Rate:
    """The rate in ``"2000/s"``, ``"100/m"`` or ``"10/h"``. Raises ``ValueError`` otherwise."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"expected a rate like '2000/s', '100/m' or '10/h', got {text!r}")
    count = float(match.group(1))
    if count <= 0:
        raise ValueError("a rate must be positive")
    return Rate(count=count, period=_PER_UNIT[match.group(2).lower()])


class TokenBucket:
    """One bucket: ``take`` spends a token if there is one."""

    __slots__ = ("_capacity", "_refill", "_tokens", "_updated")

    def __init__(self, rate: Rate, now: float) -> None:
        self._capacity = rate.count
        self._refill = rate.per_second
        self._tokens = rate.count
        self._updated = now

    def take(self, now: float) -> float:
        """Spend one token. Returns 0.0 on success, else the seconds until a token is available."""
        elapsed = now - self._updated
        if elapsed > 0:
            self._tokens = min(self._capacity, self._tokens + elapsed * self._refill)
            self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._refill


class RateLimiter:
    """Buckets for one rate, one per caller key, at most ``max_callers`` of them (LRU).

    A caller whose bucket was evicted starts again with a full bucket; the bound keeps memory
    fixed whatever the number of callers.
    """

    def __init__(self, rate: Rate, *, max_callers: int = 10_000) -> None:
        self.rate = rate
        self._max_callers = max_callers
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, caller: str, now: float) -> float:
        """Spend one of ``caller``'s tokens: 0.0 if allowed, else seconds to wait."""
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = TokenBucket(self.rate, now)
            self._buckets[caller] = bucket
            if len(self._buckets) > self._max_callers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(caller)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
