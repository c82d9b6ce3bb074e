"""Key metadata as Vault transit shapes it (``GET /v1/transit/keys/:name``, and ``rotate``).

``keys`` maps each live version to when it was made: Unix seconds for symmetric keys; for
asymmetric keys an object with ``creation_time`` (RFC 3339), ``name`` (``P-256``, ``ed25519``)
and ``public_key`` — PEM for ECDSA, raw base64 for ed25519, as Vault gives them. A version whose
creation time the backend does not know (a PKCS#11 token keeps none) shows ``0``, or the epoch.
``type`` is Vault's name. The sidecar adds ``backend``, ``root_key`` and ``kek`` (its KEK state,
never key bytes).
"""

from __future__ import annotations

import base64
import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from sidecar.backends.base import TRANSIT_TYPES, RootKeyInfo
from sidecar.server.routes import HandlerCall

#: Vault's ``name`` of an asymmetric key version, by our key type.
_CURVE_NAMES = {"ec-p256": "P-256", "ed25519": "ed25519"}


def key_metadata(call: HandlerCall, name: str, info: RootKeyInfo) -> dict[str, Any]:
    """The ``data`` of a key read: Vault's fields, then the sidecar's."""
    keyring = call.services.keyring
    symmetric = info.key_type == "aes256"
    versions = range(info.min_decryption_version, info.latest_version + 1)
    return {
        "name": name,
        "type": TRANSIT_TYPES.get(info.key_type, info.key_type),
        "latest_version": info.latest_version,
        "min_decryption_version": info.min_decryption_version,
        "min_encryption_version": 0,
        "keys": {str(v): _version_entry(info, v) for v in versions},
        "supports_encryption": symmetric,
        "supports_decryption": symmetric,
        "supports_derivation": False,
        "supports_signing": not symmetric,
        "exportable": False,
        "deletion_allowed": bool(info.extra.get("deletion_allowed", False)),
        # Vault's fields for features the sidecar does not offer, answered as Vault would
        # for a key without them.
        "allow_plaintext_backup": False,
        "auto_rotate_period": 0,
        "derived": False,
        "imported_key": False,
        "min_available_version": 0,
        "soft_deleted": False,
        "backend": keyring.backend.kind,
        "root_key": info.name,
        "kek": keyring.status().as_json()["keys"][name],
    }


def _version_entry(info: RootKeyInfo, version: int) -> Any:
    created = info.created.get(version, 0)
    pem = info.public_keys.get(version)
    if pem is None:
        return created
    when = datetime.datetime.fromtimestamp(created, datetime.timezone.utc)
    return {
        "certificate_chain": "",
        "creation_time": when.isoformat().replace("+00:00", "Z"),
        "name": _CURVE_NAMES.get(info.key_type, info.key_type),
        "public_key": vault_public_key(info.key_type, pem),
    }


def vault_public_key(key_type: str, pem: str) -> str:
    """A public key as Vault shows it: ed25519 as the raw 32 bytes in base64, others as PEM."""
    if key_type != "ed25519":
        return pem
    public = load_pem_public_key(pem.encode())
    if not isinstance(public, ed25519.Ed25519PublicKey):
        return pem
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()
