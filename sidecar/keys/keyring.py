"""The :class:`Keyring`: issues data keys, seals, opens and rewraps blobs for each key.

One *live* KEK per key seals new blobs; when it must be replaced and when it may still be used
are :mod:`sidecar.keys.kek_policy`'s rules. KEKs needed to open blobs are unwrapped by the
backend once — concurrent requests share one call — and kept in :mod:`sidecar.keys.kek_cache`.
``vault:`` ciphertexts go to the upstream (:mod:`sidecar.keys.passthrough`). :meth:`Keyring.status`
reports :mod:`sidecar.keys.status` objects.

While the backend is unreachable, a live KEK keeps sealing for ``upstream_grace`` past its normal
end, and cached KEKs keep opening blobs for as long; requests that truly need the backend get
``UpstreamUnavailable``, never ``DecryptionFailed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from opentelemetry.trace import SpanKind

from sidecar.backends.base import TRANSIT_TYPES, RootKeyBackend, RootKeyInfo
from sidecar.config import KeyConfig
from sidecar.errors import (
    DecryptionFailed,
    InvalidRequest,
    PermissionDenied,
    SidecarError,
    UpstreamError,
    UpstreamUnavailable,
)
from sidecar.keys import envelope, kek_policy, passthrough
from sidecar.keys.kek_cache import Kek, KekCache, RefusedKeks, SingleFlight
from sidecar.keys.results import NewDataKey, Opened, SealedBlob, check_bits
from sidecar.keys.status import (
    KekCacheStatus,
    KeyringStatus,
    KeyState,
    KeyStatus,
    LiveKekStatus,
)
from sidecar.tracing import tracer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _KeyState:
    name: str
    config: KeyConfig
    root_key: str
    live: Kek | None = None
    next: Kek | None = None
    latest_version: int = 0
    min_decryption_version: int = 1
    info: RootKeyInfo | None = None
    last_upstream_error: str | None = None
    kek_rotations: int = 0
    #: When the live KEK was first due for replacement but the backend could not be reached.
    outage_since: float | None = None
    #: Why the backend refuses this root key (destroyed, or no longer ours); its KEKs are gone.
    revoked: str | None = None


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
        self._keys = {name: _KeyState(name, cfg, root) for name, (cfg, root) in keys.items()}
        self._cache = KekCache(cache_size)
        self._refused = RefusedKeks()
        self._flights = SingleFlight()
        self._now = now
        self._random = random

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
    ) -> NewDataKey:
        """A fresh DEK of ``bits`` and its blob. ``ttl`` (seconds) bounds when it can be opened."""
        check_bits(bits)
        state = self._symmetric_state(key_name)
        canonical = envelope.canonical_context(context)
        expires_at = self._expiry(ttl)
        kek = self._live_kek_now(state) or await self._rotate_live_kek(key_name, state)
        size = bits // 8
        random = self._random(size + envelope.NONCE_BYTES)  # one call: the DEK and its nonce
        plaintext = random[:size]
        blob = self._seal(kek, plaintext, canonical, associated_data, expires_at, random[size:])
        return NewDataKey(plaintext, blob, kek.root_version, expires_at, kek.kek_id)

    async def encrypt(
        self,
        key_name: str,
        plaintext: bytes,
        *,
        context: Mapping[str, str] | None = None,
        associated_data: bytes = b"",
        ttl: float | None = None,
    ) -> SealedBlob:
        """Seal ``plaintext`` into a blob under the live KEK of ``key_name``."""
        state = self._symmetric_state(key_name)
        canonical = envelope.canonical_context(context)
        expires_at = self._expiry(ttl)
        return await self._seal_live(
            key_name, state, plaintext, canonical, associated_data, expires_at
        )

    def _expiry(self, ttl: float | None) -> int | None:
        """The Unix second after which a blob sealed now with ``ttl`` no longer opens."""
        if ttl is None:
            return None
        return envelope.expiry_after(self._now(), ttl)

    async def open_blob(
        self,
        key_name: str,
        blob: str,
        *,
        context: Mapping[str, str] | None = None,
        associated_data: bytes = b"",
    ) -> Opened:
        """The plaintext sealed in ``blob``, and which root version and KEK sealed it.

        Raises ``DecryptionFailed`` for every bad blob (wrong key, context, tampered byte,
        expired, unknown KEK); ``UpstreamUnavailable`` when the backend is needed and down.
        """
        state = self._symmetric_state(key_name)
        if passthrough.is_upstream_ciphertext(blob):
            with self._backend_call("decrypt_ciphertext", state):
                plaintext, version = await passthrough.decrypt(self.backend, state.root_key, blob)
            return Opened(plaintext, version, None)
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
    ) -> SealedBlob:
        """``blob`` sealed again under the live KEK and newest root version; expiry kept."""
        state = self._symmetric_state(key_name)
        if passthrough.is_upstream_ciphertext(blob):
            with self._backend_call("rewrap_ciphertext", state):
                rewrapped, version = await passthrough.rewrap(self.backend, state.root_key, blob)
            return SealedBlob(rewrapped, version, None)
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
        with self._backend_call("rotate", state):
            info = await self.backend.rotate(state.root_key)
        self._apply_info(key_name, state, info)
        if info.key_type == "aes256":
            await self._rotate_live_kek(key_name, state)
        return info

    async def key_info(self, key_name: str) -> RootKeyInfo:
        """The root key's metadata, read afresh from the backend."""
        state = self._state(key_name)
        with self._backend_call("key_info", state):
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
            dropped |= self._cache.drop(name)
        if key_name is None:
            self._refused.clear()
        return len(dropped)

    async def refresh(self, key_name: str) -> None:
        """Re-read the root key's versions and config (the poll, every ``root_poll_interval``).

        A newer version retires the live KEK; a raised ``min_decryption_version`` drops the KEKs
        below it; a root key the backend no longer has, or refuses, is revoked (every KEK
        dropped, every use refused) until a later refresh finds it again. An unreachable backend
        is recorded for health. Never raises for the backend's answer: polling must not crash.
        """
        state = self._state(key_name)
        try:
            with self._backend_call("key_info", state):
                info = await self.backend.key_info(state.root_key)
        except UpstreamUnavailable as exc:
            log.warning("could not refresh key %s: %s", key_name, exc.message)
            return
        except PermissionDenied:
            return  # revoked by _backend_call
        except SidecarError as exc:  # the backend refuses this sidecar the key (403 and the like)
            self._revoke(state, f"the key backend refuses the root key: {exc.message}")
            return
        self._apply_info(key_name, state, info)

    async def poll(self, key_name: str) -> None:
        """Refresh ``key_name`` every ``root_poll_interval`` until cancelled."""
        interval = self._state(key_name).config.root_poll_interval
        while True:
            await asyncio.sleep(interval)
            await self.refresh(key_name)

    def status(self) -> KeyringStatus:
        """KEK ids, ages and uses per key, and the KEK cache's figures; never key bytes."""
        now = self._now()
        keys: dict[str, KeyStatus] = {}
        for name, state in self._keys.items():
            live = state.live
            keys[name] = KeyStatus(
                root_key=state.root_key,
                state=self.key_state(name),
                problem=self.key_problem(name),
                latest_version=state.latest_version or None,
                min_decryption_version=state.min_decryption_version,
                kek_rotations=state.kek_rotations,
                cached_keks=self._cache.count(name),
                live_kek=None
                if live is None
                else LiveKekStatus(
                    kek_id=live.kek_id.hex(),
                    root_version=live.root_version,
                    age_seconds=round(now - live.created_at, 3),
                    uses=live.uses,
                    max_uses=state.config.kek_max_uses,
                    ttl_seconds=state.config.kek_ttl,
                ),
            )
        cache = self._cache
        return KeyringStatus(
            keys=keys,
            kek_cache=KekCacheStatus(len(cache), cache.capacity, cache.hits, cache.misses),
        )

    def key_state(self, key_name: str) -> KeyState:
        """Whether ``key_name`` can issue now (see :data:`~sidecar.keys.status.KeyState`).

        ``ok``: the live KEK may seal, or the backend answered its last call. ``degraded``: the
        backend is unreachable and the live KEK seals in its grace period. ``unavailable``: the
        backend is unreachable and no KEK may seal. ``revoked``: the backend has no such root key
        (or refuses it to this sidecar); its KEKs were dropped.
        """
        state = self._state(key_name)
        if state.revoked is not None:
            return "revoked"
        live = state.live
        if live is not None and self._fresh(state, live):
            return "ok"
        if state.last_upstream_error != UpstreamUnavailable.code:
            return "ok"  # the next issuance asks the backend, which answered last time
        if live is not None and self._in_grace(state, live):
            return "degraded"
        return "unavailable"

    def key_problem(self, key_name: str) -> str | None:
        """Why ``key_name`` is not ``ok``, in words for health and status (``None`` when it is)."""
        state = self._state(key_name)
        match self.key_state(key_name):
            case "revoked":
                return state.revoked
            case "degraded":
                return "the key backend is unreachable; issuing under the live KEK's grace period"
            case "unavailable":
                return "the key backend is unreachable and no KEK may issue"
        return None

    # -- internals --------------------------------------------------------------------------

    def _state(self, key_name: str) -> _KeyState:
        state = self._keys.get(key_name)
        if state is None:
            raise PermissionDenied()
        return state

    def _symmetric_state(self, key_name: str) -> _KeyState:
        """The state of a key that seals blobs; an asymmetric one is refused without a call.

        The type comes from the cached metadata (read at start and every poll); until it is
        known, :meth:`_fetch_kek` finds out when the backend refuses.
        """
        state = self._state(key_name)
        info = state.info
        if info is not None and info.key_type != "aes256":
            kind = TRANSIT_TYPES.get(info.key_type, info.key_type)
            raise InvalidRequest(
                f"Key {key_name!r} is an {kind} key: it signs and verifies, and has no data "
                "keys or ciphertexts."
            )
        return state

    @contextlib.contextmanager
    def _backend_call(self, operation: str, state: _KeyState) -> Iterator[None]:
        """One backend call for ``state``'s root key, in a child span, its outcome recorded.

        ``UpstreamUnavailable`` marks the upstream down for this key; ``PermissionDenied`` (the
        backend says the root key does not exist) revokes the key: its KEKs are dropped at once.
        """
        with tracer.start_as_current_span(
            f"upstream {operation}",
            kind=SpanKind.CLIENT,
            attributes={"kms.backend": self.backend.kind, "kms.root_key": state.root_key},
        ):
            try:
                yield
            except UpstreamUnavailable as exc:
                state.last_upstream_error = exc.code
                raise
            except PermissionDenied:
                state.last_upstream_error = None
                self._revoke(state, "the key backend has no such root key (destroyed?)")
                raise
        state.last_upstream_error = None

    def _revoke(self, state: _KeyState, reason: str) -> None:
        """Drop every KEK of ``state``'s key and refuse it until the backend shows it again."""
        if state.revoked is None:
            log.warning("key %s: %s; its KEKs are dropped", state.name, reason)
        state.revoked = reason
        state.live = state.next = None
        self._cache.drop(state.name)

    def _seal(
        self,
        kek: Kek,
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
        if state.revoked is not None:
            raise PermissionDenied()
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
    ) -> SealedBlob:
        """``plaintext`` sealed under the live KEK (rotated first if it must be)."""
        kek = self._live_kek_now(state) or await self._rotate_live_kek(key_name, state)
        nonce = self._random(envelope.NONCE_BYTES)
        blob = self._seal(kek, plaintext, context, associated_data, expires_at, nonce)
        return SealedBlob(blob, kek.root_version, kek.kek_id, expires_at)

    def _check(
        self, key_name: str, state: _KeyState, sealed: envelope.ParsedBlob
    ) -> envelope.ParsedBlob:
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

    def _fresh(self, state: _KeyState, kek: Kek) -> bool:
        return kek_policy.is_fresh(kek, state.config, state.latest_version, self._now())

    def _in_grace(self, state: _KeyState, kek: Kek) -> bool:
        return kek_policy.in_grace(
            kek,
            state.config,
            min_decryption_version=state.min_decryption_version,
            outage_since=state.outage_since if kek is state.live else None,
            now=self._now(),
        )

    def _live_kek_now(self, state: _KeyState) -> Kek | None:
        """The live KEK if it may seal without waiting; starts the prefetch when it is due."""
        if state.revoked is not None:
            raise PermissionDenied()
        kek = state.live
        now = self._now()
        if kek is None or not kek_policy.is_fresh(kek, state.config, state.latest_version, now):
            return None
        if (
            kek_policy.prefetch_due(kek, now)
            and state.next is None
            and ("next", kek.key_name) not in self._flights
        ):
            self._prefetch(kek.key_name, state)
        return kek

    def _prefetch(self, key_name: str, state: _KeyState) -> None:
        async def fetch_next() -> Kek:
            state.next = await self._fetch_kek(key_name, state)
            return state.next

        future = self._flights.run(("next", key_name), fetch_next)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _rotate_live_kek(self, key_name: str, state: _KeyState) -> Kek:
        """A KEK that may seal now: the prefetched one, a new one, or in an outage the old one."""
        new = state.next
        if new is None or new.root_version < state.latest_version:
            try:
                new = await self._flights.run(
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
        kek_policy.go_live(new, state.config, self._now())
        state.live = new
        log.info(
            "key %s: new KEK %s (root version %d)", key_name, new.kek_id.hex(), new.root_version
        )
        return new

    async def _fetch_kek(self, key_name: str, state: _KeyState) -> Kek:
        try:
            with self._backend_call("generate_kek", state):
                made = await self.backend.generate_kek(state.root_key)
        except UpstreamUnavailable:
            raise
        except UpstreamError:
            if state.info is None:  # perhaps an asymmetric key: say so, and never ask again
                await self.refresh(key_name)
                self._symmetric_state(key_name)
            raise
        kek = Kek(
            key_name=key_name,
            kek_id=envelope.kek_id_for(key_name, made.wrapped),
            cipher=envelope.KekCipher(made.plaintext),
            wrapped=made.wrapped,
            root_version=made.root_version,
            created_at=self._now(),
        )
        state.latest_version = max(state.latest_version, made.root_version)
        self._cache.put(kek)
        return kek

    async def _kek_for(self, state: _KeyState, header: envelope.Header) -> Kek:
        """The KEK that sealed a blob: from the cache while the backend's word on it is recent.

        A cached KEK opens blobs for ``kek_ttl`` after the backend last made or unwrapped it (the
        live KEK included); then the backend is asked again, once for all waiting requests. While
        the backend is unreachable the cached KEK keeps opening for ``upstream_grace`` more
        (:func:`~sidecar.keys.kek_policy.in_grace`). A KEK the backend refused is refused
        locally for :data:`~sidecar.keys.kek_cache.REFUSED_SECONDS`.
        """
        now = self._now()
        cached = self._cache.get(header.kek_id, header.wrapped_kek)
        if cached is not None and kek_policy.may_open(cached, state.config, now):
            return self._cache.hit(cached)
        if self._refused.holds(header.kek_id, now):
            raise DecryptionFailed("the backend refused this blob's KEK moments ago")
        self._cache.miss()
        try:
            return await self._flights.run(
                ("unwrap", header.kek_id), lambda: self._unwrap(state, header)
            )
        except UpstreamUnavailable:
            if cached is not None and self._in_grace(state, cached):
                return cached
            raise

    async def _unwrap(self, state: _KeyState, header: envelope.Header) -> Kek:
        try:
            with self._backend_call("unwrap_kek", state):
                plaintext = await self.backend.unwrap_kek(state.root_key, header.wrapped_kek)
            try:
                cipher = envelope.KekCipher(plaintext)
            except ValueError:
                raise DecryptionFailed("backend returned a KEK of the wrong size") from None
        except DecryptionFailed:
            self._refused.add(header.kek_id, self._now())
            raise
        kek = Kek(
            key_name=header.key_name,
            kek_id=header.kek_id,
            cipher=cipher,
            wrapped=header.wrapped_kek,
            root_version=header.root_version,
            created_at=self._now(),
        )
        self._cache.put(kek)
        return kek

    def _apply_info(self, key_name: str, state: _KeyState, info: RootKeyInfo) -> None:
        state.info = info
        if state.revoked is not None:
            log.info("key %s: the key backend has the root key again", key_name)
            state.revoked = None
        if info.latest_version > state.latest_version:
            log.info("key %s: root version %d is now the latest", key_name, info.latest_version)
        state.latest_version = max(state.latest_version, info.latest_version)
        if info.min_decryption_version != state.min_decryption_version:
            state.min_decryption_version = info.min_decryption_version
            self._cache.drop(key_name, below_version=info.min_decryption_version)
            if state.live is not None and state.live.root_version < info.min_decryption_version:
                state.live = None
