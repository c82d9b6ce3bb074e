"""The blob format against committed known-answer vectors and the byte layout of its doc."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.backends.base import NewKek
from sidecar.config import KeyConfig
from sidecar.errors import DecryptionFailed, InvalidRequest
from sidecar.keys import envelope
from sidecar.keys.keyring import Keyring

VECTORS = Path(__file__).parent.parent / "vectors"


def _load(name: str) -> list[dict[str, Any]]:
    return json.loads((VECTORS / f"envelope_{name}.json").read_text())


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


@pytest.mark.parametrize("case", _load("generate"), ids=lambda c: c["name"])
def test_generate_matches_vector(case: dict[str, Any]) -> None:
    wrapped = _b64(case["wrapped_kek"])
    header = envelope.Header(
        case["key_name"],
        case["root_version"],
        envelope.kek_id_for(case["key_name"], wrapped),
        wrapped,
        case["expires_at"],
    )
    blob = envelope.KekCipher(_b64(case["kek"])).seal_encoded(
        header.encode(),
        header.root_version,
        _b64(case["plaintext"]),
        context=envelope.canonical_context(case["encryption_context"]),
        associated_data=_b64(case["associated_data"]),
        nonce=_b64(case["nonce"]),
    )
    assert blob == case["blob"]


@pytest.mark.parametrize("case", _load("generate"), ids=lambda c: c["name"])
def test_vector_follows_documented_layout(case: dict[str, Any]) -> None:
    """Rebuild each vector byte by byte from docs/envelope-format.md, with AESGCM directly."""
    name = case["key_name"].encode()
    wrapped = _b64(case["wrapped_kek"])
    expires = case["expires_at"]
    header = (
        bytes([1, 1 if expires is not None else 0, len(name)])
        + name
        + struct.pack(">I", case["root_version"])
        + hashlib.sha256(name + b"\x00" + wrapped).digest()[:16]
        + struct.pack(">H", len(wrapped))
        + wrapped
        + (struct.pack(">Q", expires) if expires is not None else b"")
    )
    context = case["encryption_context"]
    canonical = (
        json.dumps(context, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if context
        else b"{}"
    )
    aad = header + struct.pack(">I", len(canonical)) + canonical + _b64(case["associated_data"])
    nonce = _b64(case["nonce"])
    sealed = AESGCM(_b64(case["kek"])).encrypt(nonce, _b64(case["plaintext"]), aad)
    expected = (
        f"sidecar:v{case['root_version']}:" + base64.b64encode(header + nonce + sealed).decode()
    )
    assert case["blob"] == expected


@pytest.mark.parametrize("case", _load("verify"), ids=lambda c: c["name"])
def test_verify_vector_opens(case: dict[str, Any]) -> None:
    sealed = envelope.parse(case["blob"])
    assert sealed.header.key_name == case["key_name"]
    assert sealed.header.root_version == case["root_version"]
    assert sealed.header.expires_at == case["expires_at"]
    plaintext = envelope.KekCipher(_b64(case["kek"])).open(
        sealed,
        context=envelope.canonical_context(case["encryption_context"]),
        associated_data=_b64(case["associated_data"]),
    )
    assert plaintext == _b64(case["plaintext"])


@pytest.mark.parametrize("case", _load("invalid"), ids=lambda c: c["reason"])
def test_invalid_vector_fails_uniformly(case: dict[str, Any]) -> None:
    with pytest.raises(DecryptionFailed) as failure:
        sealed = envelope.parse(case["blob"])
        envelope.KekCipher(_b64(case["kek"])).open(
            sealed,
            context=envelope.canonical_context(case["encryption_context"]),
            associated_data=b"",
        )
    assert str(failure.value) == "The ciphertext could not be decrypted."


def test_other_kek_fails_like_tampering() -> None:
    case = _load("verify")[0]
    with pytest.raises(DecryptionFailed):
        envelope.KekCipher(bytes(32)).open(
            envelope.parse(case["blob"]), context=b"{}", associated_data=b""
        )


def test_context_is_order_independent() -> None:
    assert envelope.canonical_context({"b": "2", "a": "1"}) == envelope.canonical_context(
        {"a": "1", "b": "2"}
    )


def test_context_must_be_strings() -> None:
    with pytest.raises(InvalidRequest):
        envelope.canonical_context({"a": 1})  # type: ignore[dict-item]


def test_kek_never_in_repr() -> None:
    cipher = envelope.KekCipher(b"\xab" * 32)
    assert "ab" not in repr(cipher).lower().replace("redacted", "")


class _VectorBackend:
    """A backend whose only KEK is a vector's: the keyring then seals exactly that blob."""

    kind = "vector"

    def __init__(self, case: dict[str, Any]) -> None:
        self.made = NewKek(_b64(case["kek"]), _b64(case["wrapped_kek"]), case["root_version"])

    async def generate_kek(self, root_key: str) -> NewKek:
        return self.made

    async def unwrap_kek(self, root_key: str, wrapped: bytes) -> bytes:
        assert wrapped == self.made.wrapped
        return self.made.plaintext


@pytest.mark.parametrize("case", _load("generate"), ids=lambda c: c["name"])
async def test_keyring_seals_and_opens_the_vectors(case: dict[str, Any]) -> None:
    """The vectors through the path every request takes: ``Keyring.encrypt`` and ``open_blob``."""
    expires_at = case["expires_at"]
    ttl = None if expires_at is None else 1.0
    now = 1_700_000_000.0 if expires_at is None else float(expires_at) - 1.0
    keyring = Keyring(
        _VectorBackend(case),  # type: ignore[arg-type]
        {case["key_name"]: (KeyConfig(), case["key_name"])},
        now=lambda: now,
        random=lambda n: _b64(case["nonce"])[:n],
    )
    context = case["encryption_context"]
    sealed = await keyring.encrypt(
        case["key_name"],
        _b64(case["plaintext"]),
        context=context,
        associated_data=_b64(case["associated_data"]),
        ttl=ttl,
    )
    assert sealed.blob == case["blob"]
    fresh = Keyring(
        _VectorBackend(case),  # type: ignore[arg-type]
        {case["key_name"]: (KeyConfig(), case["key_name"])},
        now=lambda: now,
    )
    opened = await fresh.open_blob(
        case["key_name"],
        case["blob"],
        context=context,
        associated_data=_b64(case["associated_data"]),
    )
    assert opened.plaintext == _b64(case["plaintext"])
