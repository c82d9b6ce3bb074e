"""Docs that run: every marked example in README.md and docs/ against a live `kms-sidecar dev`.

Each page gets its own dev sidecar (an embedded OpenBao, key ``default``, audit on) and one
shell; the ``export`` line of the dev banner is run first, so pages use ``$SOCK``,
``$KMS_SIDECAR_CONFIG``, ``$UPSTREAM`` and ``$UPSTREAM_TOKEN`` exactly as a reader would. How
pages mark examples: :mod:`tests.docs.markdown`.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import killed_on_exit
from tests.docs.markdown import Command, commands, output_mismatch

ROOT = Path(__file__).resolve().parents[2]
PAGES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))] if commands(p)]
#: The audit HMAC key the pages' shell and the dev sidecar share (for `kms-sidecar audit hash`).
AUDIT_KEY = "doctest-audit-key-0123456789abcdef0123"
COMMAND_TIMEOUT = 60.0


class Shell:
    """One bash for a page: commands run in order and share variables; output goes to files."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self._out, self._err = cwd / ".doctest.out", cwd / ".doctest.err"
        self._proc = subprocess.Popen(
            ["bash", "--norc", "--noprofile"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            text=True,
        )

    def run(self, text: str) -> tuple[int, str, str]:
        """Exit status, stdout and stderr of ``text`` run in this shell."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(
            f"{{\n{text}\n}} >{self._out} 2>{self._err} </dev/null; echo __DOCTEST_RC__ $?\n"
        )
        self._proc.stdin.flush()
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while True:
            ready, _, _ = select.select([self._proc.stdout], [], [], 1.0)
            if ready:
                line = self._proc.stdout.readline()
                if not line:
                    raise AssertionError(f"the shell exited running {text!r}")
                if line.startswith("__DOCTEST_RC__ "):
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not finish within {COMMAND_TIMEOUT}s")
        return int(line.split()[1]), self._out.read_text(), self._err.read_text()

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def _environment(home: Path, runtime: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BAO_", "VAULT_", "KMS_")) and k != "PYTEST_CURRENT_TEST"
    }
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        HOME=str(home),
        XDG_RUNTIME_DIR=str(runtime),
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        KMS_AUDIT_HMAC_KEY=AUDIT_KEY,
        COLUMNS="100",
    )
    return env


@pytest.fixture
def page_shell(short_tmp: Path) -> Iterator[Shell]:
    """A shell beside a running `kms-sidecar dev`, its banner's export line already run.

    The working directory is a scratch directory holding links to the repository's
    ``examples``, ``policies`` and ``docs``, so relative paths work and nothing is written into
    the repository.
    """
    home, runtime, work = short_tmp / "home", short_tmp / "run", short_tmp / "work"
    for directory in (home, runtime, work):
        directory.mkdir(mode=0o700)
    for name in ("examples", "policies", "docs", "README.md"):
        (work / name).symlink_to(ROOT / name)
    env = _environment(home, runtime)
    with (
        subprocess.Popen(
            [sys.executable, "-m", "sidecar", "dev"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        ) as dev,
        killed_on_exit(dev),
    ):
        assert dev.stdout is not None
        export = None
        for line in dev.stdout:
            if line.startswith("  export SOCK="):
                export = line.strip()
            if line.startswith("Ctrl-C"):
                break
        assert export is not None, "the dev banner has no export line"
        shell = Shell(work, env)
        try:
            status, _, err = shell.run(export)
            assert status == 0, err
            yield shell
        finally:
            shell.close()
            dev.send_signal(signal.SIGINT)
            dev.wait(30)


def _check(command: Command, status: int, out: str, err: str) -> None:
    shown = f"{command.where}: {command.text}"
    assert status == command.exit, f"{shown}\nexit {status}, not {command.exit}\n{out}{err}"
    if command.output is not None:
        mismatch = output_mismatch(command.output, out, subset=command.subset)
        assert mismatch is None, f"{shown}\n{mismatch}\n(stderr: {err.strip()})"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_examples_of_a_page_run_as_shown(page: Path, page_shell: Shell) -> None:
    for command in commands(page):
        _check(command, *page_shell.run(command.text))
