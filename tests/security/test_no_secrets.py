"""No key bytes, plaintext or token anywhere: a whole run's outputs are searched for them.

One sidecar runs with everything on — fail-closed audit, JSON logs at DEBUG, OTLP export to a
real receiver, JWT verification — and is driven through issuance, decryption, failures and
refusals. Then every output (audit files, its log, the exported spans as received, and every
response body that is not meant to carry a key) is searched for the base64 and hex of every data
key it issued, every plaintext, every KEK behind those blobs (recovered from OpenBao with its
root token), and every JWT presented.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.cli import dev_policy
from sidecar.devserver import DevOpenBao
from sidecar.keys import envelope
from tests.conftest import TOKEN_ENV, request, sidecar_process
from tests.integration.softhsm import SOFTHSM_MODULE, SoftHsm, softhsm_missing
from tests.integration.test_observability import OtlpReceiver, otlp

__all__ = ["otlp"]

ISSUER = "https://issuer.test"
AUDIENCE = "kms-sidecar"


def forms(secret: bytes) -> list[bytes]:
    """The ways a secret could be written down."""
    return [
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        secret.hex().encode(),
        secret.hex().upper().encode(),
    ]


def wrapped_kek_of(blob: str) -> str:
    """The upstream-wrapped KEK in a blob's header (a ``vault:vN:`` transit ciphertext)."""
    return envelope.parse(blob).header.wrapped_kek.decode()


def test_no_secret_reaches_any_output(
    openbao: DevOpenBao, otlp: OtlpReceiver, short_tmp: Path
) -> None:
    signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = signer.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (short_tmp / "jwt.pem").write_bytes(public_pem)
    (short_tmp / "policies").mkdir()
    (short_tmp / "policies" / "p.toml").write_text(
        f'[[allow]]\nname = "me"\nwhen.unix_uid = [{os.getuid()}]\nkeys = ["payments"]\noperations = ["*"]\n'
        f'[[allow]]\nname = "tenant"\nwhen.jwt_iss = "{ISSUER}"\nkeys = ["payments"]\n'
        'operations = ["datakey", "decrypt"]\ncontext.tenant = "{jwt.claims.tenant}"\n'
    )
    sock = short_tmp / "n.sock"
    (short_tmp / "sidecar.toml").write_text(
        f"""
[server]
socket = "{sock}"
[auth]
jwt_issuer = "{ISSUER}"
jwt_audiences = ["{AUDIENCE}"]
jwt_public_keys = ["jwt.pem"]
[backend.vault]
addresses = ["{openbao.address}"]
token_env = "{TOKEN_ENV}"
[keys.payments]
[audit]
path = "audit/audit.log"
max_file_bytes = 4096
[telemetry]
otlp_endpoint = "{otlp.endpoint}"
log_format = "json"
log_level = "DEBUG"
"""
    )
    now = int(time.time())
    good_jwt = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc", "exp": now + 300, "tenant": "acme"},
        signer,
        algorithm="RS256",
    )
    expired_jwt = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc", "exp": now - 300, "tenant": "acme"},
        signer,
        algorithm="RS256",
    )
    secrets_seen: list[bytes] = []
    tokens = [good_jwt.encode(), expired_jwt.encode()]
    safe_bodies: list[bytes] = []
    env = {**os.environ, "KMS_AUDIT_HMAC_KEY": secrets.token_hex(32)}
    log_path = short_tmp / "sidecar.log"
    with (
        open(log_path, "wb") as log_file,
        sidecar_process(short_tmp / "sidecar.toml", sock, env=env, stderr=log_file) as proc,
    ):

        def call(
            method: str, path: str, body: object = None, headers: dict[str, str] | None = None
        ):  # type: ignore[no-untyped-def]
            return request(str(sock), method, path, body, headers=headers)

        blobs = []
        for i in range(20):
            made = call(
                "POST",
                "/v1/transit/datakey/plaintext/payments",
                {"encryption_context": {"n": str(i)}},
            )
            assert made.status == 200
            secrets_seen.append(base64.b64decode(made.data["plaintext"]))
            blobs.append(made.data["ciphertext"])
        payload = b"card-number-4111111111111111"
        secrets_seen.append(payload)
        sealed = call(
            "POST",
            "/v1/transit/encrypt/payments",
            {"plaintext": base64.b64encode(payload).decode()},
        )
        safe_bodies.append(sealed.raw)
        opened = call(
            "POST", "/v1/transit/decrypt/payments", {"ciphertext": sealed.data["ciphertext"]}
        )
        assert base64.b64decode(opened.data["plaintext"]) == payload
        tampered = blobs[0][:-6] + ("AAAA" if not blobs[0].endswith("AAAA==") else "BBBB") + "=="
        for body in (
            {"ciphertext": tampered, "encryption_context": {"n": "0"}},
            {"ciphertext": blobs[1], "encryption_context": {"n": "wrong"}},
            {"ciphertext": "sidecar:v1:!!!"},
        ):
            failed = call("POST", "/v1/transit/decrypt/payments", body)
            assert failed.status == 400
            safe_bodies.append(failed.raw)
        wrapped = call("POST", "/v1/transit/datakey/wrapped/payments")
        safe_bodies.append(wrapped.raw)
        tenant = call(
            "POST",
            "/v1/transit/datakey/plaintext/payments",
            {"encryption_context": {"tenant": "acme"}},
            headers={"Authorization": f"Bearer {good_jwt}"},
        )
        assert tenant.status == 200
        secrets_seen.append(base64.b64decode(tenant.data["plaintext"]))
        for headers in ({"Authorization": f"Bearer {expired_jwt}"}, {"X-Vault-Token": expired_jwt}):
            refused = call("POST", "/v1/transit/datakey/plaintext/payments", headers=headers)
            assert refused.status == 401
            safe_bodies.append(refused.raw)
        for path in (
            "/v1/sidecar/status",
            "/v1/transit/keys/payments",
            "/v1/sys/health",
            "/metrics",
        ):
            safe_bodies.append(call("GET", path).raw)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

    client = openbao.client()
    associated = base64.b64encode(b"kms-sidecar/kek/v1/payments").decode()  # how KEKs are wrapped
    for kek_ciphertext in {wrapped_kek_of(b) for b in blobs}:
        opened = client.adapter.post(
            "/v1/transit/decrypt/payments",
            json={"ciphertext": kek_ciphertext, "associated_data": associated},
        )
        kek = base64.b64decode(opened["data"]["plaintext"])
        assert len(kek) == 32
        secrets_seen.append(kek)

    outputs: dict[str, bytes] = {"log": log_path.read_bytes()}
    for path in sorted((short_tmp / "audit").iterdir()):
        outputs[f"audit {path.name}"] = path.read_bytes()
    for i, raw in enumerate(otlp.raw):
        outputs[f"otlp export {i}"] = raw
    for i, raw in enumerate(safe_bodies):
        outputs[f"response {i}"] = raw
    assert len([name for name in outputs if name.startswith("audit")]) >= 2, (
        "rotation was exercised"
    )
    assert otlp.raw, "spans were exported"
    assert b'"level": "DEBUG"' in outputs["log"] or b'"level": "INFO"' in outputs["log"]
    json.loads(outputs["log"].splitlines()[0])  # JSON log lines

    leaks = []
    for name, data in outputs.items():
        for secret in secrets_seen:
            for form in [secret, *forms(secret)] if len(secret) >= 16 else forms(secret):
                if form in data:
                    leaks.append(f"{name} holds a secret ({len(secret)} bytes)")
        for token in tokens:
            if token in data or token.split(b".")[2] in data:
                leaks.append(f"{name} holds a JWT")
    assert not leaks, leaks


def test_the_hsm_pin_reaches_no_output(short_tmp: Path) -> None:
    """The same search with the pkcs11 backend: for the PIN (right and wrong) and data keys."""
    missing = softhsm_missing()
    if missing:
        pytest.skip(missing)
    hsm = SoftHsm.create(short_tmp / "hsm", labels=("kms",))
    wrong_pin = secrets.token_hex(8)
    (short_tmp / "policies").mkdir()
    (short_tmp / "policies" / "p.toml").write_text(dev_policy(os.getuid()))
    sock = short_tmp / "h.sock"
    config = short_tmp / "sidecar.toml"
    config.write_text(
        f"""
[server]
socket = "{sock}"
[backend]
type = "pkcs11"
[backend.pkcs11]
module = "{SOFTHSM_MODULE}"
token_label = "kms"
pin_env = "KMS_HSM_PIN"
[keys.payments]
[audit]
path = "audit.log"
[telemetry]
log_format = "json"
log_level = "DEBUG"
"""
    )
    env = {**os.environ, **hsm.env(), "KMS_AUDIT_HMAC_KEY": secrets.token_hex(32)}
    outputs: dict[str, bytes] = {}
    created = subprocess.run(
        [sys.executable, "-m", "sidecar", "keys", "create", "payments", "--config", str(config)],
        env={**env, "KMS_HSM_PIN": hsm.pin},
        capture_output=True,
        timeout=60,
        check=True,
    )
    outputs["keys create"] = created.stdout + created.stderr
    data_keys: list[bytes] = []
    for pin, label in ((hsm.pin, "right"), (wrong_pin, "wrong")):
        log_path = short_tmp / f"{label}.log"
        with (
            open(log_path, "wb") as log_file,
            sidecar_process(config, sock, env={**env, "KMS_HSM_PIN": pin}, stderr=log_file) as proc,
        ):
            made = request(str(sock), "POST", "/v1/transit/datakey/plaintext/payments")
            outputs[f"{label} datakey"] = made.raw if label == "wrong" else b""
            if label == "right":
                assert made.status == 200, made
                data_keys.append(base64.b64decode(made.data["plaintext"]))
                opened = request(
                    str(sock),
                    "POST",
                    "/v1/transit/decrypt/payments",
                    {"ciphertext": made.data["ciphertext"]},
                )
                assert opened.status == 200
            else:
                assert made.status == 503 and made.code == "upstream_unavailable", made
            for path in (
                "/v1/sidecar/status",
                "/v1/sys/health",
                "/v1/transit/keys/payments",
                "/metrics",
            ):
                outputs[f"{label} {path}"] = request(str(sock), "GET", path).raw
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        outputs[f"{label} log"] = log_path.read_bytes()
    outputs["audit"] = (short_tmp / "audit.log").read_bytes()
    assert b"upstream_unavailable" in outputs["wrong datakey"]
    leaks = [
        f"{name} holds the {which} PIN"
        for name, data in outputs.items()
        for which, pin in (("right", hsm.pin), ("wrong", wrong_pin))
        if pin.encode() in data
    ]
    leaks += [
        f"{name} holds a data key"
        for name, data in outputs.items()
        for key in data_keys
        for form in forms(key)
        if form in data
    ]
    assert not leaks, leaks
