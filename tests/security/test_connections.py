"""Abusive connections are bounded, and a good client is still served (issue 11 D4, D9, D10).

Small numbers and short deadlines, against the installed ``kms-sidecar run`` on each event loop
it ships with (uvloop and asyncio's), over its Unix socket. ``bench/bench_connections.py``
measures the same at scale.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.devserver import DevOpenBao
from tests.conftest import LOOPS, TOKEN_ENV, ProcessSidecar, shipped_sidecar
from tests.integration.conftest import shipped_policy

DATAKEY = "/v1/transit/datakey/wrapped/payments"
LIMITS = (
    'idle_timeout = "1s"\nheader_timeout = "0.5s"\nbody_timeout = "0.5s"\n'
    "max_connections = 12\nmax_connections_per_uid = 6\nlisten_backlog = 333\n"
)


@pytest.fixture(scope="module", params=LOOPS)
def sidecar(
    request: pytest.FixtureRequest, openbao: DevOpenBao, module_tmp: Path
) -> Iterator[ProcessSidecar]:
    directory = module_tmp / request.param
    (directory / "policies").mkdir(parents=True)
    (directory / "policies" / "test.toml").write_text(shipped_policy(os.getuid()))
    sock = directory / "c.sock"
    config = directory / "sidecar.toml"
    config.write_text(
        f'[server]\nsocket = "{sock}"\nsocket_mode = "0600"\n{LIMITS}'
        f'[backend.vault]\naddresses = ["{openbao.address}"]\ntoken_env = "{TOKEN_ENV}"\n'
        "[keys.payments]\n"
    )
    with shipped_sidecar(config, sock, loop=request.param) as sidecar:
        yield sidecar


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Every socket a test opens, closed after it."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def connect(sidecar: ProcessSidecar, sockets: list[socket.socket]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sockets.append(sock)
    sock.settimeout(10)
    sock.connect(sidecar.socket)
    return sock


def closed_after(sock: socket.socket) -> tuple[float, bytes]:
    """Seconds until the server closes ``sock``, and what it sent first."""
    started = time.monotonic()
    try:
        first = sock.recv(65536)
    except ConnectionResetError:
        first = b""
    return time.monotonic() - started, first


def limits_counted(sidecar: ProcessSidecar) -> dict[str, float]:
    text = sidecar.request("GET", "/metrics").text
    found = re.findall(r'^kms_connection_limits_total\{limit="(\w+)"\} (\S+)$', text, re.M)
    return {limit: float(count) for limit, count in found}


def test_a_half_closed_request_is_still_answered(
    sidecar: ProcessSidecar, sockets: list[socket.socket]
) -> None:
    sock = connect(sidecar, sockets)
    sock.sendall(
        b"POST " + DATAKEY.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    )
    sock.shutdown(socket.SHUT_WR)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert b'"ciphertext":"sidecar:v' in answer


def test_trickled_headers_are_cut_off(
    sidecar: ProcessSidecar, sockets: list[socket.socket]
) -> None:
    before = limits_counted(sidecar)
    sock = connect(sidecar, sockets)
    sock.sendall(b"GET /v1/sys/health HTTP/1.1\r\nHo")
    seconds, answer = closed_after(sock)
    assert answer == b"" and 0.4 < seconds < 3
    assert limits_counted(sidecar)["header_timeout"] == before["header_timeout"] + 1
    assert "connection limit header_timeout (0.5s) closed 1 connection" in sidecar.log()


def test_an_idle_connection_is_closed(
    sidecar: ProcessSidecar, sockets: list[socket.socket]
) -> None:
    before = limits_counted(sidecar)
    fresh = connect(sidecar, sockets)
    used = connect(sidecar, sockets)
    used.sendall(b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert used.recv(65536).startswith(b"HTTP/1.1 200")
    idle_since = time.monotonic()
    for sock in (fresh, used):  # idle from the start, or between requests
        _, answer = closed_after(sock)
        assert answer == b"" and 0.8 < time.monotonic() - idle_since < 4
    assert limits_counted(sidecar)["idle_timeout"] >= before["idle_timeout"] + 1


def test_a_trickled_body_is_cut_off(sidecar: ProcessSidecar, sockets: list[socket.socket]) -> None:
    before = limits_counted(sidecar)
    sock = connect(sidecar, sockets)
    sock.sendall(
        b"POST " + DATAKEY.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{"
    )
    seconds, answer = closed_after(sock)
    assert answer == b"" and 0.4 < seconds < 3
    assert limits_counted(sidecar)["body_timeout"] == before["body_timeout"] + 1


def test_a_capped_server_still_serves_a_good_client(
    sidecar: ProcessSidecar, sockets: list[socket.socket]
) -> None:
    before = limits_counted(sidecar)
    for _ in range(30):  # idle hogs: each newcomer over the cap closes the longest-idle one
        connect(sidecar, sockets)
    answers = [sidecar.request("POST", DATAKEY, {}).status for _ in range(20)]
    assert answers == [200] * 20
    assert (
        limits_counted(sidecar)["max_connections_per_uid"] >= before["max_connections_per_uid"] + 24
    )
    assert "connection limit max_connections_per_uid (6) closed" in sidecar.log()


def test_over_the_cap_with_nothing_idle_a_newcomer_is_refused(
    sidecar: ProcessSidecar, sockets: list[socket.socket]
) -> None:
    before = limits_counted(sidecar)
    for _ in range(6):  # mid-headers: not idle, so not evicted
        connect(sidecar, sockets).sendall(b"GET /v1/sys/health HTTP/1.1\r\n")
    time.sleep(0.1)
    seconds, answer = closed_after(connect(sidecar, sockets))
    assert answer == b"" and seconds < 0.4
    for sock in sockets:
        sock.close()
    counted = limits_counted(sidecar)["max_connections_per_uid"]
    assert counted >= before["max_connections_per_uid"] + 1


def test_malformed_http_is_a_vault_error_without_a_traceback(
    sidecar: ProcessSidecar, sockets: list[socket.socket]
) -> None:
    for line in (b"BREW /v1/sys/health HTTP/1.1", b"GET /" + b"a" * 9000 + b" HTTP/1.1"):
        sock = connect(sidecar, sockets)
        sock.sendall(line + b"\r\nHost: x\r\n\r\n")
        answer = sock.recv(65536)
        assert answer.split(b" ", 1)[1].startswith(b"400 "), answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["code"] == "invalid_request"
    log = sidecar.log()
    assert "malformed HTTP from uid" in log
    assert "Traceback" not in log and "ERROR" not in log


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
def test_the_listen_backlog_is_as_configured(sidecar: ProcessSidecar) -> None:
    listening = subprocess.run(["ss", "-xlH"], capture_output=True, text=True, check=True).stdout
    (line,) = [row for row in listening.splitlines() if sidecar.socket in row]
    assert line.split()[3] == "333"  # Send-Q of a listening socket is its backlog
