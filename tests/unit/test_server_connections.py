"""Each connection's identity is read once and kept for its life, on every event loop.

uvloop's transports take no weak references, which once made every mTLS request a 500 when
uvloop was installed; these tests serve real listeners on uvloop and on asyncio's loop.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.backends.memory import MemoryBackend
from sidecar.server.run import build_services, make_app
from sidecar.transport.identities import ConnectionIdentities
from sidecar.transport.tls import ServerTls
from tests.conftest import UnixHTTPConnection, sidecar_config
from tests.security.test_callers import TlsFiles
from tests.security.test_callers import tls_files as tls_files  # the fixture

DATAKEY = "/v1/transit/datakey/plaintext/payments"


class FakeTransport:
    def __init__(self) -> None:
        self.closing = False

    def get_extra_info(self, name: str) -> Any:
        return None

    def is_closing(self) -> bool:
        return self.closing


def test_identities_of_closed_connections_are_swept() -> None:
    connections = ConnectionIdentities()
    transports = [FakeTransport() for _ in range(64)]
    for transport in transports:
        connections.identity(transport)
    assert len(connections) == 64
    assert connections.identity(transports[0]) is connections.identity(transports[0])
    for transport in transports[1:]:
        transport.closing = True
    newest = FakeTransport()
    connections.identity(newest)  # the 65th: sweeps the 63 closed ones
    assert len(connections) == 2
    assert connections.open_transports() == [transports[0], newest]
    newest.closing = True
    assert connections.open_transports() == [transports[0]]
    assert connections.identity(None).kind == "anonymous"


def _loops() -> list[Any]:
    loops: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        loops.append(pytest.param(None, id="uvloop", marks=pytest.mark.skip("no uvloop")))
    else:
        loops.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return loops


POLICY = """
[[allow]]
name = "unix-user"
when.unix_uid = [{uid}]
keys = ["payments"]
operations = ["datakey"]

[[allow]]
name = "spiffe-app"
when.spiffe_id = "spiffe://example.org/app"
keys = ["payments"]
operations = ["datakey"]
"""


@pytest.mark.parametrize("new_loop", _loops())
def test_unix_and_mtls_listeners_answer_on_every_loop(
    new_loop: Callable[[], asyncio.AbstractEventLoop], tls_files: TlsFiles
) -> None:
    files = tls_files
    client_cert = files.client("app", spiffe_id="spiffe://example.org/app")
    socket_path = str(files.dir / "s.sock")
    config = sidecar_config(
        Path(socket_path),
        policy=POLICY.format(uid=os.getuid()),
        keys={"payments": {}},
        audit={"path": str(files.dir / "audit.log")},
    )

    def unix_twice() -> list[int]:
        conn = UnixHTTPConnection(socket_path)
        try:
            statuses = []
            for _ in range(2):  # the second request reuses the connection's identity
                conn.request("POST", DATAKEY, body=b"")
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
            return statuses
        finally:
            conn.close()

    def mtls_twice() -> list[tuple[int, str]]:
        context = ssl.create_default_context(cafile=str(files.ca_cert))
        context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        conn = http.client.HTTPSConnection("127.0.0.1", files.port, context=context, timeout=10)
        try:
            answers = []
            for _ in range(2):
                conn.request("POST", DATAKEY, body=b"")
                response = conn.getresponse()
                answers.append((response.status, response.read().decode()))
            return answers
        finally:
            conn.close()

    async def serve() -> tuple[list[int], list[tuple[int, str]]]:
        services = build_services(config, MemoryBackend({"payments": "aes256"}))
        tls = ServerTls(str(files.server_cert), str(files.server_key), str(files.ca_cert))
        runner = web.AppRunner(make_app(services), access_log=None)
        await runner.setup()
        try:
            await web.UnixSite(runner, socket_path).start()
            await web.TCPSite(runner, "127.0.0.1", files.port, ssl_context=tls.context).start()
            loop = asyncio.get_running_loop()
            unix = await loop.run_in_executor(None, unix_twice)
            mtls = await loop.run_in_executor(None, mtls_twice)
            return unix, mtls
        finally:
            await runner.cleanup()

    loop = new_loop()
    try:
        unix, mtls = loop.run_until_complete(serve())
    finally:
        loop.close()
    assert unix == [200, 200]
    assert [status for status, _ in mtls] == [200, 200], mtls
    rules = [
        json.loads(line).get("rule")
        for line in (files.dir / "audit.log").read_text().splitlines()
        if '"event":"request"' in line
    ]
    assert rules == ["unix-user", "unix-user", "spiffe-app", "spiffe-app"]
