"""Fixtures shared by every test folder: a real sidecar on a real Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from sidecar.backends.base import RootKeyBackend
from sidecar.cli import dev_policy
from sidecar.config import Config, config_from_mapping
from sidecar.devserver import DevOpenBao
from sidecar.server.run import serve

# Property suites: a budget of seconds by default (and in CI); HYPOTHESIS_PROFILE=long for a
# campaign (see the README's Development section). No example database in CI: a fresh clone.
settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket, so tests need nothing but the standard library."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Response:
    def __init__(self, status: int, headers: dict[str, str], raw: bytes) -> None:
        self.status = status
        self.headers = headers
        self.raw = raw
        is_json = headers.get("Content-Type", "").startswith("application/json")
        self.json: Any = json.loads(raw) if raw and is_json else None
        self.text = raw.decode(errors="replace")

    @property
    def data(self) -> Any:
        return self.json["data"]

    @property
    def code(self) -> str | None:
        return self.json.get("code") if isinstance(self.json, dict) else None

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.raw[:300]!r})"


def request(
    socket_path: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """One HTTP request over the socket. ``body`` is sent as JSON; ``raw`` as given."""
    conn = UnixHTTPConnection(socket_path)
    try:
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=payload, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, dict(resp.getheaders()), resp.read())
    finally:
        conn.close()


class RunningSidecar:
    """A sidecar served on its own event loop in a thread, over a real Unix socket."""

    def __init__(self, config: Config, backend: RootKeyBackend | None = None) -> None:
        self.config = config
        self.socket = config.server.socket
        self._backend = backend
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(
                self.config,
                backend=self._backend,
                stop=self._stop,
                on_ready=lambda _: self._ready.set(),
            )

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by start()/stop()
            self._error = exc
            self._ready.set()

    def start(self) -> RunningSidecar:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("sidecar did not become ready")
        if self._error is not None:
            raise self._error
        return self

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Response:
        return request(self.socket, method, path, body, **kwargs)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self._error is not None and not isinstance(self._error, SystemExit):
            raise self._error


def sidecar_config(socket_path: Path, *, policy: str | None = None, **sections: Any) -> Config:
    """A config with the socket at ``socket_path`` and the given sections merged in.

    ``policy`` is written to a policy directory beside the socket; by default it allows the
    user running the tests everything, as ``kms-sidecar dev`` does.
    """
    policies = socket_path.parent / f"{socket_path.stem}-policies"
    policies.mkdir(exist_ok=True)
    (policies / "test.toml").write_text(dev_policy(os.getuid()) if policy is None else policy)
    raw: dict[str, Any] = {
        "server": {"socket": str(socket_path), "socket_mode": "0600"},
        "policies": {"dir": str(policies)},
    }
    for name, value in sections.items():
        raw.setdefault(name, {}).update(value)
    return config_from_mapping(raw)


@pytest.fixture
def short_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short temporary directory: Unix socket paths are limited to 107 bytes."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="kms-"))
    yield path  # type: ignore[misc]
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def run_sidecar(short_tmp: Path) -> Iterator[Any]:
    """Start sidecars with ``run_sidecar(config, backend=None)``; all are stopped afterwards.

    Depends on ``short_tmp`` so that sockets and audit files outlive the sidecars using them.
    """
    started: list[RunningSidecar] = []

    def start(config: Config, backend: RootKeyBackend | None = None) -> RunningSidecar:
        sidecar = RunningSidecar(config, backend).start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.stop()


TOKEN_ENV = "KMS_SIDECAR_TEST_VAULT_TOKEN"


@pytest.fixture(scope="session")
def openbao() -> Iterator[DevOpenBao]:
    """A real OpenBao dev server with transit keys payments, default, orders and local."""
    with DevOpenBao() as bao:
        for name in ("payments", "default", "orders", "local"):
            bao.create_key(name)
        os.environ[TOKEN_ENV] = bao.root_token
        yield bao
        os.environ.pop(TOKEN_ENV, None)


def vault_sections(
    bao: DevOpenBao, keys: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Config sections for a vault backend on ``bao`` (keys payments and default by default)."""
    return {
        "backend": {"type": "vault", "vault": {"addresses": [bao.address], "token_env": TOKEN_ENV}},
        "keys": keys if keys is not None else {"payments": {}, "default": {}},
    }


def wait_for(condition: Any, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Poll ``condition`` until it holds; fail at once if ``proc`` exits, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the sidecar exited"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@contextlib.contextmanager
def killed_on_exit(proc: subprocess.Popen[Any]) -> Iterator[None]:
    """Never leave a child running when a test fails."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()


#: The event loops the shipped process is tested on (``KMS_SIDECAR_LOOP``).
LOOPS = ("uvloop", "asyncio")


def kms_sidecar_command() -> list[str]:
    """The ``kms-sidecar`` console script installed beside this Python, as the README installs it
    (``pip install -e '.[dev]'``): the entry point users run, not ``python -m``."""
    script = Path(sys.executable).with_name("kms-sidecar")
    if not script.exists():
        pytest.fail(f"{script} is missing: install the project with pip install -e '.[dev]'")
    return [str(script)]


@contextlib.contextmanager
def sidecar_process(
    config: Path,
    socket_path: Path | str,
    *,
    env: dict[str, str] | None = None,
    stderr: Any = subprocess.DEVNULL,
    text: bool = False,
    loop: str | None = None,
) -> Iterator[subprocess.Popen[Any]]:
    """``kms-sidecar run --config CONFIG`` as a child; yields once its socket accepts connections.

    ``loop`` (``uvloop`` or ``asyncio``) is passed as ``KMS_SIDECAR_LOOP``; by default the
    child picks as it would in production. The child is killed if it is still running when the
    block ends, so a failing test never leaves one behind.
    """
    if loop is not None:
        env = {**(os.environ if env is None else env), "KMS_SIDECAR_LOOP": loop}
    with (
        subprocess.Popen(
            [*kms_sidecar_command(), "run", "--config", str(config)],
            stderr=stderr,
            env=env,
            text=text,
        ) as proc,
        killed_on_exit(proc),
    ):
        wait_for(lambda: _connectable(str(socket_path)), proc)
        yield proc


def _connectable(socket_path: str) -> bool:
    """Whether the socket accepts connections (it exists a moment before it listens)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError:
        return False
    finally:
        sock.close()
    return True


class ProcessSidecar:
    """A running ``kms-sidecar run`` child: its socket, its log, and requests to it."""

    def __init__(self, proc: subprocess.Popen[Any], socket_path: str, log_path: Path) -> None:
        self.proc = proc
        self.socket = socket_path
        self.log_path = log_path

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Response:
        return request(self.socket, method, path, body, **kwargs)

    def log(self) -> str:
        """Everything the child has logged so far (stderr)."""
        return self.log_path.read_text(errors="replace")


def _answers(socket_path: str) -> bool:
    try:
        request(socket_path, "GET", "/v1/sys/health")
    except OSError:
        return False
    return True


@contextlib.contextmanager
def shipped_sidecar(
    config: Path,
    socket_path: Path | str,
    *,
    loop: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[ProcessSidecar]:
    """The installed ``kms-sidecar run`` on ``loop``, yielded once it answers on its socket.

    Its stderr goes to ``<config>.log``. On exit it gets SIGTERM and must stop cleanly (exit 0).
    """
    log_path = config.with_suffix(".log")
    with (
        log_path.open("w") as log_file,
        sidecar_process(config, socket_path, env=env, stderr=log_file, loop=loop) as proc,
    ):
        wait_for(lambda: _answers(str(socket_path)), proc)
        yield ProcessSidecar(proc, str(socket_path), log_path)
        proc.terminate()
        assert proc.wait(30) == 0, log_path.read_text(errors="replace")[-2000:]


@pytest.fixture(scope="module")
def module_tmp() -> Iterator[Path]:
    """A short temporary directory for module-scoped sidecars (socket paths ≤ 107 bytes)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="kms-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


#: A caller that needs nothing of the checkout (which another uid may not enter: a clone in a
#: 0700 home directory), only the standard library of the system's Python.
OTHER_UID_CLIENT = """
import http.client, json, socket, sys

class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sys.argv[1])

conn = Unix("localhost", timeout=30)
conn.request("POST", "/v1/transit/datakey/plaintext/payments", body=b"")
response = conn.getresponse()
print(response.status, json.loads(response.read())["code"])
"""


#: Connects to a Unix socket as the uid it runs as and hands the connected socket to the test
#: over an inherited descriptor, then waits until the test is done with it: the sidecar sees
#: this process's peer credentials on that connection. Standard library only.
OTHER_UID_CONNECTOR = """
import socket, sys
channel = socket.socket(fileno=int(sys.argv[2]))
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(sys.argv[1])
socket.send_fds(channel, [b"+"], [conn.fileno()])
channel.recv(1)
"""


def _system_python_as(uid: int) -> tuple[str, ...]:
    """The ``setpriv`` prefix and system python3 that act as ``uid`` (gid 0); skips if absent."""
    import shutil

    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if os.getuid() != 0 or shutil.which("setpriv") is None or python is None:
        pytest.skip("needs root, setpriv and a system python3 to act as another user")
    return ("setpriv", f"--reuid={uid}", "--regid=0", "--clear-groups", python)


@contextlib.contextmanager
def connected_as_another_uid(socket_path: str, uid: int = 65534) -> Iterator[socket.socket]:
    """A connection to ``socket_path`` made by a process running as ``uid``, for clients the
    other uid could not run itself (the checkout and its virtualenv may be private)."""
    import tempfile

    prefix = _system_python_as(uid)
    ours, theirs = socket.socketpair()
    with ours, tempfile.TemporaryDirectory(prefix="kms-other-") as directory:
        os.chmod(directory, 0o755)  # noqa: S103 - readable by the other uid, writable by none
        script = Path(directory) / "connect.py"
        script.write_text(OTHER_UID_CONNECTOR)
        script.chmod(0o644)
        proc = subprocess.Popen(
            [*prefix, str(script), socket_path, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            cwd=directory,
            stderr=subprocess.PIPE,
        )
        theirs.close()
        try:
            ours.settimeout(30)
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
            if not fds:
                raise AssertionError(proc.communicate(timeout=30)[1].decode(errors="replace"))
            with socket.socket(fileno=fds[0]) as conn:
                yield conn
        finally:
            with contextlib.suppress(OSError):
                ours.send(b".")
            proc.communicate(timeout=30)


def run_as_another_uid(socket_path: str, uid: int = 65534) -> subprocess.CompletedProcess[str]:
    """:data:`OTHER_UID_CLIENT` run as ``uid`` (gid 0) by the system's python3, from a
    world-readable directory of its own."""
    import tempfile

    prefix = _system_python_as(uid)
    with tempfile.TemporaryDirectory(prefix="kms-other-") as directory:
        os.chmod(directory, 0o755)  # noqa: S103 - readable by the other uid, writable by none
        script = Path(directory) / "client.py"
        script.write_text(OTHER_UID_CLIENT)
        script.chmod(0o644)
        return subprocess.run(
            [*prefix, str(script), socket_path],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=directory,
        )
