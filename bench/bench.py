"""The kms-sidecar benchmark: the figures and ratios of docs/performance.md, in one run.

    python -m bench.bench [--duration SECONDS] [--quick] [--issuances N] [--settle SECONDS]
                          [--starts N] [--rounds N] [--json FILE]

Every server runs pinned to one core and the load generator (this process) to another, so each
figure is "what one core of server does". Phases, each at 1 and at 64 connections:

- generator ceiling: a trivial canned-response server, to show the generator is not the limit;
- bare aiohttp+uvloop handler on a Unix socket (the floor any aiohttp server pays);
- OpenBao transit ``datakey/plaintext`` directly over loopback TCP (``bao server -dev``);
- the sidecar (``python -m sidecar run``) over its Unix socket: datakey, decrypt, and datakey
  with a ``batch_input`` of 100 items;

then start-to-ready of the sidecar (spawn until ``/v1/sys/health`` answers 200) and the
upstream calls it made (``/v1/sidecar/status``) against its KEK rotations. ``--issuances N``
adds a run of N data keys on a fresh sidecar to check "upstream calls ≤ 1 + KEK rotations".

Exit status: 0 when every request was answered 200 with the expected body (a target missed is
still 0: this is a measurement, not a test), 1 when any phase had errors, 2 when a server
could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bench.loadgen import BodyCheck, Endpoint, Result, build_request, fetch, run_load
from bench.machine import (
    BenchError,
    Cores,
    affinity_report,
    children_named,
    core_busy_seconds,
    own_affinity,
    pin_all_threads,
    process_cpu_seconds,
    stop_process,
)

if TYPE_CHECKING:
    from sidecar.devserver import DevOpenBao

_T = TypeVar("_T")

REPO_ROOT = Path(__file__).resolve().parent.parent
KEY_NAME = "bench"
TOKEN_ENV = "KMS_BENCH_BAO_TOKEN"  # noqa: S105 - the variable's name, not a token
DATAKEY_PATH = f"/v1/transit/datakey/plaintext/{KEY_NAME}"
DECRYPT_PATH = f"/v1/transit/decrypt/{KEY_NAME}"
BATCH_SIZE = 100
HIGH_CONCURRENCY = 64


# -- servers ------------------------------------------------------------------------------


class ServerProcess:
    """A server subprocess pinned to the server core, stopped with SIGTERM. It runs in ``tree``
    (a checkout; this one by default), so ``python -m sidecar`` is that checkout's."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        cores: Cores,
        env: dict[str, str] | None = None,
        tree: Path = REPO_ROOT,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cores = cores
        self.tree = tree
        self.env = {**os.environ, "PYTHONPATH": str(tree), **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.spawned_at = time.perf_counter()
            self.process = subprocess.Popen(
                self.argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.tree,
                env=self.env,
                preexec_fn=self.cores.pin_child(),  # the bench is single-threaded when it spawns
            )

    def wait_ready(self, endpoint: Endpoint, path: str, timeout: float = 30.0) -> float:
        """Seconds from spawn until ``path`` answers 200. Raises ``BenchError`` on failure."""
        assert self.process is not None
        deadline = time.perf_counter() + timeout
        last = "no answer"
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited at start:\n{self.log_tail()}")
            try:
                status, body = fetch(endpoint, "GET", path, timeout=2.0)
            except OSError as exc:
                last = str(exc)
            else:
                if status == 200:
                    return time.perf_counter() - self.spawned_at
                last = f"HTTP {status}: {body[:200]!r}"
            time.sleep(0.005)
        raise BenchError(f"{self.name} not ready within {timeout}s ({last}):\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def bench_server_argv(kind: str, socket_path: str) -> list[str]:
    return [sys.executable, "-m", "bench.bench", "--serve", kind, "--socket", socket_path]


def policy_text(rules: int) -> str:
    """``rules`` allow rules, the one that allows this user last: the engine checks them all."""
    others = "".join(
        "[[allow]]\n"
        f'name = "tenant-{i}"\n'
        f"when.unix_uid = [{100_000 + i}]\n"
        f'keys = ["{KEY_NAME}", "tenant-{i}-*"]\n'
        'operations = ["datakey", "decrypt"]\n'
        f'context.tenant = "t{i}"\n\n'
        for i in range(rules - 1)
    )
    return (
        others + "[[allow]]\n"
        'name = "bench-user"\n'
        f"when.unix_uid = [{os.getuid()}]\n"
        'keys = ["*"]\n'
        'operations = ["*"]\n'
    )


def sidecar_config(
    workdir: Path, socket_path: str, bao_address: str, *, rules: int = 1, audit: bool = False
) -> Path:
    """Write a sidecar config (policy of ``rules`` rules, optional fail-closed audit); its path."""
    tag = Path(socket_path).stem
    policies = workdir / f"policies-{tag}"
    policies.mkdir(exist_ok=True)
    (policies / "bench.toml").write_text(policy_text(rules))
    audit_section = (
        f"\n[audit]\npath = {json.dumps(str(workdir / f'audit-{tag}.log'))}\nfail_closed = true\n"
        if audit
        else ""
    )
    path = workdir / f"{tag}.toml"
    path.write_text(
        "[server]\n"
        f"socket = {json.dumps(socket_path)}\n"
        'socket_mode = "0600"\n'
        "\n[backend]\n"
        'type = "vault"\n'
        "\n[backend.vault]\n"
        f"addresses = [{json.dumps(bao_address)}]\n"
        f'token_env = "{TOKEN_ENV}"\n'
        f"\n[keys.{KEY_NAME}]\n"
        "\n[policies]\n"
        f"dir = {json.dumps(str(policies))}\n" + audit_section
    )
    return path


class Sidecar(ServerProcess):
    """``python -m sidecar run`` against the dev OpenBao, on a socket in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        bao_address: str,
        token: str,
        cores: Cores,
        tag: str,
        *,
        rules: int = 1,
        audit: bool = False,
        tree: Path = REPO_ROOT,
    ) -> None:
        socket_path = str(workdir / f"sidecar-{tag}.sock")
        config = sidecar_config(workdir, socket_path, bao_address, rules=rules, audit=audit)
        super().__init__(
            f"sidecar ({tag})",
            [sys.executable, "-m", "sidecar", "run", "--config", str(config)],
            workdir / f"sidecar-{tag}.log",
            cores,
            {TOKEN_ENV: token, "KMS_AUDIT_HMAC_KEY": "ab" * 32},
            tree,
        )
        self.endpoint = Endpoint(unix_path=socket_path)

    def start_and_wait(self) -> float:
        """Start it; seconds from spawn to health 200."""
        self.start()
        return self.wait_ready(self.endpoint, "/v1/sys/health")

    def status(self) -> dict[str, Any]:
        code, body = fetch(self.endpoint, "GET", "/v1/sidecar/status")
        if code != 200:
            raise BenchError(f"/v1/sidecar/status answered {code}: {body[:300]!r}")
        data: dict[str, Any] = json.loads(body)["data"]
        return data

    def upstream_snapshot(self) -> dict[str, Any]:
        """Upstream calls by operation and the bench key's KEK rotations, now."""
        data = self.status()
        key = data["keys"][KEY_NAME]
        live = key.get("live_kek") or {}
        return {
            "calls": dict(data["backend"].get("calls", {})),
            "kek_rotations": int(key["kek_rotations"]),
            "live_kek_uses": live.get("uses"),
        }

    def wait_settled(self, timeout: float = 5.0) -> None:
        """Wait until the start-up read of the root key is done, so it is not counted later."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.status()["keys"][KEY_NAME].get("latest_version"):
                return
            time.sleep(0.01)


def upstream_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Upstream calls made and KEK rotations between two snapshots, and the verdict."""
    ops = set(before["calls"]) | set(after["calls"])
    by_op = {op: after["calls"].get(op, 0) - before["calls"].get(op, 0) for op in sorted(ops)}
    by_op = {op: n for op, n in by_op.items() if n}
    # KEK calls make (datakey) or open (decrypt) a KEK; "read" is the root_poll_interval poll of
    # the root key's versions, which runs on a timer whatever the traffic.
    kek_calls = by_op.get("datakey", 0) + by_op.get("decrypt", 0)
    rotations = after["kek_rotations"] - before["kek_rotations"]
    return {
        "calls": kek_calls,
        "all_calls": sum(by_op.values()),
        "calls_by_operation": by_op,
        "kek_rotations": rotations,
        "limit": 1 + rotations,
        "ok": kek_calls <= 1 + rotations,
        "live_kek_uses_after": after["live_kek_uses"],
    }


# -- phases -------------------------------------------------------------------------------

_S = TypeVar("_S", bound=ServerProcess)

#: A phase where other processes used more than this much of either core is flagged disturbed.
INTERFERENCE_CORES = 0.10


@dataclass
class Phase:
    """One measured load on one server, and the CPU it cost (fractions of one core)."""

    name: str
    result: Result
    server_cpu: float
    generator_cpu: float
    #: CPU other processes used on the server's core (on both cores when nothing is pinned).
    other_on_server_core: float
    #: CPU other processes used on the generator's core (0 when nothing is pinned).
    other_on_generator_core: float
    per_request_items: int = 1
    #: Seconds spent waiting for the machine to be quiet before the phase.
    waited_for_quiet: float = 0.0
    #: req/s of every round, in the order measured (one entry without ``--rounds``).
    round_rates: tuple[float, ...] = ()
    #: Items (data keys, for datakey phases) answered in the measured windows of every round.
    round_items: int = 0
    #: Failed requests summed over every round, and the first failure of any round.
    round_errors: int = 0
    first_error: str | None = None

    @property
    def items_per_second(self) -> float:
        return self.result.requests_per_second * self.per_request_items

    @property
    def disturbed(self) -> bool:
        return max(self.other_on_server_core, self.other_on_generator_core) > INTERFERENCE_CORES

    def row(self) -> dict[str, Any]:
        return {
            **self.result.summary(),
            "items_per_request": self.per_request_items,
            "items_per_second": round(self.items_per_second, 1),
            "server_cpu_fraction": round(self.server_cpu, 3),
            "generator_cpu_fraction": round(self.generator_cpu, 3),
            "other_on_server_core_fraction": round(self.other_on_server_core, 3),
            "other_on_generator_core_fraction": round(self.other_on_generator_core, 3),
            "waited_for_quiet_seconds": round(self.waited_for_quiet, 1),
            "round_requests_per_second": [round(r, 1) for r in self.round_rates],
            "errors_all_rounds": self.round_errors,
        }


@dataclass
class Bench:
    """One run: the event loop, the cores, the servers started and every phase measured."""

    runner: asyncio.Runner
    cores: Cores
    duration: float
    warmup: float
    workdir: Path
    #: Longest wait for the machine to be quiet before a phase (seconds; 0: do not wait).
    settle: float = 0.0
    #: Times each phase is measured; the round of median req/s is kept.
    rounds: int = 1
    phases: dict[str, Phase] = field(default_factory=dict)
    pinning: dict[str, str] = field(default_factory=dict)
    servers: list[ServerProcess] = field(default_factory=list)

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.runner.run(coro)

    def started(self, server: _S) -> _S:
        """``server``, remembered so that it is stopped however the run ends."""
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            server.stop()

    def measure(
        self,
        name: str,
        server_pid: int,
        endpoint: Endpoint,
        request: bytes,
        connections: int,
        check: BodyCheck | None = None,
        per_request_items: int = 1,
    ) -> Phase:
        """Load the server for one phase (``rounds`` times), print its row and keep it.

        With several rounds the phase is the round of median req/s; errors of every round
        count.
        """
        rounds = [
            self.measure_once(
                name, server_pid, endpoint, request, connections, check, per_request_items
            )
            for _ in range(self.rounds)
        ]
        ordered = sorted(rounds, key=lambda p: p.result.requests_per_second)
        phase = ordered[len(ordered) // 2]
        phase.round_rates = tuple(p.result.requests_per_second for p in rounds)
        phase.round_errors = sum(p.result.errors for p in rounds)
        phase.round_items = sum(p.result.completed * per_request_items for p in rounds)
        phase.first_error = next((p.result.first_error for p in rounds if p.result.errors), None)
        self.phases[name] = phase
        print_phase(phase)
        return phase

    def measure_once(
        self,
        name: str,
        server_pid: int,
        endpoint: Endpoint,
        request: bytes,
        connections: int,
        check: BodyCheck | None,
        per_request_items: int,
    ) -> Phase:
        waited = self.wait_for_quiet()
        cores_before = core_busy_seconds()
        server_before = process_cpu_seconds(server_pid)
        generator_before = time.process_time()
        wall_before = time.perf_counter()
        result = self.run(
            run_load(
                endpoint,
                request,
                connections=connections,
                duration=self.duration,
                warmup=self.warmup,
                check=check,
            )
        )
        wall = time.perf_counter() - wall_before
        server = (process_cpu_seconds(server_pid) - server_before) / wall
        generator = (time.process_time() - generator_before) / wall
        cores_after = core_busy_seconds()
        busy = {cpu: (cores_after[cpu] - cores_before[cpu]) / wall for cpu in cores_after}
        if self.cores.server is None or self.cores.generator is None:
            other = (max(0.0, sum(busy.values()) - server - generator), 0.0)
        else:
            other = (
                max(0.0, busy[self.cores.server] - server),
                max(0.0, busy[self.cores.generator] - generator),
            )
        return Phase(name, result, server, generator, *other, per_request_items, waited)

    def wait_for_quiet(self) -> float:
        """Wait until other processes leave both cores nearly idle for 0.5 s; seconds waited.

        Gives up after ``settle`` seconds: the phase is then measured anyway, and flagged if
        it was disturbed.
        """
        started = time.perf_counter()
        while time.perf_counter() - started < self.settle:
            before = core_busy_seconds()
            time.sleep(0.5)
            after = core_busy_seconds()
            if all((after[c] - before[c]) / 0.5 < INTERFERENCE_CORES for c in after):
                break
        return time.perf_counter() - started

    def measure_both(
        self,
        name: str,
        server_pid: int,
        endpoint: Endpoint,
        request: bytes,
        check: BodyCheck | None = None,
        per_request_items: int = 1,
    ) -> tuple[Phase, Phase]:
        """The phase at concurrency 1 (latency) and at 64 connections (throughput)."""
        return (
            self.measure(f"{name} c=1", server_pid, endpoint, request, 1, check, per_request_items),
            self.measure(
                f"{name} c={HIGH_CONCURRENCY}",
                server_pid,
                endpoint,
                request,
                HIGH_CONCURRENCY,
                check,
                per_request_items,
            ),
        )


def _has(*needles: bytes) -> BodyCheck:
    return lambda body: all(n in body for n in needles)


def _batch_ok(body: bytes) -> bool:
    return body.count(b'"ciphertext"') == BATCH_SIZE and b'"error"' not in body


def batch_request() -> bytes:
    body = json.dumps({"batch_input": [{}] * BATCH_SIZE}).encode()
    return build_request("POST", DATAKEY_PATH, body)


def measure_generator(bench: Bench) -> tuple[Phase, Phase]:
    """The generator against a server that does nothing: its own ceiling and latency floor."""
    path = str(bench.workdir / "canned.sock")
    server = bench.started(
        ServerProcess(
            "canned server",
            bench_server_argv("canned", path),
            bench.workdir / "canned.log",
            bench.cores,
        )
    )
    server.start()
    endpoint = Endpoint(unix_path=path)
    server.wait_ready(endpoint, "/")
    bench.pinning["canned server"] = affinity_report(server.pid)
    phases = bench.measure_both(
        "generator vs canned server", server.pid, endpoint, build_request("GET", "/"), _has(b'"ok"')
    )
    server.stop()
    return phases


def measure_bare(bench: Bench) -> tuple[ServerProcess, Endpoint]:
    """A bare aiohttp+uvloop handler on a Unix socket, sent the very request datakey gets; the
    server is left running for the interleaved rounds of the datakey phase."""
    path = str(bench.workdir / "bare.sock")
    server = bench.started(
        ServerProcess(
            "bare aiohttp", bench_server_argv("bare", path), bench.workdir / "bare.log", bench.cores
        )
    )
    server.start()
    endpoint = Endpoint(unix_path=path)
    server.wait_ready(endpoint, "/")
    bench.pinning["bare aiohttp server"] = affinity_report(server.pid)
    request = build_request("POST", DATAKEY_PATH, b"{}")
    bench.measure_both("bare aiohttp (unix)", server.pid, endpoint, request, _has(b'"ok"'))
    return server, endpoint


def start_openbao(bench: Bench) -> tuple[DevOpenBao, int]:
    """A dev OpenBao whose every thread runs on the server core, with the bench key; its pid."""
    from sidecar.devserver import DevOpenBao

    bao = DevOpenBao()
    # Spawned while this thread sits on the server core, bao and all its threads inherit it,
    # and the Go runtime sizes GOMAXPROCS to that one core.
    with own_affinity(bench.cores.server):
        bao.start()
    found = children_named("bao")
    if len(found) != 1:
        bao.stop()
        raise BenchError(f"expected one bao child process, found {found}")
    pin_all_threads(found[0], bench.cores.server)
    bao.create_key(KEY_NAME)
    return bao, found[0]


def measure_openbao(bench: Bench, bao: DevOpenBao, bao_pid: int) -> tuple[Phase, Phase]:
    """OpenBao transit datakey directly over loopback TCP, with the root token."""
    endpoint = Endpoint(host="127.0.0.1", port=bao.port)
    request = build_request("POST", DATAKEY_PATH, b"{}", {"X-Vault-Token": bao.root_token})
    phases = bench.measure_both(
        "OpenBao datakey (tcp)", bao_pid, endpoint, request, _has(b'"ciphertext"', b'"plaintext"')
    )
    pin_all_threads(bao_pid, bench.cores.server)  # and any thread Go started meanwhile
    bench.pinning["OpenBao (bao server -dev)"] = affinity_report(bao_pid)
    return phases


def measure_starts(bench: Bench, bao: DevOpenBao, count: int) -> list[float]:
    """Seconds from spawn to health 200 of ``count`` fresh sidecars, stopped after."""
    starts = []
    for i in range(count):
        sidecar = bench.started(
            Sidecar(bench.workdir, bao.address, bao.root_token, bench.cores, f"start{i}")
        )
        starts.append(sidecar.start_and_wait())
        sidecar.stop()
    return starts


@dataclass
class SidecarFigures:
    datakey: tuple[Phase, Phase]
    decrypt: tuple[Phase, Phase]
    batch: tuple[Phase, Phase]
    start_seconds: float
    upstream: dict[str, Any]
    #: sidecar datakey ÷ bare aiohttp req/s at 64 connections in interleaved rounds (bare,
    #: sidecar, sidecar, bare, ...): one ratio per round, so each compares loads a few seconds
    #: apart; the target is judged on their median.
    bare_rounds: tuple[float, ...]
    #: datakey at 64 connections: (1 rule, 50 rules), then (no audit, fail-closed audit), each
    #: pair measured back to back on fresh sidecars so that they share the machine's state.
    policy_pair: tuple[Phase, Phase] | None = None
    audit_pair: tuple[Phase, Phase] | None = None


def measure_sidecar(
    bench: Bench, bao: DevOpenBao, bare: tuple[ServerProcess, Endpoint]
) -> SidecarFigures:
    """datakey, decrypt and batch datakey over the socket; upstream calls across all three;
    datakey against the ``bare`` handler in interleaved rounds (then ``bare`` is stopped)."""
    sidecar = bench.started(
        Sidecar(bench.workdir, bao.address, bao.root_token, bench.cores, "main")
    )
    start_seconds = sidecar.start_and_wait()
    sidecar.wait_settled()
    bench.pinning["sidecar"] = affinity_report(sidecar.pid)
    before = sidecar.upstream_snapshot()
    endpoint, pid = sidecar.endpoint, sidecar.pid
    datakey = bench.measure_both(
        "sidecar datakey",
        pid,
        endpoint,
        build_request("POST", DATAKEY_PATH, b"{}"),
        _has(b'"ciphertext"', b'"plaintext"'),
    )
    bare_rounds = interleaved_ratios(bench, sidecar, *bare)
    bare[0].stop()
    code, body = fetch(endpoint, "POST", DATAKEY_PATH, b"{}")
    if code != 200:
        raise BenchError(f"the datakey for the decrypt phase answered {code}: {body[:300]!r}")
    blob = json.loads(body)["data"]["ciphertext"]
    decrypt_body = json.dumps({"ciphertext": blob}).encode()
    decrypt = bench.measure_both(
        "sidecar decrypt",
        pid,
        endpoint,
        build_request("POST", DECRYPT_PATH, decrypt_body),
        _has(b'"plaintext"'),
    )
    batch = bench.measure_both(
        f"sidecar datakey batch {BATCH_SIZE}", pid, endpoint, batch_request(), _batch_ok, BATCH_SIZE
    )
    upstream = upstream_delta(before, sidecar.upstream_snapshot())
    upstream["data_keys_issued"] = sum(p.round_items for p in (*datakey, *batch))
    bench.pinning["sidecar, after its phases"] = affinity_report(sidecar.pid)
    sidecar.stop()
    policy_pair = (
        variant_datakey(bench, bao, "1 rule", rules=1),
        variant_datakey(bench, bao, f"{POLICY_RULES} rules", rules=POLICY_RULES),
    )
    audit_pair = (
        variant_datakey(bench, bao, "audit off"),
        variant_datakey(bench, bao, "audit fail-closed", audit=True),
    )
    return SidecarFigures(
        datakey, decrypt, batch, start_seconds, upstream, bare_rounds, policy_pair, audit_pair
    )


def interleaved_ratios(
    bench: Bench, sidecar: Sidecar, bare: ServerProcess, bare_endpoint: Endpoint, rounds: int = 3
) -> tuple[float, ...]:
    """Sidecar datakey ÷ bare aiohttp req/s at 64 connections, one per round, the two loads of
    a round back to back (their order alternating): the host's speed drifts over minutes, so a
    ratio of phases measured minutes apart moves by a tenth or more between runs."""
    request = build_request("POST", DATAKEY_PATH, b"{}")
    ratios = []
    for i in range(max(rounds, bench.rounds)):
        loads = [
            ("sidecar datakey", sidecar.pid, sidecar.endpoint, _has(b'"ciphertext"')),
            ("bare aiohttp", bare.pid, bare_endpoint, _has(b'"ok"')),
        ]
        rates = {}
        for name, pid, endpoint, check in loads if i % 2 else loads[::-1]:
            phase = bench.measure_once(name, pid, endpoint, request, HIGH_CONCURRENCY, check, 1)
            if phase.result.errors:
                raise BenchError(f"{name}: {phase.result.errors} requests failed in a round")
            rates[name] = phase.result.requests_per_second
        ratios.append(ratio(rates["sidecar datakey"], rates["bare aiohttp"]))
    print(
        f"sidecar datakey ÷ bare aiohttp, {HIGH_CONCURRENCY} conns, interleaved rounds: "
        + " / ".join(f"{r:.3f}" for r in ratios),
        flush=True,
    )
    return tuple(ratios)


#: Rules in the policy of the policy-cost phase (issue: identity and policy, ≥ 0.85 of 1 rule).
POLICY_RULES = 50


def variant_datakey(
    bench: Bench, bao: DevOpenBao, label: str, *, rules: int = 1, audit: bool = False
) -> Phase:
    """datakey at 64 connections on a fresh sidecar with ``rules`` rules and optional audit."""
    tag = label.replace(" ", "-").replace(",", "")
    sidecar = bench.started(
        Sidecar(
            bench.workdir, bao.address, bao.root_token, bench.cores, tag, rules=rules, audit=audit
        )
    )
    sidecar.start_and_wait()
    sidecar.wait_settled()
    phase = bench.measure(
        f"sidecar datakey, {label} c={HIGH_CONCURRENCY}",
        sidecar.pid,
        sidecar.endpoint,
        build_request("POST", DATAKEY_PATH, b"{}"),
        HIGH_CONCURRENCY,
        _has(b'"ciphertext"', b'"plaintext"'),
    )
    sidecar.stop()
    return phase


def issuance_run(bench: Bench, bao: DevOpenBao, issuances: int) -> dict[str, Any]:
    """Issue ``issuances`` data keys on a fresh sidecar; its upstream calls and KEK rotations."""
    sidecar = bench.started(
        Sidecar(bench.workdir, bao.address, bao.root_token, bench.cores, "issuance")
    )
    sidecar.start_and_wait()
    sidecar.wait_settled()
    before = sidecar.upstream_snapshot()
    result = bench.run(
        run_load(
            sidecar.endpoint,
            batch_request(),
            connections=HIGH_CONCURRENCY,
            requests=math.ceil(issuances / BATCH_SIZE),
            check=_batch_ok,
        )
    )
    upstream = upstream_delta(before, sidecar.upstream_snapshot())
    sidecar.stop()
    if result.errors:
        print(f"    !!! {result.errors} ERRORS in the issuance run; first: {result.first_error}")
    return {
        "data_keys": result.completed * BATCH_SIZE,
        "seconds": result.seconds,
        "data_keys_per_second": result.requests_per_second * BATCH_SIZE,
        "errors": result.errors,
        "upstream": upstream,
        "load": result.summary(),
    }


# -- output -------------------------------------------------------------------------------

_HEADER = (
    f"{'phase':<36} {'conns':>5} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}"
    f" {'server':>6} {'gen':>5} {'other':>11}"
)


def print_phase(phase: Phase) -> None:
    r = phase.result
    mark = " *" if phase.disturbed else ""
    if len(phase.round_rates) > 1:
        mark += "  rounds: " + " / ".join(f"{rate:,.0f}" for rate in phase.round_rates)
    print(
        f"{phase.name:<36} {r.connections:>5} {r.requests_per_second:>8,.0f}"
        f" {r.percentile_ms(0.5):>7.3f} {r.percentile_ms(0.99):>7.3f} {phase.round_errors:>6}"
        f" {phase.server_cpu:>6.0%} {phase.generator_cpu:>5.0%}"
        f" {phase.other_on_server_core:>5.0%} {phase.other_on_generator_core:>5.0%}{mark}",
        flush=True,
    )
    if phase.round_errors:
        print(
            f"    !!! {phase.round_errors} ERRORS in this phase; first: {phase.first_error}",
            flush=True,
        )


@dataclass(frozen=True)
class Target:
    """One performance-target figure, its value, and whether it meets the target."""

    label: str
    value: float
    target: str
    ok: bool
    unit: str = ""

    def line(self) -> str:
        value = f"{self.value:,.3f}" if abs(self.value) < 100 else f"{self.value:,.0f}"
        verdict = "PASS" if self.ok else "MISS"
        return f"  {self.label:<56} {value + self.unit:>11}  target {self.target:<10} {verdict}"


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def design_targets(
    openbao: tuple[Phase, Phase],
    sidecar: SidecarFigures,
    starts: list[float],
    issuance: dict[str, Any] | None,
) -> list[Target]:
    datakey_1, datakey_64 = (p.result for p in sidecar.datakey)
    rps = datakey_64.requests_per_second
    vs_bare = statistics.median(sidecar.bare_rounds)
    vs_bao = ratio(rps, openbao[1].result.requests_per_second)
    p50 = ratio(datakey_1.percentile_ms(0.5), openbao[0].result.percentile_ms(0.5))
    p99 = datakey_64.percentile_ms(0.99)
    batch = sidecar.batch[1].items_per_second
    up = sidecar.upstream
    targets = [
        Target(
            f"datakey ÷ bare aiohttp req/s ({HIGH_CONCURRENCY} conns, interleaved)",
            vs_bare,
            "≥ 0.70",
            vs_bare >= 0.70,
        ),
        Target(
            f"sidecar ÷ OpenBao datakey req/s ({HIGH_CONCURRENCY} conns)",
            vs_bao,
            "≥ 2",
            vs_bao >= 2,
        ),
        Target("sidecar ÷ OpenBao datakey p50 (c=1)", p50, "≤ 0.5", p50 <= 0.5),
        Target(f"sidecar datakey p99 ({HIGH_CONCURRENCY} conns)", p99, "≤ 25 ms", p99 <= 25, " ms"),
        Target(
            f"data keys/s, batch_input of {BATCH_SIZE} ({HIGH_CONCURRENCY} conns)",
            batch,
            "≥ 100,000",
            batch >= 100_000,
        ),
        Target(
            f"start to ready, worst of {len(starts)}",
            max(starts),
            "≤ 1.5 s",
            max(starts) <= 1.5,
            " s",
        ),
        Target(
            f"upstream KEK calls in the sidecar phases ({up['kek_rotations']} rotations)",
            up["calls"],
            f"≤ {up['limit']}",
            up["ok"],
        ),
    ]
    if sidecar.policy_pair is not None:
        one, many = (p.result.requests_per_second for p in sidecar.policy_pair)
        share = ratio(many, one)
        targets.append(
            Target(
                f"datakey, {POLICY_RULES} rules ÷ 1 rule (peer identity)",
                share,
                "≥ 0.85",
                share >= 0.85,
            )
        )
    if sidecar.audit_pair is not None:
        off, on = (p.result.requests_per_second for p in sidecar.audit_pair)
        share = ratio(on, off)
        targets.append(Target("datakey, fail-closed audit on ÷ off", share, "≥ 0.8", share >= 0.8))
    if issuance is not None:
        up = issuance["upstream"]
        targets.append(
            Target(
                f"upstream calls, {issuance['data_keys']:,} issuances"
                f" ({up['kek_rotations']} rotations)",
                up["calls"],
                f"≤ {up['limit']}",
                up["ok"],
            )
        )
    return targets


def print_report(
    bench: Bench,
    sidecar: SidecarFigures,
    starts: list[float],
    issuance: dict[str, Any] | None,
    targets: list[Target],
    errors: int,
) -> None:
    if any(p.disturbed for p in bench.phases.values()):
        print(
            f"  * other processes used more than {INTERFERENCE_CORES:.0%} of a core during this"
            " phase: its figures are disturbed; rerun on a quiet machine"
        )
    print(
        f"\nbatch {BATCH_SIZE}, {HIGH_CONCURRENCY} conns:"
        f" {sidecar.batch[1].items_per_second:,.0f} data keys/s"
    )
    print(
        f"start to ready (spawn → /v1/sys/health 200), {len(starts)} starts: "
        + ", ".join(f"{s:.3f}" for s in starts)
        + f" s (median {statistics.median(starts):.3f}, worst {max(starts):.3f})"
    )
    up = sidecar.upstream
    print(
        f"upstream calls during the sidecar phases: {up['all_calls']} {up['calls_by_operation']}"
        f" ({up['calls']} for KEKs; 'read' is the root-key poll), KEK rotations"
        f" {up['kek_rotations']}; data keys issued in the measured windows"
        f" {up['data_keys_issued']:,} (and more during warm-ups)"
    )
    if issuance is not None:
        iu = issuance["upstream"]
        print(
            f"issuance run: {issuance['data_keys']:,} data keys in {issuance['seconds']:.1f} s"
            f" ({issuance['data_keys_per_second']:,.0f}/s): upstream calls {iu['calls']}"
            f" {iu['calls_by_operation']}, KEK rotations {iu['kek_rotations']},"
            f" live KEK uses after {iu['live_kek_uses_after']}"
        )
    print("\npinning (read back from the kernel with sched_getaffinity):")
    for name, report in bench.pinning.items():
        print(f"  {name:<30} {report}")
    print("\nTargets (docs/performance.md):")
    for target in targets:
        print(target.line())
    if errors:
        print(
            f"\n!!! {errors} REQUESTS FAILED: these figures are not valid (see the !!! lines above)"
        )


# -- the run ------------------------------------------------------------------------------


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_bench(args: argparse.Namespace) -> int:
    """Every phase, in order, then the report. Returns the exit status."""
    cores = Cores.choose()
    if cores.generator is not None:
        os.sched_setaffinity(0, {cores.generator})
    warmup = min(1.0, max(0.2, args.duration / 5))
    loadavg = os.getloadavg()
    factory = _loop_factory()
    print(
        f"kms-sidecar bench: {args.duration:g} s per phase after {warmup:g} s warm-up;"
        f" {os.cpu_count()} CPUs; load average {loadavg[0]:.2f} {loadavg[1]:.2f} {loadavg[2]:.2f};"
        f" event loop {'uvloop' if factory else 'asyncio'}"
    )
    if cores.server is None:
        print("!!! fewer than 2 CPUs available: no pinning; servers and generator share the CPU")
    print(
        "server, gen: CPU the server and the load generator used during the phase; other: CPU"
        " every other process used on the server's core, then on the generator's; in % of one"
        " core\n"
    )
    print(_HEADER, flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="kms-bench-") as tmp,
        asyncio.Runner(loop_factory=factory) as runner,
    ):
        bench = Bench(runner, cores, args.duration, warmup, Path(tmp), args.settle, args.rounds)
        bench.pinning["load generator (this process)"] = affinity_report(os.getpid())
        try:
            measure_generator(bench)
            bare = measure_bare(bench)
            bao, bao_pid = start_openbao(bench)
            try:
                openbao = measure_openbao(bench, bao, bao_pid)
                starts = measure_starts(bench, bao, args.starts - 1)
                sidecar = measure_sidecar(bench, bao, bare)
                starts.append(sidecar.start_seconds)
                issuance = issuance_run(bench, bao, args.issuances) if args.issuances else None
                if not args.no_client:
                    from bench.bench_client import measure_client

                    client = measure_client(bench, bao, bao_pid)
            finally:
                bao.stop()
        finally:
            bench.stop_all()

    targets = design_targets(openbao, sidecar, starts, issuance)
    errors = sum(p.round_errors for p in bench.phases.values())
    errors += issuance["errors"] if issuance else 0
    print_report(bench, sidecar, starts, issuance, targets, errors)
    if not args.no_client:
        from bench.bench_client import client_json, client_targets, print_client_report

        client_figures = client_targets(client)
        print_client_report(bench, client, client_figures)
        errors += sum(p.round_errors for p in client.phases.values())
    if args.json:
        figures = {
            "duration_seconds": args.duration,
            "warmup_seconds": warmup,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_before": loadavg,
            "pinning": bench.pinning,
            "phases": {name: phase.row() for name, phase in bench.phases.items()},
            "start_to_ready_seconds": starts,
            "upstream": sidecar.upstream,
            "datakey_vs_bare_interleaved_rounds": sidecar.bare_rounds,
            "issuance_run": issuance,
            "targets": [
                {"figure": t.label, "value": t.value, "target": t.target, "pass": t.ok}
                for t in targets
            ],
            "errors": errors,
        }
        if not args.no_client:
            figures["client"] = client_json(client, client_figures)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench",
        description="Measure the sidecar against a bare aiohttp handler and OpenBao.",
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="measured seconds per phase (default: 5)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1.5 s phases and 2 sidecar starts"
    )
    parser.add_argument(
        "--issuances",
        type=int,
        default=0,
        metavar="N",
        help="also issue N data keys (batch_input of 100) on a fresh sidecar, counting"
        " its upstream calls",
    )
    parser.add_argument(
        "--starts", type=int, default=5, help="sidecar start-to-ready samples (default: 5)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="before each phase, wait up to this long for other processes to leave the cores"
        " idle (default: 10; 0: don't wait)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="measure every phase N times and keep the round of median req/s (default: 1)",
    )
    parser.add_argument(
        "--no-client",
        action="store_true",
        help="skip the client SDK phases (bench.bench_client)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--serve", choices=("bare", "canned"), help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.socket)
        return 0
    if args.quick:
        args.duration = min(args.duration, 1.5)
        args.starts = min(args.starts, 2)
        args.settle = min(args.settle, 2.0)
    args.starts = max(1, args.starts)
    args.rounds = max(1, args.rounds)
    try:
        return run_bench(args)
    except BenchError as exc:
        print(f"\n!!! BENCH FAILED: {exc}", file=sys.stderr)
        return 2


# -- the servers this program starts as its own subprocesses -----------------------------


def serve(kind: str, socket_path: str) -> None:
    """Run the bare aiohttp handler or the canned server on ``socket_path`` until SIGTERM."""

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        if kind == "canned":
            from bench.loadgen import serve_canned

            task = asyncio.create_task(serve_canned(socket_path))
            await stop.wait()
            task.cancel()
            return
        from aiohttp import web

        async def handler(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.UnixSite(runner, socket_path, backlog=1024).start()
        await stop.wait()
        await runner.cleanup()

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(main())


if __name__ == "__main__":
    sys.exit(main())
