"""What the keyring hands back: a new data key, an opened blob, a sealed blob; and DEK sizes."""

from __future__ import annotations

from typing import Final, NamedTuple

from sidecar.errors import InvalidRequest

DEK_BITS: Final = (128, 256, 512)


def check_bits(bits: int) -> int:
    """``bits`` if a data key can have that many (128, 256 or 512). Raises ``InvalidRequest``.

    The one check of a DEK size: the HTTP field parser calls it too.
    """
    if bits not in DEK_BITS:
        raise InvalidRequest("Field 'bits' must be 128, 256 or 512.")
    return bits


# Results are NamedTuples: immutable like frozen dataclasses, and several times cheaper to make,
# which counts when a batch makes hundreds per request.


class NewDataKey(NamedTuple):
    """A data key just issued: ``plaintext`` for the caller's use, ``blob`` to store beside the
    data."""

    plaintext: bytes
    blob: str
    root_version: int
    expires_at: int | None
    kek_id: bytes

    def __repr__(self) -> str:
        return f"NewDataKey(plaintext=<redacted>, blob={self.blob!r}, version={self.root_version})"


class Opened(NamedTuple):
    """What a blob held, and which KEK and root version sealed it."""

    plaintext: bytes
    root_version: int
    kek_id: bytes | None

    def __repr__(self) -> str:
        return f"Opened(plaintext=<redacted>, root_version={self.root_version})"


class SealedBlob(NamedTuple):
    """A blob just made by ``encrypt`` or ``rewrap``, with the root version and KEK sealing it."""

    blob: str
    root_version: int
    kek_id: bytes | None
    expires_at: int | None = None
