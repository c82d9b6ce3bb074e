"""The blob parser's fuzz target, shared by the atheris harness and the hypothesis suite.

:func:`fuzz_one` takes any bytes. The first byte picks how the rest is read: as the binary part
of a blob (wrapped in ``sidecar:v<N>:`` and base64 as a blob is), or as the whole blob text.
Whatever the input, parsing either raises the one ``DecryptionFailed`` or yields a header that
encodes back to exactly the bytes it was read from; opening a parsed blob under a KEK either
raises ``DecryptionFailed`` or returns the plaintext. Any other exception is a finding.
"""

from __future__ import annotations

import base64
import contextlib

from sidecar.errors import DecryptionFailed
from sidecar.keys import envelope

#: The KEK the harness opens parsed blobs with (the corpus's seeds are sealed under it).
FUZZ_KEK = bytes(range(32))
_CIPHER = envelope.KekCipher(FUZZ_KEK)


def blob_text(data: bytes) -> str:
    """The blob text that ``data`` stands for."""
    if not data:
        return ""
    mode, rest = data[0], data[1:]
    if mode % 2 == 0:
        # The header's own root version, where it has one, so the text and binary agree.
        n = rest[2] if len(rest) > 2 else 0
        version = int.from_bytes(rest[3 + n : 7 + n]) if len(rest) >= 7 + n else 1
        return f"{envelope.PREFIX}v{version}:{base64.b64encode(rest).decode()}"
    return rest.decode("utf-8", errors="surrogatepass" if mode % 4 == 1 else "replace")


def fuzz_one(data: bytes) -> None:
    """One input: see the module docstring. Raises ``AssertionError`` (or worse) on a finding."""
    try:
        text = blob_text(data)
    except UnicodeDecodeError:
        return  # not text at all: nothing a caller could send as JSON
    try:
        sealed = envelope.parse(text)
    except DecryptionFailed:
        return
    header = sealed.header
    assert header.encode() == sealed.header_bytes
    assert len(sealed.nonce) == envelope.NONCE_BYTES
    assert len(sealed.ciphertext) >= envelope.TAG_BYTES
    assert 0 < header.root_version <= envelope.MAX_ROOT_VERSION
    assert header.kek_id == envelope.kek_id_for(header.key_name, header.wrapped_kek)
    for context in (None, {"tenant": "acme"}):
        with contextlib.suppress(DecryptionFailed):
            _CIPHER.open(sealed, context=envelope.canonical_context(context), associated_data=b"")
