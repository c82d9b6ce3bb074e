"""Public keys a JWT may be signed with: read from PEM text or a JWKS; weak ones refused.

Only asymmetric keys are ever read (RSA of at least :data:`MIN_RSA_BITS` bits, EC, EdDSA); a JWK
may carry private parameters, but only its public half is kept. A key verifies only the
algorithms its type fits, and a JWK that states ``alg`` only that algorithm.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

log = logging.getLogger(__name__)

JwtPublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
"""The public key types a JWT signature is checked with."""

ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""The algorithms ``auth.jwt_algorithms`` may list."""

MIN_RSA_BITS: Final = 2048

_EC_CURVES: Final = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key a token may be signed with.

    ``kid`` is ``None`` for PEM keys and kid-less JWKs, which are tried for any token whose
    algorithm they fit. ``alg`` is the JWK's stated algorithm, if any.
    """

    key: JwtPublicKey
    kid: str | None = None
    alg: str | None = None

    def fits(self, alg: str) -> bool:
        """Whether this key may verify a token signed with ``alg``."""
        if self.alg is not None and self.alg != alg:
            return False
        key = self.key
        if alg.startswith(("RS", "PS")):
            return isinstance(key, rsa.RSAPublicKey)
        if alg in _EC_CURVES:
            return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _EC_CURVES[alg]
        if alg == "EdDSA":
            return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
        return False


def keys_from_jwks(document: Any, *, origin: str) -> list[VerificationKey]:
    """The usable signing keys of a JWKS document (``{"keys": [...]}``).

    Unusable members (symmetric, encryption-only, unsupported, too short) are skipped with a
    log line. Raises ``ValueError`` if the document is not a JWKS.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError(f"{origin} is not a JWKS (expected an object with a 'keys' list)")
    keys: list[VerificationKey] = []
    for index, jwk in enumerate(document["keys"]):
        why = _unusable_jwk(jwk)
        if why is None:
            try:
                public = _public(jwt.PyJWK(jwk).key)
            except (jwt.PyJWTError, ValueError, TypeError) as exc:
                why = f"it could not be read ({type(exc).__name__})"
            else:
                why = _weak(public)
                if why is None:
                    kid, alg = jwk.get("kid"), jwk.get("alg")
                    keys.append(
                        VerificationKey(
                            public,
                            kid if isinstance(kid, str) else None,
                            alg if isinstance(alg, str) else None,
                        )
                    )
                    continue
        log.warning("ignoring key %d of %s: %s", index, origin, why)
    return keys


def _unusable_jwk(jwk: Any) -> str | None:
    if not isinstance(jwk, Mapping):
        return "it is not an object"
    if jwk.get("kty") == "oct":
        return "symmetric keys are never accepted"
    if jwk.get("use") not in (None, "sig"):
        return "it is not a signing key"
    alg = jwk.get("alg")
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        return "its algorithm is not an accepted asymmetric algorithm"
    return None


def _public(key: Any) -> JwtPublicKey:
    # A JWK may carry private parameters; only the public half is ever used.
    if hasattr(key, "public_key"):
        key = key.public_key()
    if not isinstance(
        key,
        rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):  # fmt: skip
        raise ValueError("not an RSA, EC or EdDSA public key")
    return key


def _weak(key: JwtPublicKey) -> str | None:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return f"RSA keys shorter than {MIN_RSA_BITS} bits are refused"
    return None


_PEM_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]+)-----\s.*?-----END \1-----", re.DOTALL
)  # fmt: skip


def keys_from_pem(text: str, *, origin: str) -> list[VerificationKey]:
    """Public keys from PEM text holding public keys and/or certificates.

    Raises ``ValueError`` for private keys, unreadable blocks, unsupported or weak keys, or text
    with no PEM block.
    """
    keys: list[VerificationKey] = []
    for match in _PEM_BLOCK.finditer(text):
        label = match.group(1)
        block = match.group(0).encode()
        if "PRIVATE" in label:
            raise ValueError(f"{origin} holds a private key; configure the public key instead")
        try:
            if label == "CERTIFICATE":
                loaded: Any = x509.load_pem_x509_certificate(block).public_key()
            else:
                loaded = load_pem_public_key(block)
            public = _public(loaded)
        except ValueError as exc:
            raise ValueError(f"{origin}: cannot read the {label} block: {exc}") from None
        weak = _weak(public)
        if weak:
            raise ValueError(f"{origin}: {weak}")
        keys.append(VerificationKey(public))
    if not keys:
        raise ValueError(f"{origin} holds no PEM public key or certificate")
    return keys


def fingerprint(key: VerificationKey) -> bytes:
    """The DER SubjectPublicKeyInfo of ``key``: equal for the same key however it was read."""
    return key.key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
