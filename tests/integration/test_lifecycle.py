"""The socket's life and the daemon's: permissions, stale and live sockets, drain, SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.backends.memory import MemoryBackend
from sidecar.cli import dev_policy
from sidecar.devserver import DevOpenBao, find_bao
from sidecar.errors import ConfigError
from sidecar.server.app import ROUTES
from sidecar.server.routes import Unguarded
from sidecar.transport.listener import SocketInUse, unix_listener
from tests.conftest import killed_on_exit, request, sidecar_config, sidecar_process, wait_for
from tests.integration.conftest import TOKEN_ENV, vault_sections


def test_socket_has_its_mode_from_the_first_instant(short_tmp: Path) -> None:
    path = str(short_tmp / "m.sock")
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # look at the file as soon as it exists
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.append(stat.S_IMODE(os.lstat(path).st_mode))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(50):
            with unix_listener(path, 0o600):
                time.sleep(0.002)  # give the watcher a turn while the socket exists
    finally:
        stop.set()
        watcher.join()
    assert seen and set(seen) == {0o600}
    assert not os.path.exists(path), "the socket is removed on exit"


def test_stale_socket_is_replaced_and_live_one_refused(short_tmp: Path) -> None:
    path = str(short_tmp / "s.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: what a crashed process leaves
    with unix_listener(path, 0o600) as live:
        assert live.fileno() > 0
        with pytest.raises(SocketInUse, match="already listening"), unix_listener(path, 0o600):
            pass
        assert os.path.exists(path), "a refused start must not remove the live socket"
    regular = short_tmp / "file"
    regular.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"), unix_listener(str(regular), 0o600):
        pass


def test_every_guarded_route_refuses_a_stranger(run_sidecar: Any, short_tmp: Path) -> None:
    """Walk the route table as a caller no rule allows: each guarded route answers 401 or 403."""
    backend = MemoryBackend({"k": "aes256"})
    sidecar = run_sidecar(sidecar_config(short_tmp / "g.sock", keys={"k": {}}), backend)
    while backend.calls["key_info"] == 0:  # the start-up refresh, which is not a request
        time.sleep(0.01)
    before = sum(backend.calls.values())
    for route in ROUTES:
        path = route.path.replace("{name}", "k")
        answer = sidecar.request(
            route.methods[0], path, headers={"Authorization": "Bearer not-a-jwt"}
        )
        if isinstance(route, Unguarded):
            assert answer.status in (200, 503), path
        else:
            assert answer.status in (401, 403), (path, answer)
    assert sum(backend.calls.values()) == before, "no refused request may reach the backend"


def test_in_flight_requests_drain_on_stop(run_sidecar: Any, short_tmp: Path) -> None:
    backend = MemoryBackend({"k": "aes256"}, delay=1.0)  # the KEK fetch takes a second
    sidecar = run_sidecar(sidecar_config(short_tmp / "d.sock", keys={"k": {}}), backend)
    answers: list[Any] = []
    worker = threading.Thread(
        target=lambda: answers.append(sidecar.request("POST", "/v1/transit/datakey/plaintext/k"))
    )
    worker.start()
    while backend.calls["generate_kek"] == 0:
        time.sleep(0.01)
    sidecar.stop()
    worker.join()
    assert answers[0].status == 200, answers
    assert not os.path.exists(sidecar.socket)


def test_run_command_reloads_policies_on_sighup_and_exits_zero_on_sigterm(
    openbao: DevOpenBao, short_tmp: Path
) -> None:
    policies = short_tmp / "policies"
    policies.mkdir()
    (policies / "main.toml").write_text(dev_policy(os.getuid()))
    config_file = short_tmp / "sidecar.toml"
    config_file.write_text(
        f"""
[server]
socket = "{short_tmp / "r.sock"}"
socket_mode = "0600"

[backend.vault]
addresses = ["{openbao.address}"]
token_env = "{TOKEN_ENV}"

[keys.payments]

[policies]
dir = "policies"
"""
    )
    sock = str(short_tmp / "r.sock")
    datakey = "/v1/transit/datakey/plaintext/payments"
    with sidecar_process(config_file, sock, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stderr is not None
        assert request(sock, "POST", datakey).status == 200

        (policies / "main.toml").write_text("[[allow]]\nname = 'broken'\nkeys = [\n")
        proc.send_signal(signal.SIGHUP)
        line = ""
        while "policy reload failed" not in line:
            line = proc.stderr.readline()
            assert line, "the sidecar exited"
        assert "main.toml:3:" in line, "the log names the file and line"
        assert request(sock, "POST", datakey).status == 200, "a bad file keeps the old rules"

        (policies / "main.toml").write_text(dev_policy(os.getuid() + 1))  # someone else
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: request(sock, "POST", datakey).status == 403, proc)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not os.path.exists(sock)


def test_dev_command_prints_socket_and_serves(short_tmp: Path) -> None:
    sock = str(short_tmp / "dev.sock")
    home = short_tmp / "home"  # no ~/.vault-token here, so the bao line has no work-around
    home.mkdir()
    with (
        subprocess.Popen(
            [sys.executable, "-m", "sidecar", "dev", "--socket", sock],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "HOME": str(home)},
        ) as proc,
        killed_on_exit(proc),
    ):
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        banner = "".join(lines)
        assert f"socket: {sock}" in banner
        assert f"curl -s --unix-socket {sock}" in banner
        assert (
            f"BAO_ADDR=unix://{sock} {find_bao()} write -f transit/datakey/plaintext/default"
            in banner
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = request(sock, "POST", "/v1/transit/datakey/plaintext/default")
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert answer.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_start_with_unreachable_upstream_reports_unhealthy(
    run_sidecar: Any, short_tmp: Path
) -> None:
    sections = vault_sections(DevOpenBao())  # an address nothing listens on
    sidecar = run_sidecar(sidecar_config(short_tmp / "u.sock", **sections))
    answer = sidecar.request("POST", "/v1/transit/datakey/plaintext/payments")
    assert answer.status == 503 and answer.code == "upstream_unavailable"
    health = sidecar.request("GET", "/v1/sys/health")
    assert health.status == 503 and health.json["keys"]["payments"] == "unavailable"
