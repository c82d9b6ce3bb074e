"""The whole API with ``backend.type = "pkcs11"``: a real sidecar on a real Unix socket, with
its root keys on a real SoftHSM2 token (never a mock)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from sidecar.backends.pkcs11 import Pkcs11Backend
from sidecar.config import Pkcs11Config
from sidecar.errors import InvalidRequest
from tests.conftest import RunningSidecar, sidecar_config
from tests.integration.hsm.conftest import TOKEN
from tests.integration.softhsm import SoftHsm


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_keys(hsm_config: Pkcs11Config, keys: dict[str, str]) -> None:
    """Create root keys on the token with a backend of their own, closed at once."""

    async def create() -> None:
        backend = Pkcs11Backend(hsm_config)
        try:
            for name, key_type in keys.items():
                await backend.create(name, key_type)
        finally:
            await backend.close()

    asyncio.run(create())


def rotate_key(hsm_config: Pkcs11Config, name: str) -> int:
    """Rotate a root key on the token as an operator would (beside a running sidecar)."""

    async def rotate() -> int:
        backend = Pkcs11Backend(hsm_config)
        try:
            return (await backend.rotate(name)).latest_version
        finally:
            await backend.close()

    return asyncio.run(rotate())


def backend_section(hsm_config: Pkcs11Config) -> dict[str, Any]:
    return {
        "type": "pkcs11",
        "pkcs11": {
            "module": hsm_config.module,
            "token_label": hsm_config.token_label,
            "pin_env": hsm_config.pin_env,
        },
    }


def start(
    run_sidecar: Any,
    short_tmp: Path,
    hsm_config: Pkcs11Config,
    keys: list[str],
    *,
    socket: str = "h.sock",
    policy: str | None = None,
) -> RunningSidecar:
    config = sidecar_config(
        short_tmp / socket,
        policy=policy,
        backend=backend_section(hsm_config),
        keys={name: {} for name in keys},
    )
    sidecar: RunningSidecar = run_sidecar(config)
    return sidecar


def ok(answer: Any) -> Any:
    assert answer.status == 200, answer
    return answer.data


def failed_batch(answer: Any) -> Any:
    """A batch with a failed item: 400, as Vault answers it, every item's result still there."""
    assert answer.status == 400, answer
    return answer.data


def sign(sidecar: RunningSidecar, key: str, message: bytes, path: str = "", **fields: Any) -> Any:
    return ok(
        sidecar.request("POST", f"/v1/transit/sign/{key}{path}", {"input": b64(message), **fields})
    )


def verify(
    sidecar: RunningSidecar, key: str, message: bytes, signature: str, path: str = "", **fields: Any
) -> bool:
    body = {"input": b64(message), "signature": signature, **fields}
    valid = ok(sidecar.request("POST", f"/v1/transit/verify/{key}{path}", body))["valid"]
    assert isinstance(valid, bool)
    return valid


def backend_calls(sidecar: RunningSidecar) -> dict[str, int]:
    calls: dict[str, int] = ok(sidecar.request("GET", "/v1/sidecar/status"))["backend"]["calls"]
    return calls


def der_of(signature: str) -> bytes:
    prefix, version, body = signature.split(":", 2)
    assert prefix == "sidecar" and version.startswith("v")
    return base64.b64decode(body, validate=True)


# -- data keys -------------------------------------------------------------------------------


def test_datakey_decrypt_round_trip_and_rotation_keeps_old_blobs_readable(
    run_sidecar: Any, short_tmp: Path, hsm_config: Pkcs11Config
) -> None:
    key = new_name("aes")
    make_keys(hsm_config, {key: "aes256"})
    sidecar = start(run_sidecar, short_tmp, hsm_config, [key])

    made = ok(
        sidecar.request(
            "POST", f"/v1/transit/datakey/plaintext/{key}", {"encryption_context": {"t": "a"}}
        )
    )
    assert made["ciphertext"].startswith("sidecar:v1:") and made["key_version"] == 1
    opened = ok(
        sidecar.request(
            "POST",
            f"/v1/transit/decrypt/{key}",
            {"ciphertext": made["ciphertext"], "encryption_context": {"t": "a"}},
        )
    )
    assert opened["plaintext"] == made["plaintext"]
    wrong = sidecar.request(
        "POST",
        f"/v1/transit/decrypt/{key}",
        {"ciphertext": made["ciphertext"], "encryption_context": {"t": "b"}},
    )
    assert (wrong.status, wrong.code) == (400, "decryption_failed")
    sealed = ok(sidecar.request("POST", f"/v1/transit/encrypt/{key}", {"plaintext": b64(b"hi")}))

    rotated = ok(sidecar.request("POST", f"/v1/transit/keys/{key}/rotate"))
    assert (rotated["latest_version"], rotated["min_decryption_version"]) == (2, 1)
    assert rotated["backend"] == "pkcs11"
    newer = ok(sidecar.request("POST", f"/v1/transit/datakey/wrapped/{key}"))
    assert newer["ciphertext"].startswith("sidecar:v2:") and "plaintext" not in newer

    # Drop every cached KEK: the old blobs must be opened by the HSM under version 1.
    ok(sidecar.request("POST", "/v1/sidecar/cache/flush", {"key": key}))
    before = backend_calls(sidecar).get("unwrap_kek", 0)
    again = ok(
        sidecar.request(
            "POST",
            f"/v1/transit/decrypt/{key}",
            {"ciphertext": made["ciphertext"], "encryption_context": {"t": "a"}},
        )
    )
    assert again["plaintext"] == made["plaintext"]
    assert ok(sidecar.request("POST", f"/v1/transit/decrypt/{key}", sealed))["plaintext"] == b64(
        b"hi"
    )
    assert backend_calls(sidecar)["unwrap_kek"] == before + 1  # one KEK, unwrapped once
    rewrapped = ok(sidecar.request("POST", f"/v1/transit/rewrap/{key}", sealed))
    assert rewrapped["ciphertext"].startswith("sidecar:v2:")


def test_64_concurrent_requests_neither_crash_nor_fail(
    run_sidecar: Any, short_tmp: Path, hsm_config: Pkcs11Config
) -> None:
    aes, signer = new_name("aes"), new_name("ec")
    make_keys(hsm_config, {aes: "aes256", signer: "ec-p256"})
    sidecar = start(run_sidecar, short_tmp, hsm_config, [aes, signer])
    blobs = [ok(sidecar.request("POST", f"/v1/transit/datakey/plaintext/{aes}")) for _ in range(2)]
    ok(sidecar.request("POST", f"/v1/transit/keys/{aes}/rotate"))
    blobs.append(ok(sidecar.request("POST", f"/v1/transit/datakey/plaintext/{aes}")))
    signature = sign(sidecar, signer, b"concurrent")["signature"]
    # Nothing cached: the first requests below make the HSM unwrap, make a KEK and sign at once.
    ok(sidecar.request("POST", "/v1/sidecar/cache/flush"))
    barrier = threading.Barrier(64)

    def one(i: int) -> tuple[int, Any]:
        barrier.wait()
        kind = i % 4
        if kind == 0:
            answer = sidecar.request("POST", f"/v1/transit/datakey/plaintext/{aes}")
            return answer.status, answer.json
        if kind == 1:
            blob = blobs[i % len(blobs)]
            answer = sidecar.request(
                "POST", f"/v1/transit/decrypt/{aes}", {"ciphertext": blob["ciphertext"]}
            )
            return answer.status, answer.json and answer.json["data"]["plaintext"] == blob[
                "plaintext"
            ]
        if kind == 2:
            answer = sidecar.request(
                "POST", f"/v1/transit/sign/{signer}", {"input": b64(f"m{i}".encode())}
            )
            return answer.status, answer.json
        answer = sidecar.request(
            "POST",
            f"/v1/transit/verify/{signer}",
            {"input": b64(b"concurrent"), "signature": signature},
        )
        return answer.status, answer.json and answer.json["data"]["valid"]

    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(one, range(64)))
    assert [status for status, _ in answers] == [200] * 64, answers
    assert all(answers[i][1] is True for i in range(64) if i % 4 in (1, 3)), answers
    status = ok(sidecar.request("GET", "/v1/sidecar/status"))
    assert status["backend"]["state"] == "ok"
    assert status["backend"]["calls"]["sign"] >= 16
    health = sidecar.request("GET", "/v1/sys/health")
    assert health.status == 200, health


def test_a_restarted_sidecar_opens_blobs_and_checks_signatures_made_before(
    run_sidecar: Any, short_tmp: Path, hsm_config: Pkcs11Config
) -> None:
    aes, signer = new_name("aes"), new_name("ec")
    make_keys(hsm_config, {aes: "aes256", signer: "ec-p256"})
    first = start(run_sidecar, short_tmp, hsm_config, [aes, signer], socket="a.sock")
    blobs = [
        ok(first.request("POST", f"/v1/transit/datakey/plaintext/{aes}", {"ttl": "1h"}))
        for _ in range(3)
    ]
    signature = sign(first, signer, b"before the restart")["signature"]
    first.stop()
    assert not os.path.exists(first.socket)

    second = start(run_sidecar, short_tmp, hsm_config, [aes, signer], socket="b.sock")
    for blob in blobs:
        opened = ok(
            second.request("POST", f"/v1/transit/decrypt/{aes}", {"ciphertext": blob["ciphertext"]})
        )
        assert opened["plaintext"] == blob["plaintext"]
    assert verify(second, signer, b"before the restart", signature) is True


# -- signatures ------------------------------------------------------------------------------


def test_hsm_ec_p256_signature_verifies_with_cryptography_and_openssl(
    run_sidecar: Any, short_tmp: Path, hsm_config: Pkcs11Config, tmp_path: Path
) -> None:
    key = new_name("ec")
    make_keys(hsm_config, {key: "ec-p256"})
    sidecar = start(run_sidecar, short_tmp, hsm_config, [key])
    message = b"pay 10 EUR to alice\n"

    signed = sign(sidecar, key, message)
    assert signed["key_version"] == 1 and signed["signature"].startswith("sidecar:v1:")
    der = der_of(signed["signature"])
    metadata = ok(sidecar.request("GET", f"/v1/transit/keys/{key}"))
    assert metadata["type"] == "ecdsa-p256" and metadata["supports_signing"] is True
    pem = metadata["keys"]["1"]["public_key"]
    public = load_pem_public_key(pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(der, message, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(der, message + b"!", ec.ECDSA(hashes.SHA256()))

    (tmp_path / "pub.pem").write_text(pem)
    (tmp_path / "sig.der").write_bytes(der)
    (tmp_path / "data").write_bytes(message)
    (tmp_path / "changed").write_bytes(message.replace(b"10", b"99"))

    def openssl(data: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.der", data],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    good = openssl("data")
    assert (good.returncode, good.stdout.strip()) == (0, "Verified OK"), good
    bad = openssl("changed")
    assert bad.returncode == 1 and "Verification failure" in bad.stdout, bad

    assert verify(sidecar, key, message, signed["signature"]) is True
    assert verify(sidecar, key, message.replace(b"10", b"99"), signed["signature"]) is False


def test_hash_algorithms_prehashed_and_jws_marshaling(
    run_sidecar: Any, short_tmp: Path, hsm_config: Pkcs11Config
) -> None:
    key = new_name("ec")
    make_keys(hsm_config, {key: "ec-p256"})
    sidecar = start(run_sidecar, short_tmp, hsm_config, [key])
    pem = ok(sidecar.request("GET", f"/v1/transit/keys/{key}"))["keys"]["1"]["public_key"]
    public = load_pem_public_key(pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    message = b"a message"

    for path, algorithm in (("/sha2-384", hashes.SHA384()), ("/sha3-256", hashes.SHA3_256())):
        signed = sign(sidecar, key, message, path)
        public.verify(der_of(signed["signature"]), message, ec.ECDSA(algorithm))
        assert verify(sidecar, key, message, signed["signature"], path) is True
        assert verify(sidecar, key, message, signed["signature"]) is False  # sha2-256 ≠ it

    # The body's hash_algorithm works too; the path's wins over it.
    signed = sign(sidecar, key, message, hash_algorithm="sha2-512")
    public.verify(der_of(signed["signature"]), message, ec.ECDSA(hashes.SHA512()))
    assert verify(
        sidecar, key, message, signed["signature"], "/sha2-512", hash_algorithm="sha2-256"
    )

    digest = hashlib.sha256(message).digest()
    prehashed = sign(sidecar, key, digest, prehashed=True)
    public.verify(der_of(prehashed["signature"]), message, ec.ECDSA(hashes.SHA256()))
    assert verify(sidecar, key, message, prehashed["signature"]) is True
    assert verify(sidecar, key, digest, prehashed["signature"], prehashed=True) is True
    short = sidecar.request(
        "POST", f"/v1/transit/sign/{key}", {"input": b64(digest[:20]), "prehashed": True}
    )
    assert (short.status, short.code) == (400, "invalid_request"), short

    jws = sign(sidecar, key, message, marshaling_algorithm="jws")["signature"]
    body = jws.split(":", 2)[2]
    assert "=" not in body and "+" not in body and "/" not in body
    raw = unb64url(body)
    assert len(raw) == 64
    der = utils.encode_dss_signature(
        int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    )
    public.verify(der, message, ec.ECDSA(hashes.SHA256()))
    assert verify(sidecar, key, message, jws, marshaling_algorithm="jws") is True
    assert verify(sidecar, key, message, jws) is False  # not DER in standard base64

    for bad in ({"hash_algorithm": "sha1"}, {"marshaling_algorithm": "der"}, {"key_version": 9}):
        refused = sidecar.request("POST", f"/v1/transit/sign/{key}", {"input": b64(message), **bad})
        assert (refused.status, refused.code) == (400, "invalid_request"), (bad, refused)
    refused = sidecar.request("POST", f"/v1/transit/sign/{key}/md5", {"input": b64(message)})
    assert (refused.status, refused.code) == (400, "invalid_request"), refused


def test_batch_sign_and_verify_like_vault(
    run_sidecar: Any, short_tmp: Path, hsm_config: Pkcs11Config
) -> None:
    key = new_name("ec")
    make_keys(hsm_config, {key: "ec-p256"})
    sidecar = start(run_sidecar, short_tmp, hsm_config, [key])
    signed = failed_batch(
        sidecar.request(
            "POST",
            f"/v1/transit/sign/{key}/sha2-384",
            {
                "marshaling_algorithm": "jws",
                "batch_input": [
                    {"input": b64(b"one"), "reference": "first"},
                    {"input": "not base64!"},
                    {"input": b64(b"three")},
                ],
            },
        )
    )["batch_results"]
    assert signed[0]["reference"] == "first" and signed[0]["key_version"] == 1
    assert signed[1]["code"] == "invalid_request" and "signature" not in signed[1]
    checked = failed_batch(
        sidecar.request(
            "POST",
            f"/v1/transit/verify/{key}/sha2-384",
            {
                "marshaling_algorithm": "jws",
                "batch_input": [
                    {"input": b64(b"one"), "signature": signed[0]["signature"]},
                    {"input": b64(b"two"), "signature": signed[2]["signature"]},
                    {"input": b64(b"three"), "signature": signed[2]["signature"]},
                    {"input": b64(b"three"), "signature": "garbage"},
                ],
            },
        )
    )["batch_results"]
    assert [r.get("valid") for r in checked] == [True, False, True, None]
    assert checked[3]["code"] == "invalid_request"


def test_verify_runs_locally_and_picks_up_rotations(
    run_sidecar: Any, short_tmp: Path, hsm_config: Pkcs11Config
) -> None:
    key = new_name("ec")
    make_keys(hsm_config, {key: "ec-p256"})
    sidecar = start(run_sidecar, short_tmp, hsm_config, [key])
    old = sign(sidecar, key, b"m")["signature"]
    assert verify(sidecar, key, b"m", old) is True
    before = backend_calls(sidecar)
    for _ in range(20):
        assert verify(sidecar, key, b"m", old) is True
        assert verify(sidecar, key, b"n", old) is False
    assert backend_calls(sidecar) == before, "verify must not call the HSM"

    assert rotate_key(hsm_config, key) == 2  # beside the sidecar, which must notice
    new = sign(sidecar, key, b"m")
    assert new["key_version"] == 2 and new["signature"].startswith("sidecar:v2:")
    assert verify(sidecar, key, b"m", new["signature"]) is True
    assert verify(sidecar, key, b"m", old) is True  # version 1 still verifies
    assert sign(sidecar, key, b"m", key_version=1)["signature"].startswith("sidecar:v1:")

    too_new = "sidecar:v3:" + old.split(":", 2)[2]
    answer = sidecar.request(
        "POST", f"/v1/transit/verify/{key}", {"input": b64(b"m"), "signature": too_new}
    )
    assert (answer.status, answer.code) == (400, "invalid_request"), answer
    foreign = sidecar.request(
        "POST", f"/v1/transit/verify/{key}", {"input": b64(b"m"), "signature": "vault:v1:AAAA"}
    )
    assert (foreign.status, foreign.code) == (400, "invalid_request"), foreign


def test_jwks_serves_each_version_and_verifies_a_jwt_signed_in_the_hsm(
    run_sidecar: Any, short_tmp: Path, hsm_config: Pkcs11Config
) -> None:
    key = new_name("ec")
    make_keys(hsm_config, {key: "ec-p256"})
    sidecar = start(run_sidecar, short_tmp, hsm_config, [key])
    answer = sidecar.request("GET", f"/v1/sidecar/jwks/{key}")
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("application/json")
    [jwk] = answer.json["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"], jwk["kid"]) == (
        "EC",
        "P-256",
        "ES256",
        "sig",
        f"{key}:v1",
    )
    assert "d" not in jwk

    header = {"alg": "ES256", "typ": "JWT", "kid": f"{key}:v1"}
    claims = {"sub": "alice", "aud": "payments"}
    signing_input = ".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
        for part in (header, claims)
    )
    signature = sign(sidecar, key, signing_input.encode(), marshaling_algorithm="jws")["signature"]
    token = f"{signing_input}.{signature.split(':', 2)[2]}"
    decoded = jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["ES256"], audience="payments")
    assert decoded == claims

    rotate_key(hsm_config, key)
    assert sign(sidecar, key, b"m")["key_version"] == 2  # the sidecar sees the new version
    keys = ok_jwks(sidecar, key)
    assert [k["kid"] for k in keys] == [f"{key}:v1", f"{key}:v2"]
    assert keys[0] == jwk


def ok_jwks(sidecar: RunningSidecar, key: str) -> list[dict[str, str]]:
    answer = sidecar.request("GET", f"/v1/sidecar/jwks/{key}")
    assert answer.status == 200, answer
    keys: list[dict[str, str]] = answer.json["keys"]
    return keys


def test_ed25519_signs_in_the_hsm_when_the_token_supports_it(
    run_sidecar: Any, short_tmp: Path, hsm_config: Pkcs11Config
) -> None:
    key = new_name("ed")
    try:
        make_keys(hsm_config, {key: "ed25519"})
    except InvalidRequest as exc:
        pytest.skip(exc.message)
    sidecar = start(run_sidecar, short_tmp, hsm_config, [key])
    signed = sign(sidecar, key, b"an ed25519 message")
    shown = ok(sidecar.request("GET", f"/v1/transit/keys/{key}"))["keys"]["1"]["public_key"]
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(shown))  # Vault's raw base64
    public.verify(der_of(signed["signature"]), b"an ed25519 message")
    assert verify(sidecar, key, b"an ed25519 message", signed["signature"]) is True
    assert verify(sidecar, key, b"another message", signed["signature"]) is False
    [jwk] = ok_jwks(sidecar, key)
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("OKP", "Ed25519", "EdDSA")
    assert unb64url(jwk["x"]) == public.public_bytes_raw()


def test_key_metadata_holds_no_secret_and_root_keys_stay_in_the_token(
    run_sidecar: Any, short_tmp: Path, hsm_config: Pkcs11Config, softhsm: SoftHsm
) -> None:
    aes, signer = new_name("aes"), new_name("ec")
    make_keys(hsm_config, {aes: "aes256", signer: "ec-p256"})
    sidecar = start(run_sidecar, short_tmp, hsm_config, [aes, signer])
    ok(sidecar.request("POST", f"/v1/transit/datakey/plaintext/{aes}"))  # a KEK is live

    answers = {name: sidecar.request("GET", f"/v1/transit/keys/{name}") for name in (aes, signer)}
    symmetric, asymmetric = ok(answers[aes]), ok(answers[signer])
    # Vault's shape; a token keeps no creation time, so it reads as the epoch
    assert symmetric["keys"] == {"1": 0} and symmetric["exportable"] is False
    assert set(asymmetric["keys"]["1"]) == {
        "certificate_chain",
        "creation_time",
        "name",
        "public_key",
    }
    assert asymmetric["keys"]["1"]["name"] == "P-256"
    pem = asymmetric["keys"]["1"]["public_key"]
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    load_pem_public_key(pem.encode())
    with pytest.raises(ValueError):
        load_pem_private_key(pem.encode(), password=None)
    for answer in answers.values():
        text = answer.raw.decode()
        assert "PRIVATE" not in text and '"d"' not in text
        kek = answer.json["data"]["kek"]
        assert set(kek) <= {
            "root_key", "state", "problem", "latest_version", "min_decryption_version",
            "kek_rotations", "cached_keks", "live_kek",
        }  # fmt: skip
        if kek["live_kek"] is not None:
            assert set(kek["live_kek"]) == {
                "kek_id", "root_version", "age_seconds", "uses", "max_uses", "ttl_seconds",
            }  # fmt: skip
    # What a separate process sees on the token: no root key value can be read out of it.
    for name in (aes, signer):
        for obj in softhsm.inspect(TOKEN, name):
            if obj["class"] in ("SECRET_KEY", "PRIVATE_KEY"):
                assert obj["value_readable"] is False and obj["extractable"] is False, obj


def test_sign_and_verify_are_policy_operations(
    run_sidecar: Any, short_tmp: Path, hsm_config: Pkcs11Config
) -> None:
    aes, signer = new_name("aes"), new_name("ec")
    make_keys(hsm_config, {aes: "aes256", signer: "ec-p256"})
    policy = f"""
[[allow]]
name = "verifier"
when.unix_uid = [{os.getuid()}]
keys = ["*"]
operations = ["verify", "read"]
"""
    sidecar = start(run_sidecar, short_tmp, hsm_config, [aes, signer], policy=policy)
    refused = sidecar.request("POST", f"/v1/transit/sign/{signer}", {"input": b64(b"m")})
    assert (refused.status, refused.code) == (403, "permission_denied"), refused
    forged = "sidecar:v1:" + b64(bytes(70))
    assert verify(sidecar, signer, b"m", forged) is False
    assert len(ok_jwks(sidecar, signer)) == 1
    unknown = sidecar.request("GET", "/v1/sidecar/jwks/no-such-key")
    assert (unknown.status, unknown.code) == (403, "permission_denied"), unknown
    no_public = sidecar.request("GET", f"/v1/sidecar/jwks/{aes}")
    assert (no_public.status, no_public.code) == (400, "invalid_request"), no_public


def test_rotating_a_signing_key_through_the_api(
    run_sidecar: Any, short_tmp: Path, hsm_config: Pkcs11Config
) -> None:
    key = new_name("ec")
    make_keys(hsm_config, {key: "ec-p256"})
    sidecar = start(run_sidecar, short_tmp, hsm_config, [key])
    rotated = sidecar.request("POST", f"/v1/transit/keys/{key}/rotate")
    assert rotated.status == 200, rotated
    assert sorted(rotated.data["keys"]) == ["1", "2"]
    assert sign(sidecar, key, b"m")["key_version"] == 2


def test_an_aes_key_cannot_sign(
    run_sidecar: Any, short_tmp: Path, hsm_config: Pkcs11Config
) -> None:
    key = new_name("aes")
    make_keys(hsm_config, {key: "aes256"})
    sidecar = start(run_sidecar, short_tmp, hsm_config, [key])
    refused = sidecar.request("POST", f"/v1/transit/sign/{key}", {"input": b64(b"m")})
    assert (refused.status, refused.code) == (400, "invalid_request"), refused
    assert "cannot sign" in refused.json["errors"][0]


# -- the keys command ------------------------------------------------------------------------


def keys_command(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "keys", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_keys_command_creates_lists_rotates_shows_and_destroys_hsm_keys(
    hsm_config: Pkcs11Config, softhsm: SoftHsm, tmp_path: Path
) -> None:
    api_name, root = new_name("signer"), new_name("root")
    (tmp_path / "policies").mkdir()
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f"""
[backend]
type = "pkcs11"

[backend.pkcs11]
module = "{hsm_config.module}"
token_label = "{hsm_config.token_label}"
pin_env = "{hsm_config.pin_env}"

[keys.{api_name}]
root_key = "{root}"
"""
    )
    created = keys_command(config, "create", api_name, "--type", "ec-p256")
    assert created.returncode == 0, created.stderr
    assert f"created ec-p256 root key '{root}' in the pkcs11 backend" in created.stdout
    assert {obj["class"] for obj in softhsm.inspect(TOKEN, root)} == {"PRIVATE_KEY", "PUBLIC_KEY"}
    again = keys_command(config, "create", api_name, "--type", "ec-p256")
    assert again.returncode == 0 and "already exists" in again.stdout, again
    other_type = keys_command(config, "create", api_name, "--type", "aes256")
    assert other_type.returncode == 1 and "already exists as ec-p256" in other_type.stderr
    bad_type = keys_command(config, "create", api_name, "--type", "rsa-2048")
    assert bad_type.returncode == 2

    plain = keys_command(config, "create", f"{root}-aes")  # not configured: its own name
    assert plain.returncode == 0, plain.stderr

    listed = keys_command(config, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == [
        "ROOT",
        "KEY",
        "TYPE",
        "LATEST",
        "MIN_DECRYPTION",
        "CONFIGURED",
        "AS",
    ]
    row = next(line.split() for line in lines if line.startswith(root + " "))
    assert row == [root, "ec-p256", "1", "1", api_name]
    assert any(line.split()[:2] == [f"{root}-aes", "aes256"] for line in lines)

    rotated = keys_command(config, "rotate", api_name)
    assert rotated.returncode == 0 and "to version 2" in rotated.stdout, rotated

    status = keys_command(config, "status", api_name)
    assert status.returncode == 0, status.stderr
    fields = dict(line.split(None, 1) for line in status.stdout.splitlines()[:8] if line.strip())
    assert fields["latest_version"].strip() == "2" and fields["type"].strip() == "ec-p256"
    assert "-----BEGIN PUBLIC KEY-----" in status.stdout
    assert "PRIVATE" not in status.stdout
    everything = keys_command(config, "status")
    assert everything.returncode == 0 and root in everything.stdout

    refused = keys_command(config, "destroy", api_name)
    assert refused.returncode == 2
    assert "crypto-shredding" in refused.stderr and "--yes-destroy-all-data" in refused.stderr
    assert len(softhsm.inspect(TOKEN, root)) == 4  # nothing was deleted

    destroyed = keys_command(config, "destroy", api_name, "--yes-destroy-all-data")
    assert destroyed.returncode == 0, destroyed.stderr
    assert softhsm.inspect(TOKEN, root) == []
    gone = keys_command(config, "status", api_name)
    assert gone.returncode == 1 and "does not exist" in gone.stderr, gone
    assert keys_command(config, "destroy", f"{root}-aes", "--yes-destroy-all-data").returncode == 0
    assert keys_command(config, "rotate", f"{root}-aes").returncode == 1
