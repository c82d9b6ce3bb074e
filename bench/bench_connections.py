"""Connection abuse: does a good client keep being served? Prints the figures, asserts nothing.

    .venv/bin/python -m bench.bench_connections                  # 5,000 idle + 200 slowloris, 30 s
    .venv/bin/python -m bench.bench_connections --idle 2000 --duration 10

The installed ``kms-sidecar run`` (on its default event loop, over a real OpenBao dev server)
runs with its open-file limit set to ``--nofile`` (4096, as the ``LimitNOFILE=4096`` that
docs/security.md recommends; set with ``prlimit`` semantics: soft and hard) and the default
``[server]`` connection limits. Then, for ``--duration`` seconds:

- an attacker process (as uid 65534 when run as root, else, or with ``--same-uid``, as this
  user) keeps ``--idle``
  connections open that never send a byte, and ``--slowloris`` connections that trickle header
  bytes (one every ``--trickle`` seconds, never finishing); each one the sidecar closes is
  reopened at once, so the pressure never lets up;
- a good client, this process, sends ``datakey/wrapped`` requests one at a time, each on a new
  connection (the hardest case: it must win a connection every time), plus the same on one
  keep-alive connection, reconnecting when it is closed.

It prints the good client's success rate (answered 200 within ``--timeout``) and latency, what
the attacker held, the sidecar's file descriptors, its ``kms_connection_limits_total`` counts,
and whether ``/v1/sys/health`` stayed 200 (the upstream poller kept working). Exit status 0 when
the run completed (whatever the figures), 2 when something could not start.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from sidecar.devserver import DevOpenBao

DATAKEY = "/v1/transit/datakey/wrapped/payments"
TOKEN_ENV = "KMS_BENCH_VAULT_TOKEN"  # noqa: S105 - the name of a variable

#: The attacker: standard library only, so it runs as another uid from any directory.
ATTACKER = textwrap.dedent(
    """
    import asyncio, json, sys
    path, idle, slow, trickle, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
        float(sys.argv[4]), float(sys.argv[5])
    stats = {"connects": 0, "refused": 0, "closed_by_server": 0, "held_max": 0}
    held = 0

    async def hold(kind):
        global held
        loop = asyncio.get_running_loop()
        end = loop.time() + duration
        while loop.time() < end:
            try:
                reader, writer = await asyncio.open_unix_connection(path)
            except Exception:
                stats["refused"] += 1
                await asyncio.sleep(0.05)
                continue
            stats["connects"] += 1
            held += 1
            stats["held_max"] = max(stats["held_max"], held)
            try:
                if kind == "slow":
                    writer.write(b"POST /v1/transit/datakey/wrapped/payments HTTP/1.1\\r\\nX-A: ")
                while loop.time() < end:
                    try:
                        data = await asyncio.wait_for(reader.read(1024), trickle)
                    except asyncio.TimeoutError:
                        if kind == "slow":
                            writer.write(b"a")
                        continue
                    if not data:
                        stats["closed_by_server"] += 1
                        break
            except Exception:
                stats["closed_by_server"] += 1
            finally:
                held -= 1
                try:
                    writer.close()
                except Exception:
                    pass

    async def main():
        tasks = [hold("idle") for _ in range(idle)] + [hold("slow") for _ in range(slow)]
        await asyncio.gather(*tasks)
        print(json.dumps(stats))

    asyncio.run(main())
    """
)


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    #: connect() calls that found the listen backlog full (EAGAIN) and waited for room
    backlog_waits = 0

    def connect(self) -> None:
        # With a timeout the socket is non-blocking, and a Unix connect() to a full backlog
        # fails at once with EAGAIN; a blocking connect() waits for room. Wait as it would.
        deadline = time.monotonic() + (self.timeout or 5.0)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self._path)
            except BlockingIOError:
                sock.close()
                UnixConnection.backlog_waits += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
                continue
            except BaseException:
                sock.close()
                raise
            self.sock = sock
            return


class GoodClient:
    """Requests one at a time; counts successes and keeps latencies."""

    def __init__(self, path: str, timeout: float, *, keep_alive: bool) -> None:
        self.path, self.timeout, self.keep_alive = path, timeout, keep_alive
        self.ok = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.latencies: list[float] = []
        #: keep-alive connections found closed while idle, and the request retried on a new one
        self.reconnects = 0

    def run(self, until: float) -> None:
        conn: UnixConnection | None = None
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                if conn is None:
                    conn = UnixConnection(self.path, self.timeout)
                conn.request("POST", DATAKEY, body=b"{}")
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or b'"ciphertext"' not in body:
                    raise RuntimeError(f"status {response.status}")
                self.ok += 1
                self.latencies.append(time.monotonic() - started)
            except (OSError, http.client.HTTPException, RuntimeError) as exc:
                if self.keep_alive and isinstance(exc, http.client.RemoteDisconnected):
                    # a keep-alive connection closed while idle: retried on a new one, as
                    # HTTP clients retry a request that never reached the server
                    conn = None
                    self.reconnects += 1
                    continue
                self.failed += 1
                name = type(exc).__name__
                self.errors[name] = self.errors.get(name, 0) + 1
                if conn is not None:
                    conn.close()
                conn = None
            if not self.keep_alive and conn is not None:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def report(self, label: str) -> str:
        total = self.ok + self.failed
        rate = 100.0 * self.ok / total if total else 0.0
        lat = sorted(self.latencies) or [0.0]
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        errors = f"  errors: {self.errors}" if self.errors else ""
        if self.keep_alive:
            errors += f"  ({self.reconnects} idle closes retried)"
        return (
            f"{label:<34} {self.ok:>6}/{total:<6} = {rate:6.2f} %   "
            f"p50 {statistics.median(lat) * 1000:6.2f} ms  p99 {p99 * 1000:7.2f} ms{errors}"
        )


def request(path: str, method: str, url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = UnixConnection(path, timeout)
    try:
        conn.request(method, url)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def limits_of(path: str) -> dict[str, float]:
    _, body = request(path, "GET", "/metrics")
    text = body.decode()
    found = dict(re.findall(r'^kms_connection_limits_total\{limit="(\w+)"\} (\S+)$', text, re.M))
    opened = re.search(r"^kms_connections_open (\S+)$", text, re.M)
    counts = {k: float(v) for k, v in found.items()}
    counts["open"] = float(opened.group(1)) if opened else -1
    return counts


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return " ".join(line.split()[3:5])
    return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--slowloris", type=int, default=200)
    parser.add_argument("--trickle", type=float, default=2.0, help="seconds between bytes")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--nofile", type=int, default=4096)
    parser.add_argument("--timeout", type=float, default=5.0, help="a good request's deadline")
    parser.add_argument(
        "--same-uid",
        action="store_true",
        help="attack as this user, the good client's uid (they then share its connection cap)",
    )
    args = parser.parse_args(argv)

    script = Path(sys.executable).with_name("kms-sidecar")
    if not script.exists():
        print(f"{script} is missing: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="kms-bench-conn-"))
    workdir.chmod(0o755)  # the attacker's uid must reach the socket
    sock = workdir / "s.sock"
    (workdir / "policies").mkdir()
    (workdir / "policies" / "bench.toml").write_text(
        f'[[allow]]\nname = "bench"\nwhen.unix_uid = [{os.getuid()}]\nkeys = ["*"]\n'
        'operations = ["*"]\n'
    )
    with DevOpenBao() as bao:
        bao.create_key("payments")
        config = workdir / "sidecar.toml"
        config.write_text(
            f'[server]\nsocket = "{sock}"\nsocket_mode = "0666"\n'
            f'[backend.vault]\naddresses = ["{bao.address}"]\ntoken_env = "{TOKEN_ENV}"\n'
            '[keys.payments]\n[policies]\ndir = "policies"\n'
        )
        nofile = args.nofile

        def limit_fds() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        log_path = workdir / "sidecar.log"
        with log_path.open("w") as log_file:
            sidecar = subprocess.Popen(
                [str(script), "run", "--config", str(config)],
                env={**os.environ, TOKEN_ENV: bao.root_token},
                stderr=log_file,
                preexec_fn=limit_fds,
            )
            try:
                return run(args, sidecar, str(sock), log_path)
            finally:
                sidecar.terminate()
                sidecar.wait(30)
                shutil.rmtree(workdir, ignore_errors=True)


def run(
    args: argparse.Namespace, sidecar: subprocess.Popen[bytes], sock: str, log_path: Path
) -> int:
    deadline = time.monotonic() + 30
    while True:
        try:
            if request(sock, "GET", "/v1/sys/health")[0] == 200:
                break
        except OSError:
            pass
        if sidecar.poll() is not None or time.monotonic() > deadline:
            print("the sidecar did not start:\n" + log_path.read_text()[-2000:], file=sys.stderr)
            return 2
        time.sleep(0.1)

    baseline = GoodClient(sock, args.timeout, keep_alive=False)
    baseline.run(time.monotonic() + 2.0)

    attacker_cmd = [sys.executable, "-c", ATTACKER, sock, str(args.idle), str(args.slowloris)]
    attacker_cmd += [str(args.trickle), str(args.duration + 5)]
    # The system's Python runs the attacker as another uid: this virtualenv may be out of reach.
    system_python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    as_nobody = (
        not args.same_uid
        and os.getuid() == 0
        and shutil.which("setpriv") is not None
        and bool(system_python)
    )
    if as_nobody:
        attacker_cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        attacker_cmd += [str(system_python), "-c", ATTACKER, sock, str(args.idle)]
        attacker_cmd += [str(args.slowloris), str(args.trickle), str(args.duration + 5)]
    need = args.idle + args.slowloris + 256

    def attacker_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))

    attacker = subprocess.Popen(
        attacker_cmd, stdout=subprocess.PIPE, preexec_fn=attacker_fds, cwd="/"
    )
    time.sleep(3.0)  # let it open its connections
    under_attack_start = limits_of(sock)
    fds_peak = fd_count(sidecar.pid)
    health: list[int] = []
    stop = time.monotonic() + args.duration
    fresh = GoodClient(sock, args.timeout, keep_alive=False)
    kept = GoodClient(sock, args.timeout, keep_alive=True)
    threads = [
        threading.Thread(target=fresh.run, args=(stop,)),
        threading.Thread(target=kept.run, args=(stop,)),
    ]
    for thread in threads:
        thread.start()
    while time.monotonic() < stop:
        fds_peak = max(fds_peak, fd_count(sidecar.pid))
        try:
            health.append(request(sock, "GET", "/v1/sys/health", args.timeout)[0])
        except OSError:
            health.append(0)
        time.sleep(1.0)
    for thread in threads:
        thread.join()
    after = limits_of(sock)
    out, _ = attacker.communicate(timeout=60)
    attack: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1]) if out else {}

    print(f"sidecar open-file limit: {nofile_of(sidecar.pid)} (soft hard)")
    print(
        f"attacker: {args.idle} idle + {args.slowloris} slowloris connections "
        f"({'uid 65534' if as_nobody else 'this uid'}), {args.duration:.0f} s; "
        f"held at most {attack.get('held_max')}, {attack.get('connects')} connects, "
        f"{attack.get('closed_by_server')} closed by the sidecar, {attack.get('refused')} refused"
    )
    print(
        f"sidecar file descriptors: peak {fds_peak}; connections open 3 s into the attack: "
        f"{under_attack_start['open']:.0f}"
    )
    print("limits that bit during the run (kms_connection_limits_total, delta):")
    for limit, count in after.items():
        if limit != "open":
            print(f"  {limit:<26} {count - under_attack_start.get(limit, 0):>9.0f}")
    print(f"  connections open at the end: {after['open']:.0f}")
    print(f"health during the attack: {health.count(200)}/{len(health)} answered 200")
    print(
        f"good client connects that found the backlog full and waited: "
        f"{UnixConnection.backlog_waits}"
    )
    print("good client, datakey/wrapped, one request at a time:")
    print(baseline.report("  before the attack, new conn each"))
    print(fresh.report("  under attack, new conn each"))
    print(kept.report("  under attack, keep-alive"))
    total_ok, total = fresh.ok + kept.ok, fresh.ok + fresh.failed + kept.ok + kept.failed
    rate = 100.0 * total_ok / max(total, 1)
    print(f"good client success under attack: {rate:.2f} % (target ≥ 99 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
