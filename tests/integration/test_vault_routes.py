"""The routes Vault users reach for, on the shipped process (both loops, socket and mTLS).

HMACs are compared with what OpenBao itself answers for the same transit key: the sidecar asks
the upstream, so they must be equal.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import time
from typing import Any

import pytest

from sidecar.devserver import DevOpenBao
from tests.conftest import UnixHTTPConnection
from tests.integration.conftest import Shipped
from tests.integration.test_shipped import exchange, mtls_connection

HELLO = base64.b64encode(b"hello").decode()


def call(shipped: Shipped, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = UnixHTTPConnection(shipped.socket)
    try:
        return exchange(conn, method, path, body)
    finally:
        conn.close()


# -- listing keys --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["LIST", "GET"])
def test_keys_are_listed_with_the_list_verb_and_with_list_true(
    shipped: Shipped, method: str
) -> None:
    path = "/v1/transit/keys" + ("?list=true" if method == "GET" else "")
    status, body = call(shipped, method, path)
    assert status == 200, body
    assert body["data"] == {"keys": ["default", "payments", "signer", "spinning"]}


def test_list_after_a_request_with_a_body_on_one_connection(shipped: Shipped) -> None:
    """hvac reuses connections: a LIST after a POST on the same one is still read as LIST."""
    conn = UnixHTTPConnection(shipped.socket)
    try:
        assert (
            exchange(conn, "POST", "/v1/transit/encrypt/payments", {"plaintext": HELLO})[0] == 200
        )
        status, body = exchange(conn, "LIST", "/v1/transit/keys")
        assert status == 200 and body["data"]["keys"] == [
            "default",
            "payments",
            "signer",
            "spinning",
        ], body
        assert exchange(conn, "LIST", "/v1/transit/keys?foo=bar")[0] == 200
    finally:
        conn.close()


def test_a_list_that_cannot_be_read_tells_hvac_users_what_to_do(shipped: Shipped) -> None:
    """A LIST pipelined behind another request in one write fails to parse: Vault-shaped 400."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(shipped.socket)
        sock.sendall(
            b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n"
            b"LIST /v1/transit/keys HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400" and b"application/json" in head, answer[:300]
    assert b"strict_http=True" in body


def test_get_without_list_is_405_as_in_vault(shipped: Shipped) -> None:
    status, body = call(shipped, "GET", "/v1/transit/keys")
    assert status == 405 and body["code"] == "method_not_allowed"


# -- hmac ----------------------------------------------------------------------------------


def test_hmac_is_the_upstreams_and_verifies(shipped: Shipped, openbao: DevOpenBao) -> None:
    for suffix in ("", "/sha2-512"):
        status, body = call(shipped, "POST", f"/v1/transit/hmac/payments{suffix}", {"input": HELLO})
        assert status == 200, body
        direct = openbao.client().adapter.post(
            f"/v1/transit/hmac/payments{suffix}", json={"input": HELLO}
        )
        assert body["data"] == {"hmac": direct["data"]["hmac"]}
        mac = body["data"]["hmac"]
        path = f"/v1/transit/verify/payments{suffix}"
        assert call(shipped, "POST", path, {"input": HELLO, "hmac": mac})[1]["data"] == {
            "valid": True
        }
        other = base64.b64encode(b"hellO").decode()
        assert call(shipped, "POST", path, {"input": other, "hmac": mac})[1]["data"] == {
            "valid": False
        }


def test_hmac_batch_echoes_references_and_fails_items_alone(shipped: Shipped) -> None:
    status, body = call(
        shipped,
        "POST",
        "/v1/transit/hmac/payments",
        {"batch_input": [{"input": HELLO, "reference": "a"}, {"input": "%%", "reference": "b"}]},
    )
    assert status == 400, body  # one item failed, as Vault answers
    first, second = body["data"]["batch_results"]
    assert first["hmac"].startswith("vault:v") and first["reference"] == "a"
    assert second["code"] == "invalid_request" and second["reference"] == "b"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/transit/hmac/payments/md5", {"input": HELLO}),
        ("/v1/transit/hmac/payments", {"input": HELLO, "algorithm": "sha1"}),
        ("/v1/transit/hmac/payments", {}),
        ("/v1/transit/hmac/payments", {"input": HELLO, "key_version": 99}),
    ],
)
def test_bad_hmac_requests_are_400(shipped: Shipped, path: str, body: Any) -> None:
    status, answer = call(shipped, "POST", path, body)
    assert status == 400 and answer["code"] == "invalid_request", answer


def test_hmac_of_an_unknown_key_is_refused_like_a_forbidden_one(shipped: Shipped) -> None:
    status, answer = call(shipped, "POST", "/v1/transit/hmac/nosuch", {"input": HELLO})
    assert status == 403 and answer["code"] == "permission_denied"


# -- random and hash -------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/v1/transit", "/v1/sys/tools"])
def test_random_bytes_in_size_and_format(shipped: Shipped, prefix: str) -> None:
    assert (
        len(base64.b64decode(call(shipped, "POST", f"{prefix}/random")[1]["data"]["random_bytes"]))
        == 32
    )
    answer = call(shipped, "POST", f"{prefix}/random/platform/16", {"format": "hex"})[1]
    assert len(bytes.fromhex(answer["data"]["random_bytes"])) == 16
    answer = call(shipped, "POST", f"{prefix}/random/24")[1]
    assert len(base64.b64decode(answer["data"]["random_bytes"])) == 24
    answer = call(shipped, "POST", f"{prefix}/random", {"bytes": 8})[1]
    assert len(base64.b64decode(answer["data"]["random_bytes"])) == 8
    for bad in ("/random/0", "/random/131073", "/random/elsewhere"):
        status, body = call(shipped, "POST", f"{prefix}{bad}")
        assert status == 400 and body["code"] == "invalid_request", (bad, body)


@pytest.mark.parametrize("prefix", ["/v1/transit", "/v1/sys/tools"])
def test_hash_known_answers(shipped: Shipped, prefix: str) -> None:
    answer = call(shipped, "POST", f"{prefix}/hash", {"input": HELLO})[1]
    assert answer["data"] == {"sum": hashlib.sha256(b"hello").hexdigest()}
    answer = call(shipped, "POST", f"{prefix}/hash/sha3-512", {"input": HELLO, "format": "base64"})
    digest = base64.b64encode(hashlib.sha3_512(b"hello").digest()).decode()
    assert answer[1]["data"] == {"sum": digest}
    status, body = call(shipped, "POST", f"{prefix}/hash/md5", {"input": HELLO})
    assert status == 400 and body["code"] == "invalid_request"
    big = base64.b64encode(b"x" * 65537).decode()
    assert call(shipped, "POST", f"{prefix}/hash", {"input": big})[0] == 400


# -- seal-status and token lookup ------------------------------------------------------------


def test_seal_status_is_an_unsealed_node_naming_the_sidecar(shipped: Shipped) -> None:
    status, body = call(shipped, "GET", "/v1/sys/seal-status")
    assert status == 200
    assert body["sealed"] is False and body["initialized"] is True
    assert body["cluster_name"] == "kms-sidecar" and "vault backend" in body["storage_type"]


def test_lookup_self_is_the_caller_as_proved_over_the_socket(shipped: Shipped) -> None:
    status, body = call(shipped, "GET", "/v1/auth/token/lookup-self")
    assert status == 200, body
    data = body["data"]
    assert data["id"] == "" and data["display_name"] == f"unix-{os.getuid()}"
    identity = data["sidecar"]["identity"]
    assert identity["unix_uid"] == os.getuid() and identity["pid"] > 0
    assert identity["kind"] == "unix" and "spiffe_id" not in identity
    assert data["meta"]["unix_uid"] == str(os.getuid())
    assert data["policies"] == ["test-user"]
    (rule,) = data["sidecar"]["rules"]
    assert (
        rule["name"] == "test-user"
        and rule["effect"] == "allow"
        and "datakey" in rule["operations"]
    )


def test_lookup_self_over_mtls_names_the_spiffe_id(shipped: Shipped) -> None:
    conn = mtls_connection(shipped, shipped.client)
    try:
        status, body = exchange(conn, "GET", "/v1/auth/token/lookup-self")
    finally:
        conn.close()
    assert status == 200, body
    identity = body["data"]["sidecar"]["identity"]
    assert identity == {
        "kind": "mtls",
        "spiffe_id": "spiffe://example.org/ns/prod/sa/api",
        "tls_subject": identity["tls_subject"],
    }
    assert body["data"]["policies"] == ["mesh-prod"]


def test_a_token_never_comes_back(shipped: Shipped) -> None:
    conn = UnixHTTPConnection(shipped.socket)
    try:
        conn.request("GET", "/v1/auth/token/lookup-self", headers={"X-Vault-Token": "s.secret"})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    assert response.status == 401 and b"s.secret" not in raw


# -- key metadata and key_version ------------------------------------------------------------


def test_key_versions_map_to_creation_times(shipped: Shipped, openbao: DevOpenBao) -> None:
    status, body = call(shipped, "GET", "/v1/transit/keys/payments")
    assert status == 200
    upstream = openbao.client().secrets.transit.read_key("payments")["data"]["keys"]
    assert body["data"]["keys"] == upstream
    assert all(isinstance(t, int) and t > time.time() - 86400 for t in upstream.values())


def test_key_version_on_encrypt_is_honoured_or_refused(shipped: Shipped) -> None:
    latest = call(shipped, "GET", "/v1/transit/keys/payments")[1]["data"]["latest_version"]
    for version in (0, latest, str(latest)):
        status, body = call(
            shipped,
            "POST",
            "/v1/transit/encrypt/payments",
            {"plaintext": HELLO, "key_version": version},
        )
        assert status == 200 and body["data"]["key_version"] == latest, body
    for version in (latest + 1, "x"):
        status, body = call(
            shipped,
            "POST",
            "/v1/transit/encrypt/payments",
            {"plaintext": HELLO, "key_version": version},
        )
        assert status == 400 and "key_version" in body["errors"][0], body
    status, body = call(
        shipped, "POST", "/v1/transit/datakey/plaintext/payments", {"key_version": latest + 1}
    )
    assert status == 400 and "key_version" in body["errors"][0]
