"""The clients people use — the ``bao`` CLI and hvac — over the socket and over mTLS, against the
shipped process on both loops, for every route the docs promise.

``bao`` runs with a clean ``HOME`` and no ``BAO_TOKEN``/``VAULT_TOKEN``: a ``~/.vault-token``
(which ``bao server -dev`` writes) would make it send a token, which the sidecar refuses.
hvac reaches the Unix socket through a small requests adapter.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hvac
import pytest
import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from sidecar.devserver import find_bao
from tests.integration.conftest import Shipped

HELLO = base64.b64encode(b"hello").decode()
TRANSPORTS = ("socket", "mtls")


# -- hvac over a Unix socket ------------------------------------------------------------------


class _UnixConnection(HTTPConnection):
    def __init__(self, path: str, *args: Any, **kwargs: Any) -> None:
        super().__init__("localhost", *args, **kwargs)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self._path)
        self.sock = sock


class _UnixPool(HTTPConnectionPool):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self._path = path

    def _new_conn(self) -> HTTPConnection:
        return _UnixConnection(self._path)


class UnixAdapter(HTTPAdapter):
    """requests (so hvac) over one Unix socket, whatever the URL's host."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._pool = _UnixPool(path)

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> HTTPConnectionPool:
        return self._pool

    def get_connection(self, *args: Any, **kwargs: Any) -> HTTPConnectionPool:
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


def hvac_client(shipped: Shipped, transport: str, **kwargs: Any) -> hvac.Client:
    if transport == "socket":
        session = requests.Session()
        session.mount("http://", UnixAdapter(shipped.socket))
        return hvac.Client(url="http://localhost", session=session, **kwargs)
    cert, key = shipped.client
    return hvac.Client(
        url=shipped.tcp_url, cert=(str(cert), str(key)), verify=str(shipped.tls.ca_cert), **kwargs
    )


# -- bao ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_home(module_tmp: Path) -> Path:
    home = module_tmp / "home"
    home.mkdir(exist_ok=True)
    return home


def bao_env(shipped: Shipped, transport: str, home: Path) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}  # no token in the env or ~/
    if transport == "socket":
        env["BAO_ADDR"] = f"unix://{shipped.socket}"
    else:
        cert, key = shipped.client
        env.update(
            BAO_ADDR=shipped.tcp_url,
            BAO_CACERT=str(shipped.tls.ca_cert),
            BAO_CLIENT_CERT=str(cert),
            BAO_CLIENT_KEY=str(key),
        )
    return env


def bao(env: Mapping[str, str], *args: str) -> Any:
    """``bao ARGS -format=json``'s parsed output; fails with its stderr if it exits non-zero."""
    words = 2 if args[0] == "token" else 1  # flags follow the whole subcommand
    done = subprocess.run(
        [find_bao(), *args[:words], "-format=json", *args[words:]],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (args, done.stderr)
    return json.loads(done.stdout) if done.stdout.strip() else None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bao_cli_on_every_route_the_docs_promise(
    shipped: Shipped, transport: str, clean_home: Path
) -> None:
    env = bao_env(shipped, transport, clean_home)
    status = bao(env, "status")
    assert status["sealed"] is False and status["type"] == "kms-sidecar"
    assert "payments" in bao(env, "list", "transit/keys")
    looked = bao(env, "token", "lookup")["data"]
    assert looked["id"] == "" and looked["policies"], looked
    as_app = bao({**env, "BAO_TOKEN": shipped.jwt("orders-api")}, "token", "lookup")["data"]
    assert as_app["display_name"] == "jwt-orders-api" and as_app["id"] == ""
    made = bao(env, "write", "-f", "transit/datakey/plaintext/payments")["data"]
    opened = bao(env, "write", "transit/decrypt/payments", f"ciphertext={made['ciphertext']}")
    assert opened["data"]["plaintext"] == made["plaintext"]
    sealed = bao(env, "write", "transit/encrypt/payments", f"plaintext={HELLO}")["data"]
    opened = bao(env, "write", "transit/decrypt/payments", f"ciphertext={sealed['ciphertext']}")
    assert opened["data"]["plaintext"] == HELLO
    mac = bao(env, "write", "transit/hmac/payments", f"input={HELLO}")["data"]["hmac"]
    checked = bao(env, "write", "transit/verify/payments", f"input={HELLO}", f"hmac={mac}")
    assert checked["data"]["valid"] is True
    random = bao(env, "write", "transit/random/16", "format=hex")["data"]["random_bytes"]
    assert len(bytes.fromhex(random)) == 16
    assert bao(env, "write", "-f", "sys/tools/random/8")["data"]["random_bytes"]
    digest = bao(env, "write", "transit/hash/sha2-256", f"input={HELLO}")["data"]["sum"]
    assert digest == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert bao(env, "write", "sys/tools/hash", f"input={HELLO}")["data"]["sum"] == digest
    before = bao(env, "read", "transit/keys/spinning")["data"]["latest_version"]
    rotated = bao(env, "write", "-f", "transit/keys/spinning/rotate")["data"]
    assert rotated["latest_version"] == before + 1
    assert isinstance(rotated["keys"][str(before + 1)], int)
    signed = bao(env, "write", "transit/sign/signer", f"input={HELLO}")["data"]["signature"]
    verified = bao(env, "write", "transit/verify/signer", f"input={HELLO}", f"signature={signed}")
    assert verified["data"]["valid"] is True


@pytest.fixture
def no_token_around(clean_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hvac reads ``VAULT_TOKEN`` or ``~/.vault-token`` when given no token: a clean user."""
    monkeypatch.setenv("HOME", str(clean_home))
    monkeypatch.delenv("VAULT_TOKEN", raising=False)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hvac_on_every_route_the_docs_promise(
    shipped: Shipped, transport: str, no_token_around: None
) -> None:
    client = hvac_client(shipped, transport)
    transit = client.secrets.transit
    assert client.sys.is_sealed() is False
    assert client.auth.token.lookup_self()["data"]["id"] == ""
    # hvac answers is_authenticated() False without asking when it holds no token; with a JWT
    # (as BAO_TOKEN or hvac's token) it asks lookup-self, which knows the caller.
    assert client.is_authenticated() is False
    with_jwt = hvac_client(shipped, transport, token=shipped.jwt("payments-api"))
    assert with_jwt.is_authenticated() is True
    facts = with_jwt.auth.token.lookup_self()["data"]["sidecar"]["identity"]
    assert facts["jwt_sub"] == "payments-api" and facts["kind"] == "jwt"
    assert "payments" in transit.list_keys()["data"]["keys"]  # the LIST verb
    strict = hvac_client(shipped, transport, strict_http=True)
    assert "payments" in strict.secrets.transit.list_keys()["data"]["keys"]  # GET ?list=true

    made = transit.generate_data_key("payments", key_type="plaintext")["data"]
    opened = transit.decrypt_data("payments", made["ciphertext"])["data"]
    assert opened["plaintext"] == made["plaintext"]
    sealed = transit.encrypt_data("payments", HELLO)["data"]["ciphertext"]
    assert transit.decrypt_data("payments", sealed)["data"]["plaintext"] == HELLO

    mac = transit.generate_hmac("payments", HELLO)["data"]["hmac"]
    assert transit.verify_signed_data("payments", HELLO, hmac=mac)["data"]["valid"] is True
    mac512 = transit.generate_hmac("payments", HELLO, algorithm="sha2-512")["data"]["hmac"]
    assert mac512 != mac
    random = transit.generate_random_bytes(n_bytes=24)["data"]["random_bytes"]
    assert len(base64.b64decode(random)) == 24
    digest = transit.hash_data(HELLO, algorithm="sha2-256", output_format="hex")["data"]["sum"]
    assert digest == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"

    key = transit.read_key("spinning")["data"]
    assert key["type"] == "aes256-gcm96" and isinstance(key["keys"]["1"], int)
    transit.rotate_key("spinning")
    assert transit.read_key("spinning")["data"]["latest_version"] == key["latest_version"] + 1

    signed = transit.sign_data("signer", HELLO)["data"]["signature"]
    assert transit.verify_signed_data("signer", HELLO, signature=signed)["data"]["valid"] is True
    public = transit.read_key("signer")["data"]["keys"]["1"]["public_key"]
    assert len(base64.b64decode(public)) == 32  # ed25519 as Vault shows it

    with pytest.raises(hvac.exceptions.Forbidden):
        transit.generate_data_key("nosuch", key_type="plaintext")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hvac_with_a_bad_token_is_not_authenticated(shipped: Shipped, transport: str) -> None:
    client = hvac_client(shipped, transport, token="s.not-a-jwt")
    with pytest.raises(hvac.exceptions.Unauthorized):
        client.auth.token.lookup_self()
