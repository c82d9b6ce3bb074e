"""``examples/encrypt_file.py``'s docstring commands work as written against ``kms-sidecar dev``."""

from __future__ import annotations

import ast
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import killed_on_exit, wait_for

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "encrypt_file.py"


def docstring_commands() -> list[str]:
    doc = ast.get_docstring(ast.parse(EXAMPLE.read_text())) or ""
    return [line.strip() for line in doc.splitlines() if "examples/encrypt_file.py" in line]


def test_the_docstring_commands_run_against_kms_sidecar_dev(short_tmp: Path) -> None:
    commands = docstring_commands()
    assert [shlex.split(c)[2] for c in commands] == ["encrypt", "decrypt"]
    sock = str(short_tmp / "dev.sock")
    home = short_tmp / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "SOCK": sock}
    with (
        subprocess.Popen(
            [Path(sys.executable).with_name("kms-sidecar"), "dev", "--socket", sock],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        ) as proc,
        killed_on_exit(proc),
    ):
        wait_for(lambda: os.path.exists(sock), proc, timeout=60)
        work = short_tmp / "work"
        work.mkdir()
        (work / "a.pdf").write_bytes(b"%PDF-1.7 quarterly numbers\n" * 100)
        for command in commands:
            # the commands name the checkout's .venv and examples/ relative to its root
            argv = shlex.split(command.replace("$SOCK", sock))
            argv[0] = sys.executable if argv[0] == ".venv/bin/python" else argv[0]
            argv[1] = str(ROOT / argv[1])
            argv[-2:] = [str(work / name) for name in argv[-2:]]
            if argv[2] == "decrypt":
                (work / "a.pdf").rename(work / "original.pdf")
            done = subprocess.run(
                argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
            )
            assert done.returncode == 0, (command, done.stderr)
        assert (work / "a.pdf").read_bytes() == (work / "original.pdf").read_bytes()
        assert b"quarterly" not in (work / "a.kms").read_bytes()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
