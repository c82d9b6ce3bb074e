"""What the keyring reports about its keys and KEK cache: typed, immutable, never key bytes.

``/v1/sidecar/status`` serves :meth:`KeyringStatus.as_json`; metrics read the attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

KeyState = Literal["ok", "degraded", "unavailable", "revoked"]
"""``ok``: can issue now; ``degraded``: issuing from a KEK in its grace period while the backend
is unreachable; ``unavailable``: cannot issue now (the backend is unreachable and no KEK may
seal); ``revoked``: the backend has no such root key, or refuses it to this sidecar."""

KEY_STATES: Final[tuple[KeyState, ...]] = ("ok", "degraded", "unavailable", "revoked")
READY_STATES: Final[frozenset[KeyState]] = frozenset({"ok", "degraded"})
"""The states in which a key can issue now."""


@dataclass(frozen=True, slots=True)
class LiveKekStatus:
    """The KEK sealing new blobs of a key: its id (hex), root version, age and uses."""

    kek_id: str
    root_version: int
    age_seconds: float
    uses: int
    max_uses: int
    ttl_seconds: float


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """One configured key: its state and why, root versions seen, KEK rotations, cached KEKs."""

    root_key: str
    state: KeyState
    #: Why the key is not ``ok``, in words (``None`` when it is).
    problem: str | None
    latest_version: int | None
    min_decryption_version: int
    kek_rotations: int
    cached_keks: int
    live_kek: LiveKekStatus | None


@dataclass(frozen=True, slots=True)
class KekCacheStatus:
    """The cache of unwrapped KEKs: entries held, capacity, hits and misses since start."""

    size: int
    capacity: int
    hits: int
    misses: int


@dataclass(frozen=True, slots=True)
class KeyringStatus:
    """Every key's status by API name, and the KEK cache's."""

    keys: Mapping[str, KeyStatus]
    kek_cache: KekCacheStatus

    def as_json(self) -> dict[str, Any]:
        """The status as JSON-ready dicts (the shape ``/v1/sidecar/status`` documents)."""
        return {
            "keys": {name: dataclasses.asdict(key) for name, key in self.keys.items()},
            "kek_cache": dataclasses.asdict(self.kek_cache),
        }
