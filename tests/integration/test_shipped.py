"""The process as installed, on uvloop and on asyncio's loop, over both listeners.

Each module-scoped ``shipped`` sidecar is the ``kms-sidecar`` console script (``KMS_SIDECAR_LOOP``
chooses its loop) serving a world-connectable Unix socket and the mTLS listener. Requests go
over plain ``http.client``, several on one keep-alive connection, as clients send them.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import stat
from typing import Any

from tests.conftest import UnixHTTPConnection, run_as_another_uid
from tests.integration.conftest import Shipped

DATAKEY = "/v1/transit/datakey/plaintext/payments"
DECRYPT = "/v1/transit/decrypt/payments"


def mtls_connection(
    shipped: Shipped, client: tuple[Any, Any] | None
) -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=str(shipped.tls.ca_cert))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    return http.client.HTTPSConnection("127.0.0.1", shipped.tls.port, context=context, timeout=10)


def exchange(
    conn: http.client.HTTPConnection, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    payload = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=payload)
    response = conn.getresponse()
    raw = response.read()
    return response.status, json.loads(raw) if raw else None


def round_trips(conn: http.client.HTTPConnection) -> None:
    """Three datakey/decrypt round trips on one keep-alive connection."""
    for tenant in ("acme", "globex", "initech"):
        context = {"tenant": tenant}
        status, made = exchange(conn, "POST", DATAKEY, {"encryption_context": context})
        assert status == 200, made
        status, opened = exchange(
            conn,
            "POST",
            DECRYPT,
            {"ciphertext": made["data"]["ciphertext"], "encryption_context": context},
        )
        assert status == 200, opened
        assert opened["data"]["plaintext"] == made["data"]["plaintext"]
        assert len(base64.b64decode(opened["data"]["plaintext"])) == 32


def test_the_process_runs_on_the_loop_it_was_asked_for(shipped: Shipped) -> None:
    log = shipped.sidecar.log()
    assert f"event loop {shipped.loop}" in log, log[-2000:]
    assert "callers are told apart by their peer credentials" in log


def test_the_world_connectable_socket_has_its_mode(shipped: Shipped) -> None:
    mode = os.stat(shipped.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o666


def test_another_uid_connects_to_the_world_socket_and_the_policy_refuses_it(
    shipped: Shipped,
) -> None:
    out = run_as_another_uid(shipped.socket)
    assert out.stdout.split() == ["403", "permission_denied"], out.stderr


def test_unix_socket_round_trips_on_one_connection(shipped: Shipped) -> None:
    conn = UnixHTTPConnection(shipped.socket)
    try:
        round_trips(conn)
    finally:
        conn.close()


def test_mtls_listener_round_trips_on_one_connection(shipped: Shipped) -> None:
    conn = mtls_connection(shipped, shipped.client)
    try:
        round_trips(conn)
        status, body = exchange(conn, "GET", "/v1/transit/keys/payments")
        assert status == 200 and body["data"]["name"] == "payments", body
    finally:
        conn.close()


def test_mtls_caller_outside_the_policy_is_refused(shipped: Shipped) -> None:
    staging = shipped.tls.client("stg", spiffe_id="spiffe://example.org/ns/staging/sa/api")
    conn = mtls_connection(shipped, staging)
    try:
        status, body = exchange(conn, "POST", DATAKEY)
    finally:
        conn.close()
    assert status == 403 and body["code"] == "permission_denied", body


def test_many_connections_one_after_another(shipped: Shipped) -> None:
    """Each new connection is identified afresh (the per-connection identity cache)."""
    for _ in range(20):
        conn = mtls_connection(shipped, shipped.client)
        try:
            assert exchange(conn, "POST", DATAKEY)[0] == 200
        finally:
            conn.close()
        unix = UnixHTTPConnection(shipped.socket)
        try:
            assert exchange(unix, "POST", DATAKEY)[0] == 200
        finally:
            unix.close()
