"""Who may call, over real sockets: JWT tenants, mTLS SPIFFE IDs, deny-wins and rate limits.

The installed ``kms-sidecar run`` process on uvloop and on asyncio's loop, a real OpenBao behind
it, a JWKS file, TLS 1.3 handshakes with certificates made by ``cryptography`` in fixtures.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509

from sidecar.devserver import DevOpenBao
from tests.conftest import (
    LOOPS,
    TOKEN_ENV,
    ProcessSidecar,
    Response,
    request,
    shipped_sidecar,
)
from tests.pki import TlsFiles, make_tls_files, new_ca, server_cert, write_pem
from tests.security.test_jwt import AUDIENCE, ISSUER, Keys, jwks, keys  # fixtures

__all__ = ["keys"]

UID = os.getuid()
DATAKEY = "/v1/transit/datakey/plaintext/payments"

POLICY = f"""
[[allow]]
name = "tenant-jwt"
when.jwt_iss = "{ISSUER}"
keys = ["payments"]
operations = ["datakey", "decrypt"]
context.tenant = "{{jwt.claims.tenant}}"

[[allow]]
name = "mesh-prod"
when.spiffe_id = "spiffe://example.org/ns/prod/sa/*"
keys = ["payments"]
operations = ["datakey"]

[[allow]]
name = "local-limited"
when.unix_uid = [{UID}]
keys = ["local"]
operations = ["datakey"]
rate = "5/s"

[[allow]]
name = "local-orders"
when.unix_uid = [{UID}]
keys = ["orders"]
operations = ["*"]

[[deny]]
name = "orders-frozen"
when.unix_uid = [{UID}]
keys = ["orders"]
operations = ["rotate"]
"""


def token(private: Any, kid: str = "rsa-1", **claims: Any) -> str:
    now = int(time.time())
    body = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "tenant-app",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    body.update(claims)
    return jwt.encode(body, private, algorithm="RS256", headers={"kid": kid})


@dataclass
class Guarded:
    """The shipped process behind :data:`POLICY`, with its mTLS listener's PKI."""

    sidecar: ProcessSidecar
    tls: TlsFiles

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Response:
        return self.sidecar.request(method, path, body, **kwargs)


@pytest.fixture(scope="module", params=LOOPS)
def guarded(
    request: pytest.FixtureRequest, openbao: DevOpenBao, module_tmp: Path, keys: Keys
) -> Iterator[Guarded]:
    """``kms-sidecar run`` as installed, on each event loop: JWTs from a JWKS file, the mTLS
    listener, and :data:`POLICY`."""
    loop: str = request.param
    directory = module_tmp / loop
    directory.mkdir()
    tls = make_tls_files(directory)
    (directory / "policies").mkdir()
    (directory / "policies" / "p.toml").write_text(POLICY)
    (directory / "jwks.json").write_text(json.dumps(jwks(keys)))
    sock = directory / "g.sock"
    config = directory / "sidecar.toml"
    config.write_text(
        f'[server]\nsocket = "{sock}"\nsocket_mode = "0600"\n'
        f'tcp_address = "127.0.0.1:{tls.port}"\ntls_cert_file = "server.crt"\n'
        'tls_key_file = "server.key"\ntls_client_ca_file = "ca.crt"\n'
        f'[auth]\njwt_issuer = "{ISSUER}"\njwt_audiences = ["{AUDIENCE}"]\n'
        'jwt_jwks_file = "jwks.json"\n'
        f'[backend.vault]\naddresses = ["{openbao.address}"]\ntoken_env = "{TOKEN_ENV}"\n'
        "[keys.payments]\n[keys.local]\n[keys.orders]\n"
    )
    with shipped_sidecar(config, sock, loop=loop) as sidecar:
        yield Guarded(sidecar, tls)


# -- JWT ----------------------------------------------------------------------------------


def test_jwt_caller_gets_keys_only_for_its_own_tenant(guarded: Guarded, keys: Keys) -> None:
    acme = {"Authorization": f"Bearer {token(keys.rsa_key, tenant='acme')}"}
    made = guarded.request(
        "POST", DATAKEY, {"encryption_context": {"tenant": "acme"}}, headers=acme
    )
    assert made.status == 200, made
    other = guarded.request(
        "POST", DATAKEY, {"encryption_context": {"tenant": "globex"}}, headers=acme
    )
    assert other.status == 403 and other.code == "permission_denied"
    none = guarded.request("POST", DATAKEY, headers=acme)
    assert none.status == 403, "a missing context value does not match the binding"
    # X-Vault-Token works the same, so BAO_TOKEN=<jwt> works
    opened = guarded.request(
        "POST",
        "/v1/transit/decrypt/payments",
        {"ciphertext": made.data["ciphertext"], "encryption_context": {"tenant": "acme"}},
        headers={"X-Vault-Token": token(keys.rsa_key, tenant="acme")},
    )
    assert opened.status == 200 and opened.data["plaintext"] == made.data["plaintext"]
    globex = {"Authorization": f"Bearer {token(keys.rsa_key, tenant='globex')}"}
    stolen = guarded.request(
        "POST",
        "/v1/transit/decrypt/payments",
        {"ciphertext": made.data["ciphertext"], "encryption_context": {"tenant": "acme"}},
        headers=globex,
    )
    assert stolen.status == 403, "another tenant cannot open acme's keys"


@pytest.mark.parametrize(
    "case",
    ["expired", "wrong issuer", "wrong audience", "unknown key", "garbage", "alg none"],
)
def test_hostile_tokens_are_401_over_the_socket(guarded: Guarded, keys: Keys, case: str) -> None:
    now = int(time.time())
    tokens = {
        "expired": token(
            keys.rsa_key, tenant="acme", exp=now - 3600, iat=now - 7200, nbf=now - 7200
        ),
        "wrong issuer": token(keys.rsa_key, tenant="acme", iss="https://evil.test"),
        "wrong audience": token(keys.rsa_key, tenant="acme", aud="someone-else"),
        "unknown key": token(keys.stranger, kid="rsa-1", tenant="acme"),
        "garbage": "not.a.jwt",
        "alg none": jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 60, "tenant": "acme"},
            None,
            algorithm="none",
        ),
    }
    answer = guarded.request(
        "POST",
        DATAKEY,
        {"encryption_context": {"tenant": "acme"}},
        headers={"Authorization": f"Bearer {tokens[case]}"},
    )
    assert answer.status == 401 and answer.code == "unauthenticated", answer
    assert answer.json["errors"][0].startswith("The token was refused:")
    assert tokens[case] not in answer.raw.decode()


# -- peer credentials: deny wins, rate limits ----------------------------------------------


def test_deny_rule_wins_over_allow(guarded: Guarded) -> None:
    assert guarded.request("POST", "/v1/transit/datakey/plaintext/orders").status == 200
    denied = guarded.request("POST", "/v1/transit/keys/orders/rotate")
    assert denied.status == 403 and denied.code == "permission_denied"


def test_unknown_key_is_refused_exactly_like_a_forbidden_one(guarded: Guarded) -> None:
    forbidden = guarded.request("POST", "/v1/transit/datakey/plaintext/payments")  # no rule for uid
    unknown = guarded.request("POST", "/v1/transit/datakey/plaintext/nosuch")
    assert forbidden.status == unknown.status == 403
    assert forbidden.json["errors"][0].replace("payments", "X") == unknown.json["errors"][
        0
    ].replace("nosuch", "X")


def test_rate_limit_answers_429_with_retry_after(guarded: Guarded) -> None:
    answers = [guarded.request("POST", "/v1/transit/datakey/plaintext/local") for _ in range(12)]
    statuses = [a.status for a in answers]
    assert statuses.count(200) >= 5 and 429 in statuses, statuses
    limited = next(a for a in answers if a.status == 429)
    assert limited.code == "rate_limited" and int(limited.headers["Retry-After"]) >= 1


# -- mTLS ----------------------------------------------------------------------------------


@pytest.fixture
def tls_files(short_tmp: Path) -> TlsFiles:
    return make_tls_files(short_tmp)


def mtls_request(
    files: TlsFiles, client: tuple[Path, Path] | None, *, tls12: bool = False
) -> tuple[int, dict[str, Any]]:
    context = ssl.create_default_context(cafile=str(files.ca_cert))
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if client:
        context.load_cert_chain(str(client[0]), str(client[1]))
    conn = http.client.HTTPSConnection("127.0.0.1", files.port, context=context, timeout=10)
    try:
        conn.request("POST", DATAKEY, body=b"")
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_mtls_caller_is_known_by_its_spiffe_id(guarded: Guarded) -> None:
    prod = guarded.tls.client("api", spiffe_id="spiffe://example.org/ns/prod/sa/api")
    status, body = mtls_request(guarded.tls, prod)
    assert status == 200, body
    assert body["data"]["ciphertext"].startswith("sidecar:v")
    staging = guarded.tls.client("stg", spiffe_id="spiffe://example.org/ns/staging/sa/api")
    status, body = mtls_request(guarded.tls, staging)
    assert status == 403 and body["code"] == "permission_denied"


@pytest.mark.parametrize("case", ["no certificate", "another CA", "expired", "TLS 1.2"])
def test_mtls_refuses_bad_clients_at_the_handshake(guarded: Guarded, case: str) -> None:
    spiffe = "spiffe://example.org/ns/prod/sa/api"
    client = {
        "no certificate": None,
        "another CA": guarded.tls.client("rogue", spiffe_id=spiffe, ca=new_ca("rogue CA")),
        "expired": guarded.tls.client("old", spiffe_id=spiffe, expired=True),
        "TLS 1.2": guarded.tls.client("legacy", spiffe_id=spiffe),
    }[case]
    with pytest.raises((ssl.SSLError, ConnectionError, socket.error)):
        mtls_request(guarded.tls, client, tls12=case == "TLS 1.2")


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _served_serial(files: TlsFiles) -> int:
    context = ssl.create_default_context(cafile=str(files.ca_cert))
    client = files.client("probe", spiffe_id="spiffe://example.org/ns/prod/sa/probe")
    context.load_cert_chain(str(client[0]), str(client[1]))
    with (
        socket.create_connection(("127.0.0.1", files.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_reloads_tls_files_and_keeps_old_ones_if_broken(
    openbao: DevOpenBao, tls_files: TlsFiles
) -> None:
    import signal

    from tests.conftest import sidecar_process, wait_for

    config = tls_files.dir / "sidecar.toml"
    (tls_files.dir / "policies").mkdir()
    config.write_text(
        f"""
[server]
socket = "{tls_files.dir / "t.sock"}"
tcp_address = "127.0.0.1:{tls_files.port}"
tls_cert_file = "server.crt"
tls_key_file = "server.key"
tls_client_ca_file = "ca.crt"
[backend.vault]
addresses = ["{openbao.address}"]
token_env = "{TOKEN_ENV}"
[keys.payments]
"""
    )
    with sidecar_process(config, tls_files.dir / "t.sock") as proc:
        wait_for(lambda: _listening(tls_files.port), proc)
        first = _served_serial(tls_files)
        ca = x509.load_pem_x509_certificate(tls_files.ca_cert.read_bytes())
        renewed, key = server_cert(ca, tls_files.ca_key)
        write_pem(tls_files.dir, "server", renewed, key)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _served_serial(tls_files) == renewed.serial_number, proc)
        assert renewed.serial_number != first
        tls_files.server_cert.write_text("not a certificate")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # nothing to poll for: the point is that nothing changes
        assert _served_serial(tls_files) == renewed.serial_number
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_sighup_withdraws_a_jwt_signing_key(
    openbao: DevOpenBao, keys: Keys, short_tmp: Path
) -> None:
    """A signing key removed from the JWKS file stops verifying after SIGHUP, without a restart."""
    import signal

    from tests.conftest import sidecar_process, wait_for

    jwks_file = short_tmp / "jwks.json"
    jwks_file.write_text(json.dumps(jwks(keys)))
    (short_tmp / "policies").mkdir()
    (short_tmp / "policies" / "p.toml").write_text(POLICY)
    sock = short_tmp / "j.sock"
    config = short_tmp / "sidecar.toml"
    config.write_text(
        f'[server]\nsocket = "{sock}"\n'
        f'[auth]\njwt_issuer = "{ISSUER}"\njwt_audiences = ["{AUDIENCE}"]\njwt_jwks_file = "jwks.json"\n'
        f'[backend.vault]\naddresses = ["{openbao.address}"]\ntoken_env = "{TOKEN_ENV}"\n[keys.payments]\n'
    )
    body = {"encryption_context": {"tenant": "acme"}}
    with sidecar_process(config, sock) as proc:

        def status() -> int:
            bearer = {"Authorization": f"Bearer {token(keys.rsa_key, tenant='acme')}"}
            return request(str(sock), "POST", DATAKEY, body, headers=bearer).status

        assert status() == 200
        remaining = jwks(keys)
        remaining["keys"] = [k for k in remaining["keys"] if k["kid"] != "rsa-1"]
        jwks_file.write_text(json.dumps(remaining))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: status() == 401, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
