"""HMACs with the root keys' HMAC keys, through the backend (transit ``hmac`` upstream).

The key bytes never leave the backend: OpenBao keeps an HMAC key per transit key version and
answers ``vault:vN:<base64>``; a backend that cannot (the pkcs11 one) refuses with
``InvalidRequest``. API key names map to root key names as for every other operation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from sidecar.backends.base import HMAC_ALGORITHMS, RootKeyBackend
from sidecar.errors import InvalidRequest

DEFAULT_HMAC_ALGORITHM = "sha2-256"


class Hmac(NamedTuple):
    """An HMAC as Vault writes it (``vault:vN:<base64>``) and the key version N."""

    hmac: str
    key_version: int


def hmac_algorithm(value: object, where: str) -> str:
    """``value`` as one of ``HMAC_ALGORITHMS``; ``InvalidRequest`` naming ``where`` otherwise."""
    if value is None or value == "":
        return DEFAULT_HMAC_ALGORITHM
    if not isinstance(value, str) or value not in HMAC_ALGORITHMS:
        raise InvalidRequest(
            f"Unsupported algorithm in {where}; use one of {', '.join(HMAC_ALGORITHMS)}."
        )
    return value


class HmacKeys:
    """Makes and checks HMACs under the configured keys' root keys."""

    def __init__(self, backend: RootKeyBackend, root_key_name: Callable[[str], str]) -> None:
        self._backend = backend
        self._root_key_name = root_key_name

    async def hmac(
        self, key_name: str, data: bytes, *, algorithm: str, key_version: int | None = None
    ) -> Hmac:
        """The HMAC of ``data`` under ``key_version`` (``None``: the latest) of ``key_name``."""
        mac, version = await self._backend.hmac(
            self._root_key_name(key_name), data, algorithm=algorithm, key_version=key_version
        )
        return Hmac(mac, version)

    async def verify(self, key_name: str, data: bytes, hmac: str, *, algorithm: str) -> bool:
        """Whether ``hmac`` is the HMAC of ``data`` under the version it names."""
        return await self._backend.verify_hmac(
            self._root_key_name(key_name), data, hmac, algorithm=algorithm
        )
