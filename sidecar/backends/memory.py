"""An in-memory backend: the test double shipped beside the real ones.

It keeps "root keys" as version counters and remembers each KEK it made under an opaque random
handle, so it never needs a cipher. It counts calls, can be made unreachable, and is only for
tests and benchmarks: nothing it holds survives the process.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac as hmac_lib
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from sidecar.backends.base import HMAC_ALGORITHMS, KEY_TYPES, NewKek, RootKeyInfo
from sidecar.errors import (
    DecryptionFailed,
    InvalidRequest,
    PermissionDenied,
    UpstreamError,
    UpstreamUnavailable,
)


class MemoryBackend:
    """A fake root-key backend. ``delay`` (seconds) is awaited in every call."""

    kind = "memory"

    def __init__(
        self,
        keys: Mapping[str, str] | None = None,
        *,
        delay: float = 0.0,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._types: dict[str, str] = dict(keys or {})
        self._latest: dict[str, int] = dict.fromkeys(self._types, 1)
        self._min_decryption: dict[str, int] = dict.fromkeys(self._types, 1)
        self._keks: dict[bytes, tuple[str, int, bytes]] = {}
        #: (root key, version) → its HMAC key and when the version was made.
        self._hmac_keys: dict[tuple[str, int], bytes] = {}
        self._created: dict[tuple[str, int], int] = {}
        self._random = random
        self.delay = delay
        self.available = True
        self.calls: Counter[str] = Counter()

    async def _call(self, name: str, root_key: str) -> None:
        self.calls[name] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if not self.available:
            raise UpstreamUnavailable()
        if name != "create" and root_key not in self._types:
            raise PermissionDenied()

    async def generate_kek(self, root_key: str) -> NewKek:
        await self._call("generate_kek", root_key)
        if self._types[root_key] != "aes256":  # as transit refuses datakey on a signing key
            raise UpstreamError("The key backend rejected datakey: key type does not support it.")
        version = self._latest[root_key]
        plaintext = self._random(32)
        handle = f"mem:v{version}:".encode() + self._random(16).hex().encode()
        self._keks[handle] = (root_key, version, plaintext)
        return NewKek(plaintext=plaintext, wrapped=handle, root_version=version)

    async def unwrap_kek(self, root_key: str, wrapped: bytes) -> bytes:
        await self._call("unwrap_kek", root_key)
        found = self._keks.get(wrapped)
        if found is None or found[0] != root_key:
            raise DecryptionFailed("unknown wrapped KEK")
        if found[1] < self._min_decryption[root_key]:
            raise DecryptionFailed("root version below min_decryption_version")
        return found[2]

    async def key_info(self, root_key: str) -> RootKeyInfo:
        await self._call("key_info", root_key)
        return self._info(root_key)

    async def rotate(self, root_key: str) -> RootKeyInfo:
        await self._call("rotate", root_key)
        self._latest[root_key] += 1
        return self._info(root_key)

    async def create(self, root_key: str, key_type: str) -> RootKeyInfo:
        await self._call("create", root_key)
        if key_type not in KEY_TYPES:
            raise InvalidRequest(f"Unknown key type {key_type!r}.")
        if root_key not in self._types:
            self._types[root_key] = key_type
            self._latest[root_key] = 1
            self._min_decryption[root_key] = 1
        return self._info(root_key)

    async def list_keys(self) -> list[str]:
        self.calls["list_keys"] += 1
        return sorted(self._types)

    async def destroy(self, root_key: str) -> None:
        await self._call("destroy", root_key)
        for handle in [h for h, (k, _, _) in self._keks.items() if k == root_key]:
            del self._keks[handle]
        del self._types[root_key], self._latest[root_key], self._min_decryption[root_key]

    async def hmac(
        self, root_key: str, data: bytes, *, algorithm: str, key_version: int | None = None
    ) -> tuple[str, int]:
        await self._call("hmac", root_key)
        version = self._latest[root_key] if key_version is None else key_version
        if not self._min_decryption[root_key] <= version <= self._latest[root_key]:
            raise InvalidRequest(f"Key {root_key!r} has no version {version} to HMAC with.")
        mac = self._mac(root_key, version, data, algorithm)
        return f"vault:v{version}:{base64.b64encode(mac).decode()}", version

    async def verify_hmac(self, root_key: str, data: bytes, hmac: str, *, algorithm: str) -> bool:
        await self._call("verify_hmac", root_key)
        prefix, _, rest = hmac.partition(":v")
        version_text, _, encoded = rest.partition(":")
        if prefix != "vault" or not version_text.isdigit():
            raise InvalidRequest("Field 'hmac' is not an HMAC this backend made.")
        try:
            given = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise InvalidRequest("Field 'hmac' is not an HMAC this backend made.") from None
        version = int(version_text)
        if not self._min_decryption[root_key] <= version <= self._latest[root_key]:
            return False
        return hmac_lib.compare_digest(given, self._mac(root_key, version, data, algorithm))

    def _mac(self, root_key: str, version: int, data: bytes, algorithm: str) -> bytes:
        assert algorithm in HMAC_ALGORITHMS
        secret = self._hmac_keys.setdefault((root_key, version), self._random(32))
        digest = algorithm.replace("sha2-", "sha").replace("sha3-", "sha3_")
        return hmac_lib.new(secret, data, getattr(hashlib, digest)).digest()

    def set_min_decryption_version(self, root_key: str, version: int) -> None:
        """What an operator raising ``min_decryption_version`` upstream does."""
        self._min_decryption[root_key] = version

    def status(self) -> Mapping[str, Any]:
        return {"kind": self.kind, "state": "ok" if self.available else "unavailable"}

    async def close(self) -> None:
        return None

    def _info(self, root_key: str) -> RootKeyInfo:
        versions = range(self._min_decryption[root_key], self._latest[root_key] + 1)
        now = int(time.time())  # versions first seen now were made now
        return RootKeyInfo(
            name=root_key,
            key_type=self._types[root_key],
            latest_version=self._latest[root_key],
            min_decryption_version=self._min_decryption[root_key],
            created={v: self._created.setdefault((root_key, v), now) for v in versions},
        )
