"""Writes envelope known-answer vectors (generate, verify, invalid) as JSON.

Run once: ``python -m tests.vectors.make_envelope_vectors``. The vectors are committed; the unit
tests check the implementation against them and against an independent byte-level reading of
docs/envelope-format.md, so a change to the format cannot pass unnoticed.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from sidecar.keys import envelope

HERE = Path(__file__).parent
KEK = bytes(range(32))
WRAPPED = b"vault:v3:c2lkZWNhci10ZXN0LXZlY3Rvci13cmFwcGVkLWtlaw=="


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _case(
    name: str,
    plaintext: bytes,
    context: dict[str, str] | None,
    ad: bytes,
    expires_at: int | None,
    nonce: bytes,
    key_name: str = "payments",
    root_version: int = 3,
) -> dict[str, object]:
    header = envelope.Header(
        key_name, root_version, envelope.kek_id_for(key_name, WRAPPED), WRAPPED, expires_at
    )
    blob = envelope.KekCipher(KEK).seal_encoded(
        header.encode(),
        header.root_version,
        plaintext,
        context=envelope.canonical_context(context),
        associated_data=ad,
        nonce=nonce,
    )
    return {
        "name": name,
        "kek": _b64(KEK),
        "key_name": key_name,
        "root_version": root_version,
        "wrapped_kek": _b64(WRAPPED),
        "expires_at": expires_at,
        "nonce": _b64(nonce),
        "plaintext": _b64(plaintext),
        "encryption_context": context,
        "associated_data": _b64(ad),
        "blob": blob,
    }


def main() -> None:
    generate = [
        _case("dek-256-no-context", bytes(range(100, 132)), None, b"", None, bytes(12)),
        _case(
            "dek-256-context",
            bytes(32),
            {"tenant": "acme", "app": "billing"},
            b"",
            None,
            b"\x01" * 12,
        ),
        _case("expiring", b"short-lived", {"tenant": "acme"}, b"", 1767225600, b"\x02" * 12),
        _case("associated-data", b"hello", None, b"row-42", None, b"\x03" * 12),
        _case(
            "unicode-context",
            b"x",
            {"name": "zoë", "city": "東京"},
            b"",
            None,
            b"\x04" * 12,
            key_name="k-ü",
            root_version=1,
        ),
    ]
    (HERE / "envelope_generate.json").write_text(
        json.dumps(generate, indent=2, ensure_ascii=False) + "\n"
    )
    verify = [{k: v for k, v in case.items() if k != "nonce"} for case in generate]
    (HERE / "envelope_verify.json").write_text(
        json.dumps(verify, indent=2, ensure_ascii=False) + "\n"
    )

    good = generate[1]
    blob = str(good["blob"])
    raw = bytearray(base64.b64decode(blob.split(":", 2)[2]))

    def variant(mutate_index: int) -> str:
        changed = bytearray(raw)
        changed[mutate_index] ^= 0x01
        return "sidecar:v3:" + _b64(bytes(changed))

    invalid = [
        {
            "reason": "flipped tag bit",
            "blob": variant(len(raw) - 1),
            "encryption_context": good["encryption_context"],
        },
        {
            "reason": "flipped ciphertext bit",
            "blob": variant(len(raw) - 20),
            "encryption_context": good["encryption_context"],
        },
        {
            "reason": "flipped nonce bit",
            "blob": variant(len(raw) - 16 - 32 - 12),
            "encryption_context": good["encryption_context"],
        },
        {
            "reason": "flipped wrapped KEK bit (KEK id no longer matches)",
            "blob": variant(40),
            "encryption_context": good["encryption_context"],
        },
        {
            "reason": "wrong context",
            "blob": blob,
            "encryption_context": {"tenant": "evil", "app": "billing"},
        },
        {"reason": "missing context", "blob": blob, "encryption_context": None},
        {
            "reason": "text version differs from header",
            "blob": "sidecar:v4:" + blob.split(":", 2)[2],
            "encryption_context": good["encryption_context"],
        },
        {
            "reason": "unknown format version",
            "blob": "sidecar:v3:" + _b64(b"\x02" + bytes(raw[1:])),
            "encryption_context": good["encryption_context"],
        },
        {
            "reason": "unknown flag bit",
            "blob": "sidecar:v3:" + _b64(raw[:1] + b"\x80" + bytes(raw[2:])),
            "encryption_context": good["encryption_context"],
        },
        {
            "reason": "truncated",
            "blob": "sidecar:v3:" + _b64(bytes(raw[:-17])),
            "encryption_context": good["encryption_context"],
        },
        {"reason": "not base64", "blob": "sidecar:v3:!!!!", "encryption_context": None},
        {
            "reason": "wrong prefix",
            "blob": "vault-ish:v3:" + blob.split(":", 2)[2],
            "encryption_context": None,
        },
        {"reason": "empty", "blob": "sidecar:v3:", "encryption_context": None},
    ]
    for case in invalid:
        case.update(kek=_b64(KEK), key_name="payments", associated_data="")
    (HERE / "envelope_invalid.json").write_text(
        json.dumps(invalid, indent=2, ensure_ascii=False) + "\n"
    )


if __name__ == "__main__":
    main()
