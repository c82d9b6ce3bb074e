"""Root-key backends: where root keys live and KEKs are made and unwrapped."""

from __future__ import annotations

from sidecar.backends.base import RootKeyBackend
from sidecar.config import Config


def open_backend(config: Config) -> RootKeyBackend:
    """The backend ``config.backend.type`` names, built but not yet connected."""
    if config.backend.type == "pkcs11":
        from sidecar.backends.pkcs11 import Pkcs11Backend

        return Pkcs11Backend(config.backend.pkcs11, resolve_path=config.resolve_path)
    from sidecar.backends.vault import VaultBackend

    return VaultBackend(config.backend.vault, resolve_path=config.resolve_path)
