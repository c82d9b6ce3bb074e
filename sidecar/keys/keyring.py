"""KEKs per key: made, cached, rotated and used to seal and open blobs.

One *live* KEK per key seals new blobs. It is replaced when it is older than ``kek_ttl``, has
sealed ``kek_max_uses`` blobs, or the root key gained a newer version. The next KEK is fetched in
the background shortly before that, so a rotation never stalls a request. KEKs needed to open
blobs are unwrapped by the backend once — concurrent requests share one call (single-flight) —
and kept in a bounded LRU.

While the backend is unreachable, a live KEK keeps sealing for ``upstream_grace`` past its normal
end, and cached KEKs keep opening blobs for as long; requests that truly need the backend get
``UpstreamUnavailable``, never ``DecryptionFailed``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from opentelemetry.trace import SpanKind

from sidecar.backends.base import RootKeyBackend, RootKeyInfo, UpstreamCiphertexts
from sidecar.config import KeyConfig
from sidecar.errors import (
    DecryptionFailed,
    InvalidRequest,
    PermissionDenied,
    SidecarError,
    UpstreamUnavailable,
)
from sidecar.keys import envelope
from sidecar.telemetry import tracer

log = logging.getLogger(__name__)

#: The successor of a live KEK is fetched in the background once the live one has this share of
#: its uses left (at least one use), or this share of its lifetime (at most a minute): late
#: enough that a run within the budget costs no extra upstream call, early enough to hide the
#: fetch.
PREFETCH_REMAINING = 0.01
PREFETCH_LEAD_MAX_SECONDS = 60.0
#: A KEK never seals more than this many blobs, grace or not (random 96-bit nonces stay safe).
HARD_MAX_USES = 1 << 31
DEK_BITS = (128, 256, 512)

_T = TypeVar("_T")


@dataclass(slots=True)
class _Kek:
    """A KEK in sidecar memory."""

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
        return envelope.Header(
            self.key_name, self.root_version, self.kek_id, self.wrapped, expires_at
        )


# Results are NamedTuples: immutable like frozen dataclasses, and several times cheaper to make,
# which counts when a batch makes hundreds per request.


class DataKey(NamedTuple):
    """A new data key: ``plaintext`` for the caller's use, ``blob`` to store beside the data."""

    plaintext: bytes
    blob: str
    root_version: int
    expires_at: int | None
    kek_id: bytes

    def __repr__(self) -> str:
        return f"DataKey(plaintext=<redacted>, blob={self.blob!r}, version={self.root_version})"


class Opened(NamedTuple):
    """What a blob held, and which KEK and root version sealed it."""

    plaintext: bytes
    root_version: int
    kek_id: bytes | None

    def __repr__(self) -> str:
        return f"Opened(plaintext=<redacted>, root_version={self.root_version})"


class Sealed(NamedTuple):
    """A blob made by ``encrypt`` or ``rewrap``."""

    blob: str
    root_version: int
    kek_id: bytes | None
    expires_at: int | None = None


@dataclass(slots=True)
class _KeyState:
    config: KeyConfig
    root_key: str
    live: _Kek | None = None
    next: _Kek | None = None
    latest_version: int = 0
    min_decryption_version: int = 1
    info: RootKeyInfo | None = None
    last_upstream_error: str | None = None
    kek_rotations: int = 0
    #: When the live KEK was first due for replacement but the backend could not be reached.
    outage_since: float | None = None


class Keyring:
    """Seals and opens blobs for the configured keys.

    ``keys`` maps API names to their config and root-key name. ``now`` (Unix seconds) and
    ``random`` are injectable so rotation and expiry are testable without sleeping.
    """

    def __init__(
        self,
        backend: RootKeyBackend,
        keys: Mapping[str, tuple[KeyConfig, str]],
        *,
        cache_size: int = 1024,
        now: Callable[[], float] = time.time,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.backend = backend
        self._keys = {name: _KeyState(cfg, root) for name, (cfg, root) in keys.items()}
        self._cache: OrderedDict[bytes, _Kek] = OrderedDict()
        self._cache_size = cache_size
        self._inflight: dict[Hashable, asyncio.Future[Any]] = {}
        self._now = now
        self._random = random
        self.cache_hits = 0
        self.cache_misses = 0

    # -- public operations ------------------------------------------------------------------

    def key_names(self) -> list[str]:
        return sorted(self._keys)

    def has_key(self, key_name: str) -> bool:
        return key_name in self._keys

    async def generate_data_key(
        self,
        key_name: str,
        *,
        bits: int = 256,
        context: Mapping[str, str] | None = None,
        associated_data: bytes = b"",
        ttl: float | None = None,
    ) -> DataKey:
        """A fresh DEK of ``bits`` and its blob. ``ttl`` (seconds) bounds when it can be opened."""
        if bits not in DEK_BITS:
            raise InvalidRequest("bits must be 128, 256 or 512.")
        state = self._state(key_name)
        canonical = envelope.canonical_context(context)
        expires_at = self._expiry(ttl)
        kek = self._live_kek_now(state) or await self._rotate_live_kek(key_name, state)
        size = bits // 8
        random = self._random(size + envelope.NONCE_BYTES)  # one call: the DEK and its nonce
        plaintext = random[:size]
        blob = self._seal(kek, plaintext, canonical, associated_data, expires_at, random[size:])
        return DataKey(plaintext, blob, kek.root_version, expires_at, kek.kek_id)

    async def encrypt(
        self,
        key_name: str,
        plaintext: bytes,
        *,
        context: Mapping[str, str] | None = None,
        associated_data: bytes = b"",
        ttl: float | None = None,
    ) -> Sealed:
        """Seal ``plaintext`` into a blob under the live KEK of ``key_name``."""
        state = self._state(key_name)
        canonical = envelope.canonical_context(context)
        expires_at = self._expiry(ttl)
        return await self._seal_live(
            key_name, state, plaintext, canonical, associated_data, expires_at
        )

    def _expiry(self, ttl: float | None) -> int | None:
        """The Unix second after which a blob sealed now with ``ttl`` no longer opens."""
        if ttl is None:
            return None
        if ttl <= 0:
            raise InvalidRequest("ttl must be positive.")
        return int(self._now() + ttl + 0.999)

    async def decrypt(
        self,
        key_name: str,
        blob: str,
        *,
        context: Mapping[str, str] | None = None,
        associated_data: bytes = b"",
    ) -> bytes:
        """The plaintext sealed in ``blob``. Raises ``DecryptionFailed`` for every bad blob."""
        opened = await self.open_blob(
            key_name, blob, context=context, associated_data=associated_data
        )
        return opened.plaintext

    async def open_blob(
        self,
        key_name: str,
        blob: str,
        *,
        context: Mapping[str, str] | None = None,
        associated_data: bytes = b"",
    ) -> Opened:
        """:meth:`decrypt`, also telling which root version and KEK sealed the blob."""
        state = self._state(key_name)
        if blob.startswith("vault:"):
            with self._span("decrypt_ciphertext", state):
                plaintext = await self._upstream(state).decrypt_ciphertext(
                    state.root_key, blob, None
                )
            return Opened(plaintext, _vault_version(blob), None)
        plaintext, header = await self._open_local(
            key_name, state, blob, envelope.canonical_context(context), associated_data
        )
        return Opened(plaintext, header.root_version, header.kek_id)

    async def rewrap(
        self,
        key_name: str,
        blob: str,
        *,
        context: Mapping[str, str] | None = None,
        associated_data: bytes = b"",
    ) -> Sealed:
        """``blob`` sealed again under the live KEK and newest root version; expiry kept."""
        state = self._state(key_name)
        if blob.startswith("vault:"):
            rewrapped = await self._upstream(state).rewrap_ciphertext(state.root_key, blob, None)
            return Sealed(rewrapped, _vault_version(rewrapped), None)
        canonical = envelope.canonical_context(context)
        plaintext, header = await self._open_local(
            key_name, state, blob, canonical, associated_data
        )
        return await self._seal_live(
            key_name, state, plaintext, canonical, associated_data, header.expires_at
        )

    async def rotate(self, key_name: str) -> RootKeyInfo:
        """Rotate the root key in the backend; a symmetric key starts a KEK under the new version.

        The new KEK is made at once so the first request after a rotation waits for nothing.
        """
        state = self._state(key_name)
        with self._span("rotate", state):
            info = await self.backend.rotate(state.root_key)
        self._apply_info(key_name, state, info)
        if info.key_type == "aes256":
            await self._rotate_live_kek(key_name, state)
        return info

    async def key_info(self, key_name: str) -> RootKeyInfo:
        """The root key's metadata, read afresh from the backend."""
        state = self._state(key_name)
        with self._span("key_info", state):
            info = await self.backend.key_info(state.root_key)
        self._apply_info(key_name, state, info)
        return info

    def flush(self, key_name: str | None = None) -> int:
        """Drop cached KEKs (all keys, or one); the next use fetches afresh. Returns how many."""
        names = list(self._keys) if key_name is None else [key_name]
        dropped: set[bytes] = set()
        for name in names:
            state = self._state(name)
            for kek in (state.live, state.next):
                if kek is not None:
                    dropped.add(kek.kek_id)
            state.live = state.next = None
            for kek_id in [k for k, v in self._cache.items() if v.key_name == name]:
                del self._cache[kek_id]
                dropped.add(kek_id)
        return len(dropped)

    async def refresh(self, key_name: str) -> None:
        """Re-read the root key's versions; a newer version retires the live KEK.

        Upstream failures are recorded for health and swallowed: polling must not crash.
        """
        state = self._state(key_name)
        try:
            info = await self.backend.key_info(state.root_key)
        except SidecarError as exc:
            state.last_upstream_error = exc.code
            log.warning("could not refresh key %s: %s", key_name, exc.message)
            return
        state.last_upstream_error = None
        self._apply_info(key_name, state, info)

    async def poll(self, key_name: str) -> None:
        """Refresh ``key_name`` every ``root_poll_interval`` until cancelled."""
        interval = self._state(key_name).config.root_poll_interval
        while True:
            await asyncio.sleep(interval)
            await self.refresh(key_name)

    def status(self) -> dict[str, Any]:
        """KEK ids, ages and uses per key; never key bytes."""
        now = self._now()
        keys: dict[str, Any] = {}
        for name, state in self._keys.items():
            live = state.live
            keys[name] = {
                "root_key": state.root_key,
                "state": self.key_state(name),
                "latest_version": state.latest_version or None,
                "min_decryption_version": state.min_decryption_version,
                "kek_rotations": state.kek_rotations,
                "cached_keks": sum(1 for k in self._cache.values() if k.key_name == name),
                "live_kek": None
                if live is None
                else {
                    "kek_id": live.kek_id.hex(),
                    "root_version": live.root_version,
                    "age_seconds": round(now - live.created_at, 3),
                    "uses": live.uses,
                    "max_uses": state.config.kek_max_uses,
                    "ttl_seconds": state.config.kek_ttl,
                },
            }
        return {
            "keys": keys,
            "kek_cache": {
                "size": len(self._cache),
                "capacity": self._cache_size,
                "hits": self.cache_hits,
                "misses": self.cache_misses,
            },
        }

    def key_state(self, key_name: str) -> str:
        """``ok``, ``degraded`` (serving from a KEK past its end, in grace) or ``unavailable``."""
        state = self._state(key_name)
        live = state.live
        if live is not None and self._fresh(state, live):
            return "ok"
        if live is not None and self._in_grace(state, live):
            return "degraded"
        return "ok" if state.last_upstream_error is None else "unavailable"

    # -- internals --------------------------------------------------------------------------

    def _span(self, operation: str, state: _KeyState) -> AbstractContextManager[Any]:
        """A child span around one backend call (free when tracing is off)."""
        return tracer.start_as_current_span(
            f"upstream {operation}",
            kind=SpanKind.CLIENT,
            attributes={"kms.backend": self.backend.kind, "kms.root_key": state.root_key},
        )

    def _state(self, key_name: str) -> _KeyState:
        state = self._keys.get(key_name)
        if state is None:
            raise PermissionDenied()
        return state

    def _upstream(self, state: _KeyState) -> UpstreamCiphertexts:
        if not isinstance(self.backend, UpstreamCiphertexts):
            raise InvalidRequest(f"The {self.backend.kind} backend has no vault: ciphertexts.")
        return self.backend

    def _seal(
        self,
        kek: _Kek,
        plaintext: bytes,
        context: bytes,
        associated_data: bytes,
        expires_at: int | None,
        nonce: bytes,
    ) -> str:
        header_bytes = kek.header_bytes if expires_at is None else kek.header(expires_at).encode()
        blob = kek.cipher.seal_encoded(
            header_bytes,
            kek.root_version,
            plaintext,
            context=context,
            associated_data=associated_data,
            nonce=nonce,
        )
        kek.uses += 1
        return blob

    async def _open_local(
        self, key_name: str, state: _KeyState, blob: str, context: bytes, associated_data: bytes
    ) -> tuple[bytes, envelope.Header]:
        """The plaintext of a ``sidecar:`` blob and its header. Raises ``DecryptionFailed``."""
        sealed = self._check(key_name, state, envelope.parse(blob))
        kek = await self._kek_for(state, sealed.header)
        plaintext = kek.cipher.open(sealed, context=context, associated_data=associated_data)
        return plaintext, sealed.header

    async def _seal_live(
        self,
        key_name: str,
        state: _KeyState,
        plaintext: bytes,
        context: bytes,
        associated_data: bytes,
        expires_at: int | None,
    ) -> Sealed:
        """``plaintext`` sealed under the live KEK (rotated first if it must be)."""
        kek = self._live_kek_now(state) or await self._rotate_live_kek(key_name, state)
        nonce = self._random(envelope.NONCE_BYTES)
        blob = self._seal(kek, plaintext, context, associated_data, expires_at, nonce)
        return Sealed(blob, kek.root_version, kek.kek_id, expires_at)

    def _check(self, key_name: str, state: _KeyState, sealed: envelope.Sealed) -> envelope.Sealed:
        header = sealed.header
        if header.key_name != key_name:
            raise DecryptionFailed("blob belongs to another key")
        if (
            header.expires_at is not None
            and self._now() > header.expires_at + state.config.expiry_leeway
        ):
            raise DecryptionFailed("blob expired")
        if header.root_version < state.min_decryption_version:
            raise DecryptionFailed("root version below min_decryption_version")
        return sealed

    def _fresh(self, state: _KeyState, kek: _Kek) -> bool:
        cfg = state.config
        return (
            self._now() - kek.created_at < cfg.kek_ttl
            and kek.uses < cfg.kek_max_uses
            and kek.root_version >= state.latest_version
        )

    def _in_grace(self, state: _KeyState, kek: _Kek) -> bool:
        """May ``kek`` still be used while the backend is down?

        Up to ``upstream_grace`` past the end of its life: its TTL, or — for the live KEK — the
        moment it was first due for replacement (its uses ran out) and could not be replaced.
        """
        cfg = state.config
        end = kek.created_at + cfg.kek_ttl
        if kek is state.live and state.outage_since is not None:
            end = min(end, state.outage_since)
        return (
            self._now() < end + cfg.upstream_grace
            and kek.uses < HARD_MAX_USES
            and kek.root_version >= state.min_decryption_version
        )

    def _live_kek_now(self, state: _KeyState) -> _Kek | None:
        """The live KEK if it may seal without waiting; starts the prefetch when it is due."""
        kek = state.live
        if kek is None or not self._fresh(state, kek):
            return None
        if (
            (kek.uses >= kek.prefetch_uses or self._now() >= kek.prefetch_at)
            and state.next is None
            and ("next", kek.key_name) not in self._inflight
        ):
            self._prefetch(kek.key_name, state)
        return kek

    def _prefetch(self, key_name: str, state: _KeyState) -> None:
        async def fetch_next() -> _Kek:
            state.next = await self._fetch_kek(key_name, state)
            return state.next

        future = self._single_flight(("next", key_name), fetch_next)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _rotate_live_kek(self, key_name: str, state: _KeyState) -> _Kek:
        """A KEK that may seal now: the prefetched one, a new one, or in an outage the old one."""
        new = state.next
        if new is None or new.root_version < state.latest_version:
            try:
                new = await self._single_flight(
                    ("next", key_name), lambda: self._fetch_kek(key_name, state)
                )
            except UpstreamUnavailable:
                old = state.live
                if state.outage_since is None:
                    state.outage_since = self._now()
                if old is not None and self._in_grace(state, old):
                    return old
                raise
        if state.live is new or (state.live is not None and self._fresh(state, state.live)):
            return state.live  # another request promoted a KEK while this one waited
        state.next = None
        state.outage_since = None
        if state.live is not None:
            state.kek_rotations += 1
        cfg = state.config
        new.created_at = self._now()
        lead = min(PREFETCH_LEAD_MAX_SECONDS, cfg.kek_ttl * PREFETCH_REMAINING * 10)
        new.prefetch_at = new.created_at + cfg.kek_ttl - lead
        new.prefetch_uses = cfg.kek_max_uses - max(1, int(cfg.kek_max_uses * PREFETCH_REMAINING))
        state.live = new
        log.info(
            "key %s: new KEK %s (root version %d)", key_name, new.kek_id.hex(), new.root_version
        )
        return new

    async def _fetch_kek(self, key_name: str, state: _KeyState) -> _Kek:
        try:
            with self._span("generate_kek", state):
                made = await self.backend.generate_kek(state.root_key)
        except UpstreamUnavailable as exc:
            state.last_upstream_error = exc.code
            raise
        state.last_upstream_error = None
        kek = _Kek(
            key_name=key_name,
            kek_id=envelope.kek_id_for(key_name, made.wrapped),
            cipher=envelope.KekCipher(made.plaintext),
            wrapped=made.wrapped,
            root_version=made.root_version,
            created_at=self._now(),
        )
        state.latest_version = max(state.latest_version, made.root_version)
        self._remember(kek)
        return kek

    async def _kek_for(self, state: _KeyState, header: envelope.Header) -> _Kek:
        cached = self._cache.get(header.kek_id)
        if cached is not None and cached.wrapped == header.wrapped_kek:
            age = self._now() - cached.created_at
            if age < state.config.kek_ttl or cached is state.live or cached is state.next:
                self._cache.move_to_end(header.kek_id)
                self.cache_hits += 1
                return cached
        self.cache_misses += 1
        try:
            return await self._single_flight(
                ("unwrap", header.kek_id), lambda: self._unwrap(state, header)
            )
        except UpstreamUnavailable:
            if (
                cached is not None
                and cached.wrapped == header.wrapped_kek
                and self._in_grace(state, cached)
            ):
                return cached
            raise

    async def _unwrap(self, state: _KeyState, header: envelope.Header) -> _Kek:
        with self._span("unwrap_kek", state):
            plaintext = await self.backend.unwrap_kek(state.root_key, header.wrapped_kek)
        try:
            cipher = envelope.KekCipher(plaintext)
        except ValueError:
            raise DecryptionFailed("backend returned a KEK of the wrong size") from None
        kek = _Kek(
            key_name=header.key_name,
            kek_id=header.kek_id,
            cipher=cipher,
            wrapped=header.wrapped_kek,
            root_version=header.root_version,
            created_at=self._now(),
        )
        self._remember(kek)
        return kek

    def _remember(self, kek: _Kek) -> None:
        self._cache[kek.kek_id] = kek
        self._cache.move_to_end(kek.kek_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _apply_info(self, key_name: str, state: _KeyState, info: RootKeyInfo) -> None:
        state.info = info
        if info.latest_version > state.latest_version:
            log.info("key %s: root version %d is now the latest", key_name, info.latest_version)
        state.latest_version = max(state.latest_version, info.latest_version)
        if info.min_decryption_version != state.min_decryption_version:
            state.min_decryption_version = info.min_decryption_version
            for kek_id in [
                k
                for k, v in self._cache.items()
                if v.key_name == key_name and v.root_version < info.min_decryption_version
            ]:
                del self._cache[kek_id]
            if state.live is not None and state.live.root_version < info.min_decryption_version:
                state.live = None

    def _single_flight(
        self, flight: Hashable, start: Callable[[], Awaitable[_T]]
    ) -> asyncio.Future[_T]:
        """One running call per ``flight``; every concurrent caller shares its result."""
        future = self._inflight.get(flight)
        if future is None:
            future = asyncio.ensure_future(start())
            self._inflight[flight] = future
            future.add_done_callback(lambda _: self._inflight.pop(flight, None))
        return asyncio.shield(future)


def _vault_version(ciphertext: str) -> int:
    """N in ``vault:vN:…`` (0 when the prefix is malformed; upstream refuses those anyway)."""
    version = ciphertext.split(":", 2)[1] if ciphertext.count(":") >= 2 else ""
    return int(version[1:]) if version[:1] == "v" and version[1:].isdigit() else 0
