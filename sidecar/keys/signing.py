"""Signatures with asymmetric root keys, and their public keys as PEM and JWKS.

Two kinds of backend sign:

- **A digest signer** (the PKCS#11 backend): the private key signs inside the HSM. For
  ``ec-p256`` the message is hashed here (``hash_algorithm``, unless ``prehashed``) and the HSM
  signs the digest (``CKM_ECDSA``); for ``ed25519`` it signs the message itself. The signature
  reads ``sidecar:v<N>:<base64>`` — DER (``asn1``, the default, what OpenSSL and X.509 use) in
  standard base64, or raw ``r || s`` (``jws``, as in JWS/JWT) in unpadded base64url, exactly as
  Vault marshals its own.
- **An upstream signer** (Vault/OpenBao transit): signing is passed through and the upstream's
  ``vault:v<N>:…`` signature is returned unchanged.

Verification runs locally against the key's public keys, read from the backend's key metadata
and cached per key and version: ``sidecar:`` signatures always, ``vault:`` signatures of
``ed25519`` and ``ec-p256`` keys too (Vault signs exactly what is done here). Anything this
module cannot check itself — a derived key (``context``), a prehashed Ed25519 input, another key
type, a version without a public key — is passed to the upstream's verify. A signature naming a
version newer than the cached ones makes the key's metadata be read again (at most once per
``refresh_interval``), so a rotation elsewhere is picked up; the metadata is re-read anyway
once it is older than ``info_ttl``.

Following Vault: ``hash_algorithm`` and ``prehashed`` do not apply to Ed25519 (it hashes
internally), ``marshaling_algorithm=jws`` switches the encoding to unpadded base64url for every
key type, a version below ``min_decryption_version`` or above the latest is an
``InvalidRequest``, and a well-formed signature that does not match is ``valid = False``.
Unlike Vault, ``sha1`` and ``none`` are refused, and a prehashed ECDSA input must have the
length of the named hash.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from sidecar.backends.base import RootKeyBackend, RootKeyInfo
from sidecar.errors import InvalidRequest, UpstreamError, quoted

#: Vault's hash names → cryptography's algorithms. ``sha1`` and ``none`` are deliberately absent.
HASH_ALGORITHMS: Mapping[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha2-224": hashes.SHA224,
    "sha2-256": hashes.SHA256,
    "sha2-384": hashes.SHA384,
    "sha2-512": hashes.SHA512,
    "sha3-224": hashes.SHA3_224,
    "sha3-256": hashes.SHA3_256,
    "sha3-384": hashes.SHA3_384,
    "sha3-512": hashes.SHA3_512,
}
MARSHALING_ALGORITHMS = ("asn1", "jws")
DEFAULT_HASH = "sha2-256"
#: The prefix of signatures made by a digest signer (the HSM).
SIDECAR_PREFIX = "sidecar"
#: The prefix of signatures made upstream by Vault/OpenBao transit.
VAULT_PREFIX = "vault"

PublicKey = ec.EllipticCurvePublicKey | Ed25519PublicKey

_SIGNATURE = re.compile(r"(sidecar|vault):v([1-9][0-9]{0,8}):(.*)", re.DOTALL)
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_P256_COORDINATE = 32


@runtime_checkable
class DigestSigner(Protocol):
    """A backend whose private keys sign inside it (the PKCS#11 backend)."""

    async def sign(self, root_key: str, version: int | None, digest: bytes) -> tuple[int, bytes]:
        """``(version used, signature)``: raw ``r || s`` for ``ec-p256`` (``digest`` is a hash),
        raw Ed25519 for ``ed25519`` (``digest`` is the message)."""


@runtime_checkable
class UpstreamSigner(Protocol):
    """A backend that signs and verifies itself, with Vault transit's fields (Vault/OpenBao)."""

    async def sign_upstream(
        self,
        root_key: str,
        data: bytes,
        *,
        hash_algorithm: str,
        prehashed: bool,
        marshaling_algorithm: str,
        key_version: int | None = None,
        context: bytes | None = None,
    ) -> tuple[str, int]:
        """``(signature as the upstream writes it, version used)``."""

    async def verify_upstream(
        self,
        root_key: str,
        data: bytes,
        signature: str,
        *,
        hash_algorithm: str,
        prehashed: bool,
        marshaling_algorithm: str,
        context: bytes | None = None,
    ) -> bool:
        """Whether the upstream accepts ``signature`` over ``data``."""


@dataclass(frozen=True, slots=True)
class SignOptions:
    """How to sign or verify, with Vault transit's names and defaults."""

    hash_algorithm: str = DEFAULT_HASH
    prehashed: bool = False
    marshaling_algorithm: str = "asn1"
    #: The version to sign with; None signs with the latest. Ignored by verify.
    key_version: int | None = None
    #: Key-derivation context of derived upstream keys (passed through; never used locally).
    context: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.hash_algorithm not in HASH_ALGORITHMS:
            raise InvalidRequest(
                f"Unsupported hash_algorithm {quoted(self.hash_algorithm)}; "
                f"use one of {', '.join(HASH_ALGORITHMS)}."
            )
        if self.marshaling_algorithm not in MARSHALING_ALGORITHMS:
            raise InvalidRequest(
                f"Unsupported marshaling_algorithm {quoted(self.marshaling_algorithm)}; "
                "use asn1 or jws."
            )
        if self.key_version is not None and self.key_version < 1:
            raise InvalidRequest("key_version must be a positive version number.")


@dataclass(frozen=True, slots=True)
class Signature:
    """A signature as the API returns it, and the root key version that made it."""

    signature: str
    key_version: int


@dataclass(slots=True)
class _KeyView:
    """What is cached about one key: its metadata and its parsed public keys by version."""

    info: RootKeyInfo
    fetched_at: float
    public_keys: dict[int, PublicKey]
    #: Set when a newer version than ``info`` knows was seen: read the metadata again.
    outdated: bool = False


class Signer:
    """Signs with and verifies against the root keys of ``backend``.

    ``root_key_of`` maps an API key name to the backend's name for it. ``info_ttl`` and
    ``refresh_interval`` are seconds; ``now`` is a monotonic clock (injectable for tests).
    Raises the backend's errors, and ``InvalidRequest`` for keys and options that cannot sign.
    """

    def __init__(
        self,
        backend: RootKeyBackend,
        root_key_of: Callable[[str], str],
        *,
        info_ttl: float = 30.0,
        refresh_interval: float = 1.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self._root_key_of = root_key_of
        self._info_ttl = info_ttl
        self._refresh_interval = refresh_interval
        self._now = now
        self._views: dict[str, _KeyView] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # -- signing ----------------------------------------------------------------------------

    async def sign(self, key_name: str, data: bytes, options: SignOptions) -> Signature:
        """Sign ``data`` (a message, or its digest when ``options.prehashed``) with ``key_name``."""
        if not data:
            raise InvalidRequest("The input to sign must not be empty.")
        root_key = self._root_key_of(key_name)
        backend = self.backend
        view = await self._view(key_name, version=options.key_version)
        key_type = view.info.key_type
        if key_type == "aes256":
            raise InvalidRequest(f"Key {key_name!r} is an aes256 key; it cannot sign.")
        if options.key_version is not None and options.key_version > view.info.latest_version:
            # Refused here: transit answers a 500 for it, which would read as an outage.
            raise InvalidRequest(
                f"Field 'key_version' names version {options.key_version} of key {key_name!r}, "
                f"whose latest version is {view.info.latest_version}."
            )
        if isinstance(backend, UpstreamSigner):
            signature, version = await backend.sign_upstream(
                root_key,
                data,
                hash_algorithm=options.hash_algorithm,
                prehashed=options.prehashed,
                marshaling_algorithm=options.marshaling_algorithm,
                key_version=options.key_version,
                context=options.context,
            )
            return Signature(signature, version)
        if not isinstance(backend, DigestSigner):
            raise InvalidRequest(f"The {backend.kind} backend cannot sign.")
        if options.context is not None:
            raise InvalidRequest("context applies only to derived upstream keys.")
        if key_type == "ec-p256":
            digest = _digest(data, options)
            version, raw = await backend.sign(root_key, options.key_version, digest)
            if len(raw) != 2 * _P256_COORDINATE:
                raise UpstreamError("The HSM returned an ECDSA signature of an unexpected size.")
            body = raw if options.marshaling_algorithm == "jws" else _der(raw)
        elif key_type == "ed25519":
            version, body = await backend.sign(root_key, options.key_version, data)
        else:
            raise InvalidRequest(f"Key {key_name!r} of type {key_type} cannot sign here.")
        if version > view.info.latest_version:
            view.outdated = True  # rotated since it was read: verify must see the new version
        return Signature(
            f"{SIDECAR_PREFIX}:v{version}:{_encode(body, options.marshaling_algorithm)}", version
        )

    # -- verification -----------------------------------------------------------------------

    async def verify(
        self, key_name: str, data: bytes, signature: str, options: SignOptions
    ) -> bool:
        """Whether ``signature`` is ``key_name``'s over ``data``; locally whenever possible.

        ``InvalidRequest`` when the signature is not one this key's backend makes, or names a
        version below ``min_decryption_version`` or beyond the latest.
        """
        match = _SIGNATURE.fullmatch(signature)
        if match is None:
            raise InvalidRequest(
                "The signature must read 'sidecar:v<N>:<base64>' or 'vault:v<N>:<base64>'."
            )
        prefix, version, body = match.group(1), int(match.group(2)), match.group(3)
        upstream = self.backend if isinstance(self.backend, UpstreamSigner) else None
        expected = VAULT_PREFIX if upstream is not None else SIDECAR_PREFIX
        if prefix != expected:
            raise InvalidRequest(
                f"Key {key_name!r} makes '{expected}:' signatures; this one is not its own."
            )
        view = await self._view(key_name, version=version)
        info = view.info
        if info.key_type == "aes256":
            raise InvalidRequest(f"Key {key_name!r} is an aes256 key; it has no signatures.")
        if version < info.min_decryption_version:
            raise InvalidRequest(
                f"The signature was made with version {version} of key {key_name!r}, "
                "below its min_decryption_version."
            )
        if version > info.latest_version:
            raise InvalidRequest(
                f"The signature names version {version} of key {key_name!r}, "
                "which does not exist yet."
            )
        public = view.public_keys.get(version)
        if upstream is not None and not _locally_verifiable(info.key_type, public, data, options):
            return await upstream.verify_upstream(
                self._root_key_of(key_name),
                data,
                signature,
                hash_algorithm=options.hash_algorithm,
                prehashed=options.prehashed,
                marshaling_algorithm=options.marshaling_algorithm,
                context=options.context,
            )
        if public is None:
            raise InvalidRequest(f"Key {key_name!r} has no public key for version {version}.")
        decoded = _decode(body, options.marshaling_algorithm)
        if decoded is None:
            return False
        return _verified(public, decoded, data, options)

    # -- public keys ------------------------------------------------------------------------

    async def public_keys(self, key_name: str) -> tuple[RootKeyInfo, dict[int, PublicKey]]:
        """The key's metadata and the public key of each version that has one (cached)."""
        view = await self._view(key_name)
        return view.info, dict(view.public_keys)

    async def jwks(self, key_name: str) -> dict[str, Any]:
        """The JSON Web Key Set of ``key_name``: a key per usable version, ``kid`` ``<name>:v<N>``.

        ``InvalidRequest`` for a key without public keys (aes256).
        """
        info, public_keys = await self.public_keys(key_name)
        if info.key_type == "aes256":
            raise InvalidRequest(f"Key {key_name!r} is an aes256 key; it has no public keys.")
        return {
            "keys": [
                public_jwk(public, kid=f"{key_name}:v{version}")
                for version, public in sorted(public_keys.items())
                if info.min_decryption_version <= version <= info.latest_version
            ]
        }

    # -- cache ------------------------------------------------------------------------------

    async def _view(self, key_name: str, *, version: int | None = None) -> _KeyView:
        """The cached view of ``key_name``; read again when stale or ``version`` is unknown.

        Reads are single-flight per key. A read for an unknown version waits until
        ``refresh_interval`` has passed since the previous read, so made-up versions cannot
        turn every request into a backend call.
        """
        view = self._views.get(key_name)
        if view is not None and not self._stale(view, version):
            return view
        lock = self._locks.setdefault(key_name, asyncio.Lock())
        async with lock:
            current = self._views.get(key_name)
            if current is not None and current is not view and not self._stale(current, version):
                return current  # another request read it while this one waited
            if current is not None and not self._expired(current):
                wait = current.fetched_at + self._refresh_interval - self._now()
                if wait > 0:
                    await asyncio.sleep(wait)
            info = await self.backend.key_info(self._root_key_of(key_name))
            parsed = {} if current is None else current.public_keys
            public_keys: dict[int, PublicKey] = {}
            for v, text in info.public_keys.items():
                key = parsed[v] if v in parsed else load_public_key(text, info.key_type)
                if key is not None:
                    public_keys[v] = key
            fresh = _KeyView(info=info, fetched_at=self._now(), public_keys=public_keys)
            self._views[key_name] = fresh
            return fresh

    def _expired(self, view: _KeyView) -> bool:
        return self._now() - view.fetched_at >= self._info_ttl

    def _stale(self, view: _KeyView, version: int | None) -> bool:
        unknown = version is not None and version > view.info.latest_version
        return view.outdated or unknown or self._expired(view)


def signature_version(signature: str) -> int | None:
    """N in ``sidecar:vN:…`` or ``vault:vN:…``; None for anything else."""
    match = _SIGNATURE.fullmatch(signature)
    return None if match is None else int(match.group(2))


# -- public keys ---------------------------------------------------------------------------


def load_public_key(text: str, key_type: str) -> PublicKey | None:
    """The P-256 or Ed25519 public key in ``text`` (PEM, or Vault's base64 for ed25519).

    None for anything else (another curve, RSA, an empty string): such keys are only verified
    upstream.
    """
    if text.lstrip().startswith("-----BEGIN"):
        try:
            public = load_pem_public_key(text.encode())
        except ValueError:
            return None
        if isinstance(public, Ed25519PublicKey):
            return public
        if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
            return public
        return None
    if key_type == "ed25519":
        try:
            raw = base64.b64decode(text, validate=True)
            return Ed25519PublicKey.from_public_bytes(raw)
        except (binascii.Error, ValueError):
            return None
    return None


def public_jwk(public: PublicKey, *, kid: str) -> dict[str, str]:
    """``public`` as a JWK (RFC 7517/8037) for signature verification."""
    if isinstance(public, Ed25519PublicKey):
        raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": _b64url(raw),
            "alg": "EdDSA",
            "use": "sig",
            "kid": kid,
        }
    numbers = public.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(numbers.x.to_bytes(_P256_COORDINATE, "big")),
        "y": _b64url(numbers.y.to_bytes(_P256_COORDINATE, "big")),
        "alg": "ES256",
        "use": "sig",
        "kid": kid,
    }


# -- encodings -----------------------------------------------------------------------------


def _digest(data: bytes, options: SignOptions) -> bytes:
    """What ECDSA signs: ``data`` itself when prehashed (its length checked), else its hash."""
    algorithm = HASH_ALGORITHMS[options.hash_algorithm]()
    if options.prehashed:
        if len(data) != algorithm.digest_size:
            raise InvalidRequest(
                f"A prehashed {options.hash_algorithm} input must be {algorithm.digest_size} "
                "bytes long; set hash_algorithm to the hash you used."
            )
        return data
    return hashlib.new(algorithm.name.replace("-", "_"), data).digest()


def _locally_verifiable(
    key_type: str, public: PublicKey | None, data: bytes, options: SignOptions
) -> bool:
    """Whether an upstream signature can be checked here exactly as the upstream would."""
    if public is None or options.context is not None:
        return False
    if key_type == "ed25519":
        return not options.prehashed  # leave Ed25519ph, should the upstream offer it, to it
    if key_type == "ec-p256":
        size = HASH_ALGORITHMS[options.hash_algorithm]().digest_size
        return not options.prehashed or len(data) == size
    return False


def _der(raw: bytes) -> bytes:
    """Raw ``r || s`` as an ASN.1 DER ECDSA signature."""
    half = len(raw) // 2
    return utils.encode_dss_signature(
        int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    )


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _encode(raw: bytes, marshaling: str) -> str:
    """Standard padded base64 for ``asn1``; unpadded base64url for ``jws`` (as Vault does)."""
    if marshaling == "jws":
        return _b64url(raw)
    return base64.b64encode(raw).decode("ascii")


def _decode(text: str, marshaling: str) -> bytes | None:
    """The bytes of a signature's base64 part; None when it is not valid for ``marshaling``."""
    try:
        if marshaling == "jws":
            if not _BASE64URL.fullmatch(text):
                return None
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _verified(public: PublicKey, raw: bytes, data: bytes, options: SignOptions) -> bool:
    """Whether ``raw`` (the decoded signature) is ``public``'s over ``data``."""
    try:
        if isinstance(public, Ed25519PublicKey):
            public.verify(raw, data)
            return True
        if options.marshaling_algorithm == "jws":
            if len(raw) != 2 * _P256_COORDINATE:
                return False
            raw = _der(raw)
        algorithm = ec.ECDSA(utils.Prehashed(HASH_ALGORITHMS[options.hash_algorithm]()))
        public.verify(raw, _digest(data, options), algorithm)
    except InvalidSignature:
        return False
    return True
