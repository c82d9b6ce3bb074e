"""``kms-sidecar dev`` drives the docs: its banner's commands work as printed."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import killed_on_exit, request


def _banner(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Ctrl-C"):
            return "".join(lines)
    raise AssertionError(f"dev exited before its banner: {''.join(lines)}")


def test_every_banner_command_works_as_printed(short_tmp: Path) -> None:
    home = short_tmp / "home"
    home.mkdir()
    (home / ".vault-token").write_text("s.left-by-bao-server-dev\n")  # would make bao send it
    runtime = short_tmp / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    for name in ("BAO_TOKEN", "VAULT_TOKEN", "BAO_ADDR", "VAULT_ADDR", "KMS_SIDECAR_CONFIG"):
        env.pop(name, None)
    with (
        subprocess.Popen(
            [sys.executable, "-m", "sidecar", "dev"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        ) as proc,
        killed_on_exit(proc),
    ):
        banner = _banner(proc)
        fields = dict(
            line.split(": ", 1)
            for line in banner.splitlines()
            if line[:7] in ("socket:", "config:")
        )
        socket_path, config = fields["socket"].strip(), Path(fields["config"].strip())
        workdir = config.parent
        assert workdir.parent == runtime, "the dev directory is made under $XDG_RUNTIME_DIR"
        assert stat.S_IMODE(workdir.stat().st_mode) == 0o700
        assert stat.S_IMODE((workdir / "bao-token").stat().st_mode) == 0o600
        assert "~/.vault-token" not in banner and f"{home}/.vault-token exists" in banner
        assert 'token_file = "bao-token"' in config.read_text()
        commands = [line.strip() for line in banner.splitlines() if line.startswith("  ")]
        commands = [c for c in commands if not c.startswith(("it as", "BAO_CONFIG_PATH to"))]
        assert len(commands) == 7, commands
        assert request(socket_path, "GET", "/v1/sys/health").status == 200
        for command in commands:
            done = subprocess.run(
                ["bash", "-ec", command], env=env, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            if "audit verify" in command:
                assert done.stdout.startswith("OK: "), done.stdout
            if "transit/datakey" in command:
                assert "sidecar:v1:" in done.stdout, done.stdout
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert not workdir.exists(), "the dev directory is removed when dev stops"
