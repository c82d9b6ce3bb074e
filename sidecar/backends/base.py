"""The small interface every root-key backend implements.

A backend owns root keys and never lets them out. It makes KEKs (256-bit keys returned both in
plaintext and wrapped under the root key) and unwraps them again. Each backend translates its
library's exceptions in exactly one place into ``UpstreamUnavailable`` (could not reach it),
``UpstreamError`` (it refused or failed), ``PermissionDenied`` (no such key) or
``DecryptionFailed`` (the wrapped bytes are not ours); anything else is a bug and propagates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

#: Key types ``create`` accepts.
KEY_TYPES = ("aes256", "ec-p256", "ed25519")
#: Our key types → Vault transit's names, which the API shows.
TRANSIT_TYPES = {"aes256": "aes256-gcm96", "ec-p256": "ecdsa-p256", "ed25519": "ed25519"}
#: The HMAC algorithms ``hmac`` and ``verify_hmac`` take (Vault transit's names).
HMAC_ALGORITHMS = (
    "sha2-224",
    "sha2-256",
    "sha2-384",
    "sha2-512",
    "sha3-224",
    "sha3-256",
    "sha3-384",
    "sha3-512",
)


@dataclass(frozen=True, slots=True)
class NewKek:
    """A freshly made KEK: its plaintext (sidecar memory only) and its root-wrapped form."""

    plaintext: bytes = field(repr=False)
    wrapped: bytes
    root_version: int


@dataclass(frozen=True, slots=True)
class RootKeyInfo:
    """What a backend tells about a root key. ``public_keys`` maps version to PEM."""

    name: str
    key_type: str
    latest_version: int
    min_decryption_version: int
    public_keys: Mapping[int, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: Version → when it was made (Unix seconds), where the backend knows.
    created: Mapping[int, int] = field(default_factory=dict)


@runtime_checkable
class RootKeyBackend(Protocol):
    """A home for root keys. All methods may raise the errors listed in the module docstring."""

    #: ``vault`` or ``pkcs11``; shown in status and key metadata.
    kind: str

    async def generate_kek(self, root_key: str) -> NewKek:
        """Make a 256-bit KEK under the latest version of ``root_key``."""

    async def unwrap_kek(self, root_key: str, wrapped: bytes) -> bytes:
        """The plaintext of a KEK wrapped by ``generate_kek``; ``DecryptionFailed`` if not ours."""

    async def key_info(self, root_key: str) -> RootKeyInfo:
        """Versions and type of ``root_key``; ``PermissionDenied`` if it does not exist."""

    async def rotate(self, root_key: str) -> RootKeyInfo:
        """Add a new version of ``root_key``; older versions stay for unwrapping."""

    async def create(self, root_key: str, key_type: str) -> RootKeyInfo:
        """Create ``root_key`` of ``key_type`` (one of ``KEY_TYPES``); no-op if it exists."""

    async def list_keys(self) -> list[str]:
        """The names of the root keys this backend holds."""

    async def destroy(self, root_key: str) -> None:
        """Delete every version of ``root_key`` for good (crypto-shredding)."""

    async def hmac(
        self, root_key: str, data: bytes, *, algorithm: str, key_version: int | None = None
    ) -> tuple[str, int]:
        """The HMAC of ``data`` under version ``key_version`` (``None``: the latest) of
        ``root_key``, as Vault writes it (``vault:vN:<base64>``), and N.

        ``algorithm`` is one of ``HMAC_ALGORITHMS``. ``InvalidRequest`` where the backend cannot
        make HMACs with this key, or has no such version.
        """

    async def verify_hmac(self, root_key: str, data: bytes, hmac: str, *, algorithm: str) -> bool:
        """Whether ``hmac`` (as :meth:`hmac` writes it) is the HMAC of ``data``.

        ``InvalidRequest`` for a malformed ``hmac`` or where the backend cannot verify.
        """

    def status(self) -> Mapping[str, Any]:
        """The backend's state for health and status pages (never secrets)."""

    async def close(self) -> None:
        """Release connections and threads."""


@runtime_checkable
class UpstreamCiphertexts(Protocol):
    """Optional: a backend that can open its own native ciphertexts (``vault:vN:…``).

    Lets applications that encrypted with Vault directly move to the sidecar unchanged.
    """

    async def decrypt_ciphertext(
        self, root_key: str, ciphertext: str, context: bytes | None
    ) -> bytes:
        """The plaintext of an upstream ciphertext; ``DecryptionFailed`` if it does not open."""

    async def rewrap_ciphertext(self, root_key: str, ciphertext: str, context: bytes | None) -> str:
        """The same ciphertext moved to the latest version upstream, plaintext never returned."""
