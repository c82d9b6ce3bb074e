"""The blob format, and the only place in the sidecar that calls AES-GCM.

A blob reads ``sidecar:v<root_version>:<base64>``. The base64 part (standard alphabet, padded)
is, big-endian::

    offset  size  field
    0       1     format version, 0x01
    1       1     flags: bit 0 set = an expiry follows the wrapped KEK; other bits must be 0
    2       1     n = length of the key name (1..255)
    3       n     key name, UTF-8 (the name on the API)
    3+n     4     root key version
    7+n     16    KEK id = SHA-256(key name ‖ 0x00 ‖ wrapped KEK)[:16]
    23+n    2     w = length of the wrapped KEK (1..65535)
    25+n    w     wrapped KEK, as the backend returned it
    …       8     expiry, Unix seconds (only if flag bit 0)
    …       12    nonce (random)
    …       ≥16   AES-256-GCM ciphertext ‖ 16-byte tag

Everything before the nonce is the *header*. The AEAD's associated data is::

    header ‖ uint32 len(C) ‖ C ‖ associated_data

where ``C`` is the canonical encryption context: the JSON object with keys sorted, no
whitespace, UTF-8 (``{}`` when there is none). So the header, the context and the caller's
``associated_data`` are all authenticated, and any change to them fails like a wrong key.

Every failure to parse or open a blob raises the one :class:`DecryptionFailed`; its ``cause``
is for the audit log only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.errors import DecryptionFailed, InvalidRequest

PREFIX = "sidecar:"
FORMAT_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
KEK_ID_BYTES = 16
_FLAG_EXPIRY = 0x01
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
#: The largest root version a blob can carry (a uint32).
MAX_ROOT_VERSION = 0xFFFFFFFF
#: The longest ``ttl`` a blob accepts, in seconds: 2^32 (about 136 years). The expiry itself is a
#: uint64 of Unix seconds; this bound keeps every ``now + ttl`` far inside it.
MAX_TTL_SECONDS = float(1 << 32)
_TTL_RANGE = "Field 'ttl' must be more than 0 and at most 4294967296 seconds (about 136 years)."
_VERSION_TEXT = re.compile(r"v([1-9][0-9]{0,9})", re.ASCII)
_CONTEXT_RULE = (
    "Field 'encryption_context' must be an object whose keys and values are strings of "
    "valid Unicode (no lone surrogates)."
)
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def kek_id_for(key_name: str, wrapped_kek: bytes) -> bytes:
    """The KEK id a blob carries: derived from the wrapped KEK, so it cannot be forged apart."""
    return hashlib.sha256(key_name.encode() + b"\x00" + wrapped_kek).digest()[:KEK_ID_BYTES]


def check_context(context: object) -> Mapping[str, str] | None:
    """``context`` if it maps strings to strings that UTF-8 can encode (``None`` stays ``None``).

    Raises ``InvalidRequest`` for anything else, a lone surrogate (which JSON's ``\\ud800``
    escapes can carry) included. The one check of an encryption context, wherever it enters.
    """
    if context is None:
        return None
    if not isinstance(context, Mapping):
        raise InvalidRequest(_CONTEXT_RULE)
    for name, value in context.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidRequest(_CONTEXT_RULE)
        if not (name.isascii() and value.isascii()) and (
            _SURROGATE.search(name) or _SURROGATE.search(value)
        ):
            raise InvalidRequest(_CONTEXT_RULE)
    return context


def canonical_context(context: Mapping[str, str] | None) -> bytes:
    """The encryption context as the bytes bound into the AAD.

    Raises ``InvalidRequest`` as :func:`check_context` does.
    """
    if not context:
        return b"{}"
    check_context(context)
    return json.dumps(context, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def check_ttl(ttl: float) -> float:
    """``ttl`` (seconds) if a blob can carry it: finite, above 0, at most :data:`MAX_TTL_SECONDS`.

    Raises ``InvalidRequest`` naming the field.
    """
    if not (math.isfinite(ttl) and 0 < ttl <= MAX_TTL_SECONDS):
        raise InvalidRequest(_TTL_RANGE)
    return ttl


def expiry_after(now: float, ttl: float) -> int:
    """The expiry a blob sealed at ``now`` (Unix seconds) with ``ttl`` carries, rounded up."""
    return int(now + check_ttl(ttl) + 0.999)


@dataclass(frozen=True, slots=True)
class Header:
    """The authenticated header of a blob."""

    key_name: str
    root_version: int
    kek_id: bytes
    wrapped_kek: bytes = field(repr=False)
    expires_at: int | None = None

    def encode(self) -> bytes:
        name = self.key_name.encode()
        if not 0 < len(name) < 256 or not 0 < len(self.wrapped_kek) < 65536:
            raise ValueError("key name or wrapped KEK out of range")
        if not 0 < self.root_version <= MAX_ROOT_VERSION:
            raise ValueError("root version out of range")
        if self.expires_at is not None and not 0 <= self.expires_at < 1 << 64:
            raise ValueError("expiry out of range")
        flags = _FLAG_EXPIRY if self.expires_at is not None else 0
        parts = [
            bytes((FORMAT_VERSION, flags, len(name))),
            name,
            _U32.pack(self.root_version),
            self.kek_id,
            _U16.pack(len(self.wrapped_kek)),
            self.wrapped_kek,
        ]
        if self.expires_at is not None:
            parts.append(_U64.pack(self.expires_at))
        return b"".join(parts)


@dataclass(frozen=True, slots=True)
class ParsedBlob:
    """A blob split into its parts and checked for shape, not yet opened."""

    header: Header
    header_bytes: bytes = field(repr=False)
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)


def parse(blob: str) -> ParsedBlob:
    """Split a blob into its parts, checking only its shape. Raises ``DecryptionFailed``."""
    if not isinstance(blob, str) or not blob.startswith(PREFIX):
        raise DecryptionFailed("not a sidecar blob")
    try:
        version_text, body = blob[len(PREFIX) :].split(":", 1)
        version = _VERSION_TEXT.fullmatch(version_text)
        if version is None:
            raise ValueError("bad version prefix")
        raw = base64.b64decode(body, validate=True)
        sealed = _parse_binary(raw)
    except (ValueError, IndexError, struct.error, binascii.Error, UnicodeDecodeError):
        raise DecryptionFailed("malformed blob") from None
    if int(version.group(1)) != sealed.header.root_version:
        raise DecryptionFailed("text and binary root versions differ")
    if sealed.header.kek_id != kek_id_for(sealed.header.key_name, sealed.header.wrapped_kek):
        raise DecryptionFailed("KEK id does not match the wrapped KEK")
    return sealed


def _parse_binary(raw: bytes) -> ParsedBlob:
    if raw[0] != FORMAT_VERSION:
        raise ValueError("unknown format version")
    flags, name_len = raw[1], raw[2]
    if flags & ~_FLAG_EXPIRY or name_len == 0:
        raise ValueError("bad flags or name")
    pos = 3
    key_name = raw[pos : pos + name_len].decode()
    pos += name_len
    (root_version,) = _U32.unpack_from(raw, pos)
    pos += 4
    kek_id = raw[pos : pos + KEK_ID_BYTES]
    pos += KEK_ID_BYTES
    (wrapped_len,) = _U16.unpack_from(raw, pos)
    pos += 2
    wrapped = raw[pos : pos + wrapped_len]
    pos += wrapped_len
    expires_at = None
    if flags & _FLAG_EXPIRY:
        (expires_at,) = _U64.unpack_from(raw, pos)
        pos += 8
    if root_version == 0 or wrapped_len == 0 or len(raw) < pos + NONCE_BYTES + TAG_BYTES:
        raise ValueError("truncated")
    header = Header(key_name, root_version, kek_id, wrapped, expires_at)
    return ParsedBlob(header, raw[:pos], raw[pos : pos + NONCE_BYTES], raw[pos + NONCE_BYTES :])


def _aad(header_bytes: bytes, context: bytes, associated_data: bytes) -> bytes:
    return header_bytes + _U32.pack(len(context)) + context + associated_data


class KekCipher:
    """A KEK ready to seal and open blobs. Holds the key; never print or log it."""

    __slots__ = ("_aead",)

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 32:
            raise ValueError("a KEK is 32 bytes")
        self._aead = AESGCM(kek)

    def __repr__(self) -> str:
        return "KekCipher(<redacted>)"

    def seal_encoded(
        self,
        header_bytes: bytes,
        root_version: int,
        plaintext: bytes,
        *,
        context: bytes,
        associated_data: bytes,
        nonce: bytes,
    ) -> str:
        """The blob sealing ``plaintext`` under ``header_bytes`` (a :meth:`Header.encode`, which
        the keyring encodes once per KEK); ``nonce`` must be 12 fresh random bytes."""
        sealed = self._aead.encrypt(nonce, plaintext, _aad(header_bytes, context, associated_data))
        body = base64.b64encode(header_bytes + nonce + sealed).decode()
        return f"{PREFIX}v{root_version}:{body}"

    def open(self, sealed: ParsedBlob, *, context: bytes, associated_data: bytes) -> bytes:
        """The plaintext in ``sealed``. Raises ``DecryptionFailed``."""
        try:
            return self._aead.decrypt(
                sealed.nonce,
                sealed.ciphertext,
                _aad(sealed.header_bytes, context, associated_data),
            )
        except InvalidTag:
            raise DecryptionFailed("authentication tag mismatch") from None
