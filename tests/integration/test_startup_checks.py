"""Fail fast on configuration, retry on weather: what ``kms-sidecar run`` does at start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from sidecar.cli import dev_policy
from tests.conftest import request, sidecar_process, wait_for


def _config(tmp: Path, vault: str) -> Path:
    (tmp / "policies").mkdir(exist_ok=True)
    (tmp / "policies" / "dev.toml").write_text(dev_policy(os.getuid()))
    config = tmp / "sidecar.toml"
    config.write_text(
        f'[server]\nsocket = "{tmp}/s.sock"\nsocket_mode = "0600"\n'
        f'[backend.vault]\naddresses = ["http://127.0.0.1:9"]\n{vault}\n[keys.payments]\n'
    )
    return config


def _run(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_credential_that_cannot_exist_stops_start_up(short_tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KMS_TEST_UNSET_TOKEN"}
    for vault, key in (
        ('token_file = "missing-token"', "backend.vault.token_file"),
        ('token_env = "KMS_TEST_UNSET_TOKEN"', "backend.vault.token_env"),
        (
            'auth_method = "approle"\nrole_id = "r"\nsecret_id_file = "nope"',
            "backend.vault.secret_id_file",
        ),
    ):
        done = _run(_config(short_tmp, vault), env)
        assert done.returncode == 2, done
        assert f"kms-sidecar: configuration error: {key}: " in done.stderr, done.stderr
        assert "ready" not in done.stderr and "Traceback" not in done.stderr
        assert not (short_tmp / "s.sock").exists()


def test_an_unreachable_upstream_starts_and_health_says_why(short_tmp: Path) -> None:
    (short_tmp / "token").write_text("s.some-token\n")
    config = _config(short_tmp, 'token_file = "token"')
    sock = short_tmp / "s.sock"
    with sidecar_process(config, sock) as proc:
        wait_for(lambda: _health(sock) == 503, proc)  # once the first upstream call failed
        health = request(str(sock), "GET", "/v1/sys/health")
        assert health.json["keys"]["payments"] == "unavailable", health.json
        assert health.json["upstream"]["state"] != "ok", health.json
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def _health(sock: Path) -> int:
    try:
        return request(str(sock), "GET", "/v1/sys/health").status
    except (FileNotFoundError, ConnectionRefusedError):
        return 0
