"""``vault:vN:…`` ciphertexts: passed to the upstream transit key of the same name, unchanged.

Apps that used Vault directly can move to the sidecar without re-encrypting: their ciphertexts
are decrypted and rewrapped by the upstream (backends that have no such ciphertexts refuse).
"""

from __future__ import annotations

from typing import Final

from sidecar.backends.base import RootKeyBackend, UpstreamCiphertexts
from sidecar.errors import InvalidRequest

PREFIX: Final = "vault:"


def is_upstream_ciphertext(blob: str) -> bool:
    """Whether ``blob`` is an upstream ``vault:`` ciphertext rather than a sidecar blob."""
    return blob.startswith(PREFIX)


def upstream_of(backend: RootKeyBackend) -> UpstreamCiphertexts:
    """``backend`` as one that opens ``vault:`` ciphertexts. Raises ``InvalidRequest`` if not."""
    if not isinstance(backend, UpstreamCiphertexts):
        raise InvalidRequest(f"The {backend.kind} backend has no vault: ciphertexts.")
    return backend


async def decrypt(backend: RootKeyBackend, root_key: str, ciphertext: str) -> tuple[bytes, int]:
    """The plaintext of an upstream ciphertext and its root version."""
    plaintext = await upstream_of(backend).decrypt_ciphertext(root_key, ciphertext, None)
    return plaintext, vault_version(ciphertext)


async def rewrap(backend: RootKeyBackend, root_key: str, ciphertext: str) -> tuple[str, int]:
    """An upstream ciphertext rewrapped upstream under the newest version, and that version."""
    rewrapped = await upstream_of(backend).rewrap_ciphertext(root_key, ciphertext, None)
    return rewrapped, vault_version(rewrapped)


def vault_version(ciphertext: str) -> int:
    """N in ``vault:vN:…`` (0 when the prefix is malformed; upstream refuses those anyway)."""
    version = ciphertext.split(":", 2)[1] if ciphertext.count(":") >= 2 else ""
    digits = version[1:]  # ASCII only and short: int() refuses "²" and over 4300 digits
    ok = version[:1] == "v" and 0 < len(digits) <= 10 and digits.isascii() and digits.isdigit()
    return int(digits) if ok else 0
