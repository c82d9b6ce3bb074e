"""The Vault-transit API over a real Unix socket, rooted in a real OpenBao dev server."""

from __future__ import annotations

import base64
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.devserver import DevOpenBao, find_bao
from tests.conftest import RunningSidecar, run_as_another_uid, sidecar_config
from tests.integration.conftest import vault_sections

DATAKEY = "/v1/transit/datakey/plaintext/payments"
DECRYPT = "/v1/transit/decrypt/payments"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_datakey_round_trip(sidecar: RunningSidecar) -> None:
    made = sidecar.request("POST", DATAKEY, {"encryption_context": {"tenant": "acme"}})
    assert made.status == 200, made
    data = made.data
    assert made.json["request_id"] and data["key_version"] == 1 and data["expires_at"] is None
    assert data["ciphertext"].startswith("sidecar:v1:")
    plaintext = base64.b64decode(data["plaintext"])
    assert len(plaintext) == 32
    opened = sidecar.request(
        "POST",
        DECRYPT,
        {"ciphertext": data["ciphertext"], "encryption_context": {"tenant": "acme"}},
    )
    assert opened.status == 200, opened
    assert base64.b64decode(opened.data["plaintext"]) == plaintext


def test_wrapped_datakey_has_no_plaintext_and_put_empty_and_null_bodies_work(
    sidecar: RunningSidecar,
) -> None:
    wrapped = sidecar.request("PUT", "/v1/transit/datakey/wrapped/payments", raw=b"")
    assert wrapped.status == 200, wrapped
    assert "plaintext" not in wrapped.data
    assert sidecar.request("POST", DATAKEY, raw=b"null").status == 200
    assert (
        len(base64.b64decode(sidecar.request("POST", DATAKEY, {"bits": 512}).data["plaintext"]))
        == 64
    )


def test_bao_cli_over_the_socket(sidecar: RunningSidecar, tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "BAO_ADDR": f"unix://{sidecar.socket}",
    }
    bao = find_bao()
    made = subprocess.run(
        [bao, "write", "-format=json", "-f", "transit/datakey/plaintext/payments"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    import json

    data = json.loads(made.stdout)["data"]
    opened = subprocess.run(
        [
            bao,
            "write",
            "-format=json",
            "transit/decrypt/payments",
            f"ciphertext={data['ciphertext']}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert opened.returncode == 0, opened.stderr
    assert json.loads(opened.stdout)["data"]["plaintext"] == data["plaintext"]


def test_two_sidecars_open_each_others_blobs(
    openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path
) -> None:
    first = run_sidecar(sidecar_config(short_tmp / "a.sock", **vault_sections(openbao)))
    second = run_sidecar(sidecar_config(short_tmp / "b.sock", **vault_sections(openbao)))
    for maker, opener in ((first, second), (second, first)):
        made = maker.request("POST", DATAKEY, {"encryption_context": {"app": "x"}}).data
        opened = opener.request(
            "POST", DECRYPT, {"ciphertext": made["ciphertext"], "encryption_context": {"app": "x"}}
        )
        assert opened.status == 200, opened
        assert opened.data["plaintext"] == made["plaintext"]


def _tamper(blob: str) -> str:
    prefix, body = blob.rsplit(":", 1)
    raw = bytearray(base64.b64decode(body))
    raw[-5] ^= 0x40
    return f"{prefix}:{b64(bytes(raw))}"


def test_bad_blobs_fail_uniformly(openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path) -> None:
    sidecar = run_sidecar(
        sidecar_config(
            short_tmp / "s.sock",
            **vault_sections(openbao, {"payments": {"expiry_leeway": 0}, "default": {}}),
        )
    )
    made = sidecar.request(
        "POST", DATAKEY, {"encryption_context": {"tenant": "a"}, "ttl": "1s"}
    ).data
    other_key = sidecar.request("POST", "/v1/transit/datakey/plaintext/default").data["ciphertext"]
    cases = {
        "tampered": {
            "ciphertext": _tamper(made["ciphertext"]),
            "encryption_context": {"tenant": "a"},
        },
        "wrong context": {"ciphertext": made["ciphertext"], "encryption_context": {"tenant": "b"}},
        "no context": {"ciphertext": made["ciphertext"]},
        "other key": {"ciphertext": other_key},
        "garbage": {"ciphertext": "sidecar:v1:AAAA"},
    }
    answers = {name: sidecar.request("POST", DECRYPT, body) for name, body in cases.items()}
    deadline = time.monotonic() + 10
    while True:  # the blob expires one second after it was made (no leeway here)
        expired = sidecar.request(
            "POST",
            DECRYPT,
            {"ciphertext": made["ciphertext"], "encryption_context": {"tenant": "a"}},
        )
        if expired.status != 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    answers["expired"] = expired
    for name, answer in answers.items():
        assert answer.status == 400, (name, answer)
        assert answer.json["errors"] == ["The ciphertext could not be decrypted."], name
        assert answer.code == "decryption_failed", name


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "code"),
    [
        ("POST", DATAKEY, b"{not json", 400, "invalid_request"),
        ("POST", DATAKEY, b"[1, 2]", 400, "invalid_request"),
        ("POST", DATAKEY, b"[" * 100_000 + b"]" * 100_000, 400, "invalid_request"),
        ("POST", DATAKEY, b'{"bits": 100}', 400, "invalid_request"),
        ("POST", DATAKEY, b'{"ttl": "forever"}', 400, "invalid_request"),
        ("POST", DATAKEY, b'{"encryption_context": {"a": 1}}', 400, "invalid_request"),
        ("POST", "/v1/transit/encrypt/payments", b'{"plaintext": "%%%"}', 400, "invalid_request"),
        ("POST", DECRYPT, b"{}", 400, "invalid_request"),
        ("POST", "/v1/transit/datakey/plaintext/nosuchkey", b"", 403, "permission_denied"),
        ("GET", "/v1/transit/keys/nosuchkey", b"", 403, "permission_denied"),
        ("POST", "/v1/nothing/here", b"", 404, "unknown_path"),
        ("GET", DATAKEY, b"", 405, "method_not_allowed"),
    ],
)
def test_bad_requests_get_clear_errors(
    sidecar: RunningSidecar, method: str, path: str, raw: bytes, status: int, code: str
) -> None:
    answer = sidecar.request(method, path, raw=raw)
    assert answer.status == status, answer
    assert answer.code == code
    assert answer.json["request_id"]
    assert len(answer.json["errors"]) == 1 and answer.json["errors"][0].endswith(".")


def test_oversized_body_is_413(sidecar: RunningSidecar) -> None:
    big = b'{"plaintext": "' + b"A" * (2 * 1024 * 1024) + b'"}'
    answer = sidecar.request("POST", "/v1/transit/encrypt/payments", raw=big)
    assert answer.status == 413 and answer.code == "payload_too_large"


def test_encrypt_limit_and_round_trip(sidecar: RunningSidecar) -> None:
    sealed = sidecar.request(
        "POST", "/v1/transit/encrypt/payments", {"plaintext": b64(b"card 4111")}
    )
    assert sealed.status == 200
    opened = sidecar.request("POST", DECRYPT, {"ciphertext": sealed.data["ciphertext"]})
    assert base64.b64decode(opened.data["plaintext"]) == b"card 4111"
    too_big = sidecar.request(
        "POST", "/v1/transit/encrypt/payments", {"plaintext": b64(b"x" * 65537)}
    )
    assert too_big.status == 413 and "datakey" in too_big.json["errors"][0]


def test_batch_with_one_bad_item(sidecar: RunningSidecar) -> None:
    made = sidecar.request(
        "POST", DATAKEY, {"batch_input": [{}, {"encryption_context": {"t": "1"}}]}
    )
    assert made.status == 200
    first, second = made.data["batch_results"]
    items = [
        {"ciphertext": first["ciphertext"]},
        {"ciphertext": _tamper(first["ciphertext"])},
        {"ciphertext": second["ciphertext"], "encryption_context": {"t": "1"}},
    ]
    opened = sidecar.request("POST", DECRYPT, {"batch_input": items})
    assert opened.status == 400, "as Vault: a failed item makes the batch a 400"
    results = opened.data["batch_results"]
    assert results[0]["plaintext"] == first["plaintext"]
    assert results[1] == {
        "error": "The ciphertext could not be decrypted.",
        "code": "decryption_failed",
        "reference": "",
    }
    assert results[2]["plaintext"] == second["plaintext"]
    partial = sidecar.request(
        "POST", DECRYPT, {"batch_input": items, "partial_failure_response_code": 207}
    )
    assert partial.status == 207
    assert [set(r) for r in partial.data["batch_results"]] == [set(r) for r in results]


def test_ten_thousand_issuances_cost_one_kek_fetch(sidecar: RunningSidecar) -> None:
    for _ in range(10):
        answer = sidecar.request("POST", DATAKEY, {"batch_input": [{}] * 1000})
        assert answer.status == 200
        assert all("plaintext" in r for r in answer.data["batch_results"])
    status = sidecar.request("GET", "/v1/sidecar/status").data
    assert status["backend"]["calls"].get("datakey") == 1
    assert status["keys"]["payments"]["live_kek"]["uses"] == 10_000


def test_vault_ciphertexts_pass_through(sidecar: RunningSidecar, openbao: DevOpenBao) -> None:
    direct = openbao.client().secrets.transit.encrypt_data("payments", b64(b"legacy"))["data"][
        "ciphertext"
    ]
    assert direct.startswith("vault:v1:")
    opened = sidecar.request("POST", DECRYPT, {"ciphertext": direct})
    assert opened.status == 200 and base64.b64decode(opened.data["plaintext"]) == b"legacy"
    broken = sidecar.request("POST", DECRYPT, {"ciphertext": direct[:-4] + "AAAA"})
    assert broken.status == 400 and broken.code == "decryption_failed"


def test_rewrap_and_rotate(sidecar: RunningSidecar, openbao: DevOpenBao) -> None:
    openbao.create_key("rotating")
    # a key of its own so other tests' versions do not move
    made = sidecar.request("POST", DATAKEY, {"encryption_context": {"t": "1"}}).data
    rotated = sidecar.request("POST", "/v1/transit/keys/payments/rotate")
    assert rotated.status == 200, rotated
    version = rotated.data["latest_version"]
    moved = sidecar.request(
        "POST",
        "/v1/transit/rewrap/payments",
        {"ciphertext": made["ciphertext"], "encryption_context": {"t": "1"}},
    )
    assert moved.status == 200 and moved.data["key_version"] == version
    assert "plaintext" not in moved.data
    assert moved.data["ciphertext"].startswith(f"sidecar:v{version}:")
    opened = sidecar.request(
        "POST", DECRYPT, {"ciphertext": moved.data["ciphertext"], "encryption_context": {"t": "1"}}
    )
    assert opened.data["plaintext"] == made["plaintext"]


def test_key_metadata_and_status_hold_no_key_bytes(sidecar: RunningSidecar) -> None:
    made = sidecar.request("POST", DATAKEY).data
    info = sidecar.request("GET", "/v1/transit/keys/payments")
    assert info.status == 200
    assert info.data["type"] == "aes256-gcm96" and info.data["backend"] == "vault"
    assert info.data["latest_version"] >= 1
    status = sidecar.request("GET", "/v1/sidecar/status")
    for text in (info.raw, status.raw):
        assert made["plaintext"].encode() not in text
    health = sidecar.request("GET", "/v1/sys/health")
    assert health.status == 200 and health.json["keys"]["payments"] == "ok"


def test_another_uid_is_refused(sidecar: RunningSidecar, short_tmp: Path) -> None:
    os.chmod(sidecar.socket, 0o660)  # let gid 0 connect, so the peer check is what refuses
    os.chmod(short_tmp, 0o755)  # noqa: S103 - the socket directory, for the other uid
    out = run_as_another_uid(sidecar.socket)
    assert out.stdout.split() == ["403", "permission_denied"], out.stderr


def test_an_unsupported_authorization_scheme_is_refused_not_ignored(
    sidecar: RunningSidecar,
) -> None:
    answer = sidecar.request("POST", DATAKEY, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert answer.status == 401 and answer.code == "unauthenticated"
    assert "Bearer" in answer.json["errors"][0]
