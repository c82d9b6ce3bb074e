"""A caller allowed to decrypt can never get a KEK out through the vault: passthrough.

Every blob carries its KEK wrapped by the transit key — the same key that opens the caller's own
``vault:`` ciphertexts. KEKs are wrapped with transit associated data that the passthrough never
sends, so handing a blob's wrapped KEK back as a ``vault:`` ciphertext must fail.
"""

from __future__ import annotations

from typing import Any

from sidecar.keys import envelope
from tests.conftest import RunningSidecar
from tests.integration.conftest import sidecar

__all__ = ["sidecar"]


def wrapped_kek_of(blob: str) -> str:
    """The upstream-wrapped KEK in a blob's header (a ``vault:vN:`` transit ciphertext)."""
    return envelope.parse(blob).header.wrapped_kek.decode()


def test_a_blobs_wrapped_kek_cannot_be_decrypted_through_the_passthrough(
    sidecar: RunningSidecar,
) -> None:
    made = sidecar.request("POST", "/v1/transit/datakey/plaintext/payments").data
    kek_ciphertext = wrapped_kek_of(made["ciphertext"])
    assert kek_ciphertext.startswith("vault:v")
    for path in ("/v1/transit/decrypt/payments", "/v1/transit/rewrap/payments"):
        answer: Any = sidecar.request("POST", path, {"ciphertext": kek_ciphertext})
        assert answer.status == 400 and answer.code == "decryption_failed", (path, answer)
        assert "plaintext" not in answer.text
    # the passthrough itself still works for what applications encrypted with Vault directly
    legacy = sidecar.request(
        "POST", "/v1/transit/decrypt/payments", {"ciphertext": made["ciphertext"]}
    )
    assert legacy.status == 200
