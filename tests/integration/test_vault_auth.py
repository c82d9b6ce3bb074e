"""The sidecar's own upstream login against a real OpenBao: AppRole, JWT and token files.

Each test enables its own auth mount and policy on the shared dev server, gives the sidecar
credentials with short TTLs and keeps it busy with requests that must reach the upstream (a
``kek_ttl`` of 2 s, and a cache flush before every decrypt), so a token that lapsed would show
up as a failed request.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.devserver import DevOpenBao
from tests.conftest import RunningSidecar, sidecar_config

DATAKEY = "/v1/transit/datakey/plaintext/payments"
DECRYPT = "/v1/transit/decrypt/payments"
FLUSH = "/v1/sidecar/cache/flush"
#: What an OpenBao service token looks like; none may appear in logs or status.
TOKEN_PATTERN = re.compile(r"\bs\.[A-Za-z0-9]{20,}")
#: Keys that make the sidecar call upstream often, with no grace to hide a lapsed token.
BUSY_KEYS = {"payments": {"kek_ttl": "2s", "upstream_grace": "0s", "root_poll_interval": "1s"}}


def _transit_policy(bao: DevOpenBao, key: str = "payments") -> str:
    """A policy allowing what the sidecar does with ``key``; returns its name."""
    name = f"sidecar-{secrets.token_hex(4)}"
    bao.client().sys.create_or_update_policy(
        name,
        f"""
        path "{bao.mount}/datakey/plaintext/{key}" {{ capabilities = ["update"] }}
        path "{bao.mount}/decrypt/{key}" {{ capabilities = ["update"] }}
        path "{bao.mount}/keys/{key}" {{ capabilities = ["read"] }}
        """,
    )
    return name


def _vault(bao: DevOpenBao, **settings: Any) -> dict[str, Any]:
    return {"backend": {"type": "vault", "vault": {"addresses": [bao.address], **settings}}}


def _round_trip(sidecar: RunningSidecar) -> list[str]:
    """A data key, a cache flush and a decrypt that must unwrap upstream; the failures seen."""
    made = sidecar.request("POST", DATAKEY, {})
    if made.status != 200:
        return [f"datakey: {made!r}"]
    sidecar.request("POST", FLUSH, {"key": "payments"})
    opened = sidecar.request("POST", DECRYPT, {"ciphertext": made.data["ciphertext"]})
    if opened.status != 200 or opened.data["plaintext"] != made.data["plaintext"]:
        return [f"decrypt: {opened!r}"]
    return []


def _auth_status(sidecar: RunningSidecar) -> dict[str, Any]:
    status = sidecar.request("GET", "/v1/sidecar/status")
    assert status.status == 200, status
    auth: dict[str, Any] = status.data["backend"]["auth"]
    return auth


def _assert_nothing_secret(texts: list[str], *secret_values: str) -> None:
    for text in texts:
        for value in secret_values:
            assert value not in text
        assert not TOKEN_PATTERN.search(text), TOKEN_PATTERN.search(text)


def test_approle_token_is_renewed_and_replaced_under_load(
    openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = openbao.client()
    mount = f"approle-{secrets.token_hex(4)}"
    client.sys.enable_auth_method("approle", path=mount)
    client.auth.approle.create_or_update_approle(
        "sidecar",
        token_policies=[_transit_policy(openbao)],
        token_ttl="6s",
        token_max_ttl="12s",
        mount_point=mount,
    )
    role_id = client.auth.approle.read_role_id("sidecar", mount_point=mount)["data"]["role_id"]
    secret_id = client.auth.approle.generate_secret_id("sidecar", mount_point=mount)["data"][
        "secret_id"
    ]
    secret_file = short_tmp / "secret-id"
    secret_file.write_text(secret_id + "\n")
    sidecar = run_sidecar(
        sidecar_config(
            short_tmp / "s.sock",
            **_vault(
                openbao,
                auth_method="approle",
                role_id=role_id,
                secret_id_file=str(secret_file),
                auth_mount=mount,
            ),
            keys=BUSY_KEYS,
        )
    )

    failures: list[str] = []
    rounds = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        failures += _round_trip(sidecar)
        rounds += 1
        time.sleep(0.1)  # pacing the load, not waiting for anything

    auth = _auth_status(sidecar)
    print(
        f"approle over 30 s: {rounds} round trips, {len(failures)} failed, "
        f"{auth['renewals']} renewals, {auth['logins']} logins"
    )
    assert failures == [], failures[:5]
    # 6 s tokens renewed at half their TTL until the 12 s max: ~3 renewals and 1 login per 12 s.
    assert auth["method"] == "approle" and auth["state"] == "ok", auth
    assert auth["renewals"] >= 4, auth
    assert auth["logins"] >= 3, auth
    assert auth["last_error"] is None
    assert rounds > 50
    _assert_nothing_secret(
        [caplog.text, json.dumps(sidecar.request("GET", "/v1/sidecar/status").json)],
        secret_id,
    )


def test_jwt_login_rereads_a_rotated_jwt_file(
    openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    signing_key = ec.generate_private_key(ec.SECP256R1())
    public_pem = (
        signing_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    client = openbao.client()
    mount = f"jwt-{secrets.token_hex(4)}"
    client.sys.enable_auth_method("jwt", path=mount)
    client.auth.jwt.configure(jwt_validation_pubkeys=[public_pem], path=mount)
    client.auth.jwt.create_role(
        "sidecar",
        user_claim="sub",
        allowed_redirect_uris=[],
        role_type="jwt",
        bound_audiences=["kms-sidecar"],
        # No leeway: an expired JWT must be refused, or the test would prove nothing.
        clock_skew_leeway=-1,
        expiration_leeway=-1,
        not_before_leeway=-1,
        token_policies=[_transit_policy(openbao)],
        token_ttl="2s",
        token_max_ttl="4s",
        path=mount,
    )

    def make_jwt(lifetime: int) -> str:
        now = int(time.time())
        claims = {"sub": "host-1", "aud": "kms-sidecar", "iat": now, "exp": now + lifetime}
        return pyjwt.encode(claims, signing_key, algorithm="ES256")

    first = make_jwt(5)
    jwt_file = short_tmp / "jwt"
    jwt_file.write_text(first)
    first_expires = time.time() + 5
    sidecar = run_sidecar(
        sidecar_config(
            short_tmp / "s.sock",
            **_vault(
                openbao, auth_method="jwt", role="sidecar", jwt_file=str(jwt_file), auth_mount=mount
            ),
            keys=BUSY_KEYS,
        )
    )
    assert _round_trip(sidecar) == []
    # Rotate the file the way a projected service-account token is rotated: a new file
    # renamed over the old one.
    second = make_jwt(120)
    staged = short_tmp / "jwt.new"
    staged.write_text(second)
    staged.replace(jwt_file)

    failures: list[str] = []
    logins_at_expiry: int | None = None
    while time.time() < first_expires + 15:
        failures += _round_trip(sidecar)
        logins = _auth_status(sidecar)["logins"]
        if logins_at_expiry is None:
            if time.time() > first_expires + 0.5:
                logins_at_expiry = logins
        elif logins >= logins_at_expiry + 2:
            break
        time.sleep(0.1)  # pacing the load
    auth = _auth_status(sidecar)
    assert failures == [], failures[:5]
    # Logins after the first JWT expired can only have used the rotated file.
    assert logins_at_expiry is not None and auth["logins"] >= logins_at_expiry + 2, auth
    assert auth["state"] == "ok" and auth["last_error"] is None, auth
    _assert_nothing_secret([caplog.text, json.dumps(auth)], first, second)


def test_a_changed_token_file_is_used_and_a_revoked_token_is_reported(
    openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = openbao.client()
    policy = _transit_policy(openbao)
    first, second = (
        client.auth.token.create(policies=[policy], ttl="1h")["auth"]["client_token"]
        for _ in range(2)
    )
    token_file = short_tmp / "token"
    token_file.write_text(first)
    sidecar = run_sidecar(
        sidecar_config(
            short_tmp / "s.sock",
            **_vault(openbao, auth_method="token", token_file=str(token_file)),
            keys=BUSY_KEYS,
        )
    )
    assert _round_trip(sidecar) == []
    auth = _auth_status(sidecar)
    assert auth["logins"] == 1 and auth["renewable"] and auth["token_ttl"] > 3000, auth

    made = sidecar.request("POST", DATAKEY, {})
    assert made.status == 200, made
    client.auth.token.revoke(first)
    sidecar.request("POST", FLUSH, {"key": "payments"})
    refused = sidecar.request("POST", DECRYPT, {"ciphertext": made.data["ciphertext"]})
    assert refused.status == 503 and refused.code == "upstream_unavailable", refused
    auth = _auth_status(sidecar)
    assert auth["state"] == "failing" and "refused" in auth["last_error"], auth

    token_file.write_text(second)  # picked up at the next upstream call, no backoff wait
    opened = sidecar.request("POST", DECRYPT, {"ciphertext": made.data["ciphertext"]})
    assert opened.status == 200 and opened.data["plaintext"] == made.data["plaintext"], opened
    auth = _auth_status(sidecar)
    assert auth["state"] == "ok" and auth["logins"] == 2, auth
    _assert_nothing_secret([caplog.text, json.dumps(auth)], first, second)
