"""The client SDK's figures (docs/performance.md), measured against one sidecar in one run.

    python -m bench.bench_client [--duration SECONDS] [--quick] [--rounds N] [--settle SECONDS]
                                 [--phases NAME,...] [--json FILE]

Pinned as ``bench.bench`` pins: OpenBao and the sidecar on the first allowed CPU ("CPU 0"), this
process — the load generator, the SDK clients and a pool's refill thread — on the second. Each
phase has one request in flight at a time (or none: a pool's takes are in-memory pops):

- ``wire``: the lean generator (``bench/loadgen.py``) at concurrency 1, ``datakey/plaintext``;
- ``sync``: ``Client.datakey`` in a loop; ``async``: ``await AsyncClient.datakey`` on uvloop;
- ``pool``: ``KeyPool.take()`` from a filled pool (the take rate: keys a process can draw while
  the pool holds keys), then the sustained rate over a longer window, which the sidecar's batch
  issuance on one connection bounds; ``async-pool``: the same with ``AsyncKeyPool``;
- ``seal``: a pool key plus local AES-256-GCM of a 1 KiB record (``envelope.encrypt_records``);
- ``open``: ``envelope.decrypt_records`` of 1,000 such records (one ``batch_input`` decrypt);
- ``hvac``: hvac's ``generate_data_key`` against OpenBao transit directly, what apps do today.

``bench.bench`` runs these too, after its own phases, unless given ``--no-client``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.bench import (
    _HEADER,
    DATAKEY_PATH,
    INTERFERENCE_CORES,
    KEY_NAME,
    Bench,
    Phase,
    Sidecar,
    Target,
    _has,
    _loop_factory,
    print_phase,
    ratio,
    start_openbao,
)
from bench.loadgen import Result, build_request
from bench.machine import (
    BenchError,
    Cores,
    affinity_report,
    core_busy_seconds,
    process_cpu_seconds,
)

if TYPE_CHECKING:
    from sidecar.devserver import DevOpenBao

PHASES = ("wire", "sync", "async", "pool", "async-pool", "seal", "open", "hvac")
#: Keys a pool holds in the pool phases (refills ask for at most 1,000 at a time).
POOL_SIZE = 10_000
#: The burst phases' pools keep their keys this long, so that a slow fill on a busy machine
#: still fills: they measure the take rate, not expiry.
BURST_MAX_AGE = 60.0
RECORD = os.urandom(1024)
RECORDS_TO_OPEN = 1000


@dataclass
class ClientFigures:
    """Every client phase measured, by name, and the pool figures that are not calls."""

    phases: dict[str, Phase] = field(default_factory=dict)
    #: keys (or records) per second, by figure name.
    rates: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    #: Client ÷ wire in each interleaved round, by client ("sync", "async").
    round_ratios: dict[str, list[float]] = field(default_factory=dict)


def _median_round(rounds: list[Phase]) -> Phase:
    ordered = sorted(rounds, key=lambda p: p.result.requests_per_second)
    phase = ordered[len(ordered) // 2]
    phase.round_rates = tuple(p.result.requests_per_second for p in rounds)
    phase.round_errors = sum(p.result.errors for p in rounds)
    phase.first_error = next((p.result.first_error for p in rounds if p.result.errors), None)
    return phase


def _result(latencies_ns: list[int], seconds: float, errors: int, first: str | None) -> Result:
    latencies_ns.sort()
    completed = len(latencies_ns) + errors
    return Result(
        connections=1,
        seconds=seconds,
        completed=completed,
        statuses={200: len(latencies_ns), 599: errors} if errors else {200: len(latencies_ns)},
        bad_bodies=0,
        connection_errors=0,
        unanswered=0,
        generator_cpu_seconds=0.0,
        latencies_ns=latencies_ns,
        first_error=first,
    )


def _timed_loop(call: Callable[[], object], duration: float, warmup: float) -> Result:
    """``call()`` back to back: ``warmup`` seconds uncounted, then ``duration`` seconds."""
    clock = time.perf_counter_ns
    end = clock() + int(warmup * 1e9)
    while clock() < end:
        call()
    latencies: list[int] = []
    errors, first = 0, None
    start = clock()
    end = start + int(duration * 1e9)
    now = start
    while now < end:
        try:
            call()
        except Exception as exc:
            errors += 1
            first = first or f"{type(exc).__name__}: {exc}"
            done = clock()
        else:
            done = clock()
            latencies.append(done - now)
        now = done
    return _result(latencies, (now - start) / 1e9, errors, first)


async def _timed_loop_async(
    call: Callable[[], Coroutine[Any, Any, object]], duration: float, warmup: float
) -> Result:
    clock = time.perf_counter_ns
    end = clock() + int(warmup * 1e9)
    while clock() < end:
        await call()
    latencies: list[int] = []
    errors, first = 0, None
    start = clock()
    end = start + int(duration * 1e9)
    now = start
    while now < end:
        try:
            await call()
        except Exception as exc:
            errors += 1
            first = first or f"{type(exc).__name__}: {exc}"
            done = clock()
        else:
            done = clock()
            latencies.append(done - now)
        now = done
    return _result(latencies, (now - start) / 1e9, errors, first)


def measure_in_process(
    bench: Bench, name: str, server_pid: int, run: Callable[[], Result], per_call: int = 1
) -> Phase:
    """Run ``run`` ``bench.rounds`` times with the CPU accounting of ``Bench.measure``; the
    round of median rate is kept and printed.
    """
    rounds = []
    for _ in range(bench.rounds):
        waited = bench.wait_for_quiet()
        cores_before = core_busy_seconds()
        server_before = process_cpu_seconds(server_pid)
        client_before = time.process_time()
        wall_before = time.perf_counter()
        result = run()
        wall = time.perf_counter() - wall_before
        server = (process_cpu_seconds(server_pid) - server_before) / wall
        client = (time.process_time() - client_before) / wall
        busy = {c: (v - cores_before[c]) / wall for c, v in core_busy_seconds().items()}
        if bench.cores.server is None or bench.cores.generator is None:
            other = (max(0.0, sum(busy.values()) - server - client), 0.0)
        else:
            other = (
                max(0.0, busy[bench.cores.server] - server),
                max(0.0, busy[bench.cores.generator] - client),
            )
        rounds.append(Phase(name, result, server, client, *other, per_call, waited))
    ordered = sorted(rounds, key=lambda p: p.result.requests_per_second)
    phase = ordered[len(ordered) // 2]
    phase.round_rates = tuple(p.result.requests_per_second for p in rounds)
    phase.round_errors = sum(p.result.errors for p in rounds)
    phase.round_items = sum(p.result.completed * per_call for p in rounds)
    phase.first_error = next((p.result.first_error for p in rounds if p.result.errors), None)
    bench.phases[name] = phase
    print_phase(phase)
    return phase


def _wait_full(stats: Callable[[], Any], size: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while stats().held < size:
        if time.monotonic() > deadline:
            raise BenchError(f"the pool did not fill to {size} keys within {timeout:g} s")
        time.sleep(0.002)


def _bursts(
    take_all: Callable[[int], None], stats: Callable[[], Any], duration: float, size: int
) -> Result:
    """Draw a full pool dry, again and again for ``duration`` seconds of drawing.

    The pool refills in the background meanwhile (a quarter missing starts a refill), so a
    burst competes with its own refills for the GIL, as an application would.
    """
    spent, keys, latencies = 0.0, 0, []
    while spent < duration:
        _wait_full(stats, size)
        started = time.perf_counter_ns()
        take_all(size)
        elapsed = time.perf_counter_ns() - started
        spent += elapsed / 1e9
        keys += size
        latencies.append(elapsed // size)
    return _burst_result(latencies, spent, keys)


def _burst_result(latencies_ns: list[int], seconds: float, keys: int) -> Result:
    """A burst phase's result: its "latencies" are the mean cost of one take in each burst."""
    return Result(
        connections=1,
        seconds=seconds,
        completed=keys,
        statuses={200: keys},
        bad_bodies=0,
        connection_errors=0,
        unanswered=0,
        generator_cpu_seconds=0.0,
        latencies_ns=sorted(latencies_ns),
    )


def measure_client(
    bench: Bench, bao: DevOpenBao, bao_pid: int, phases: tuple[str, ...] = PHASES
) -> ClientFigures:
    """The client phases against a fresh sidecar on ``bao``; each printed as it ends."""
    from sidecar.client import AsyncClient, Client, envelope

    figures = ClientFigures()
    sidecar = bench.started(
        Sidecar(bench.workdir, bao.address, bao.root_token, bench.cores, "client")
    )
    sidecar.start_and_wait()
    sidecar.wait_settled()
    bench.pinning["sidecar (client phases)"] = affinity_report(sidecar.pid)
    socket_path, pid = sidecar.endpoint.unix_path, sidecar.pid
    assert socket_path is not None
    duration, warmup = bench.duration, bench.warmup

    # The wire and the two clients are measured in interleaved rounds (wire, sync, async, wire,
    # ...), so that each ratio compares phases that shared the machine's state: on a shared
    # host the load changes from one phase to the next more than these ratios differ.
    trio = [name for name in ("wire", "sync", "async") if name in phases]
    rounds, bench.rounds = bench.rounds, 1
    measured: dict[str, list[Phase]] = {name: [] for name in trio}
    try:
        with Client(socket_path) as client:

            async def async_round() -> Result:
                async with AsyncClient(socket_path) as aclient:
                    return await _timed_loop_async(
                        lambda: aclient.datakey(KEY_NAME), duration, warmup
                    )

            for number in range(1, rounds + 1):
                tag = f" #{number}" if rounds > 1 else ""
                for name in trio:
                    if name == "wire":
                        phase = bench.measure(
                            f"wire: loadgen datakey c=1{tag}",
                            pid,
                            sidecar.endpoint,
                            build_request("POST", DATAKEY_PATH, b"{}"),
                            1,
                            _has(b'"ciphertext"', b'"plaintext"'),
                        )
                    elif name == "sync":
                        phase = measure_in_process(
                            bench,
                            f"sync Client.datakey c=1{tag}",
                            pid,
                            lambda: _timed_loop(lambda: client.datakey(KEY_NAME), duration, warmup),
                        )
                    else:
                        phase = measure_in_process(
                            bench,
                            f"async AsyncClient.datakey c=1{tag}",
                            pid,
                            lambda: bench.run(async_round()),
                        )
                    measured[name].append(phase)
    finally:
        bench.rounds = rounds
    for name, kept in measured.items():
        figures.phases[name] = _median_round(kept)
    if "wire" in measured:
        for name in ("sync", "async"):
            if name in measured:
                figures.round_ratios[name] = [
                    ratio(c.result.requests_per_second, w.result.requests_per_second)
                    for c, w in zip(measured[name], measured["wire"], strict=True)
                ]

    if "pool" in phases:
        with (
            Client(socket_path) as client,
            client.key_pool(KEY_NAME, size=POOL_SIZE, max_age=BURST_MAX_AGE) as pool,
        ):

            def take_all(n: int) -> None:
                take = pool.take
                for _ in range(n):
                    take()

            phase = measure_in_process(
                bench,
                f"KeyPool.take, full pool of {POOL_SIZE:,}",
                pid,
                lambda: _bursts(take_all, pool.stats, duration, POOL_SIZE),
            )
            figures.phases["pool"] = phase
            figures.rates["pool take"] = phase.result.requests_per_second
            sustained = measure_in_process(
                bench,
                "KeyPool.take, sustained",
                pid,
                lambda: _timed_loop(pool.take, duration, warmup),
            )
            figures.phases["pool sustained"] = sustained
            figures.rates["pool sustained"] = sustained.result.requests_per_second
            stats = pool.stats()
            figures.notes["pool"] = (
                f"{stats.issued:,} keys issued in {stats.refills:,} refills, {stats.taken:,}"
                f" taken, {stats.expired:,} expired"
            )

    if "async-pool" in phases:

        async def async_bursts() -> Result:
            async with (
                AsyncClient(socket_path) as client,
                client.key_pool(KEY_NAME, size=POOL_SIZE, max_age=BURST_MAX_AGE) as pool,
            ):

                async def take_all(n: int) -> None:
                    take = pool.take
                    for _ in range(n):
                        await take()

                spent, keys, latencies = 0.0, 0, []
                while spent < duration:
                    while pool.stats().held < POOL_SIZE:  # noqa: ASYNC110 - a pool has no event
                        await asyncio.sleep(0.002)
                    started = time.perf_counter_ns()
                    await take_all(POOL_SIZE)
                    elapsed = time.perf_counter_ns() - started
                    spent += elapsed / 1e9
                    keys += POOL_SIZE
                    latencies.append(elapsed // POOL_SIZE)
                return _burst_result(latencies, spent, keys)

        phase = measure_in_process(
            bench,
            f"AsyncKeyPool.take, full pool of {POOL_SIZE:,}",
            pid,
            lambda: bench.run(async_bursts()),
        )
        figures.phases["async-pool"] = phase
        figures.rates["async pool take"] = phase.result.requests_per_second

    if "seal" in phases:
        with (
            Client(socket_path) as client,
            client.key_pool(KEY_NAME, size=POOL_SIZE, max_age=BURST_MAX_AGE) as pool,
        ):
            records = [RECORD] * POOL_SIZE

            def seal_all(n: int) -> None:
                envelope.encrypt_records_sync(pool, records[:n])

            phase = measure_in_process(
                bench,
                "pool key + AES-GCM of 1 KiB",
                pid,
                lambda: _bursts(seal_all, pool.stats, duration, POOL_SIZE),
            )
            figures.phases["seal"] = phase
            figures.rates["records sealed"] = phase.result.requests_per_second

    if "open" in phases:
        with Client(socket_path) as client:
            with client.key_pool(KEY_NAME, size=RECORDS_TO_OPEN) as pool:
                sealed = envelope.encrypt_records_sync(pool, [RECORD] * RECORDS_TO_OPEN)
            if envelope.decrypt_records_sync(client, sealed) != [RECORD] * RECORDS_TO_OPEN:
                raise BenchError("decrypt_records did not give the records back")
            phase = measure_in_process(
                bench,
                f"decrypt_records of {RECORDS_TO_OPEN:,}",
                pid,
                lambda: _timed_loop(
                    lambda: envelope.decrypt_records_sync(client, sealed), duration, warmup
                ),
                RECORDS_TO_OPEN,
            )
            figures.phases["open"] = phase
            figures.rates["records opened"] = phase.items_per_second

    if "hvac" in phases:
        import hvac

        vault = hvac.Client(url=bao.address, token=bao.root_token)
        transit = vault.secrets.transit

        def hvac_datakey() -> None:
            answer = transit.generate_data_key(name=KEY_NAME, key_type="plaintext")
            if "plaintext" not in answer["data"]:
                raise BenchError(f"hvac datakey answered {answer!r:.200}")

        figures.phases["hvac"] = measure_in_process(
            bench,
            "hvac → OpenBao datakey c=1",
            bao_pid,
            lambda: _timed_loop(hvac_datakey, duration, warmup),
        )
        vault.adapter.close()

    sidecar.stop()
    return figures


def client_targets(figures: ClientFigures) -> list[Target]:
    """The client targets' figures, for the phases that were measured."""
    rate = {name: p.result.requests_per_second for name, p in figures.phases.items()}
    targets = []
    for name, label in (("sync", "sync Client"), ("async", "async AsyncClient")):
        ratios = figures.round_ratios.get(name)
        if ratios:
            share = statistics.median(ratios)
            rounds = f", median of {len(ratios)} rounds" if len(ratios) > 1 else ""
            targets.append(
                Target(f"{label} datakey/s ÷ wire c=1{rounds}", share, "≥ 0.8", share >= 0.8)
            )
    if "pool take" in figures.rates:
        take = figures.rates["pool take"]
        targets.append(
            Target("single-use keys/s from a KeyPool", take, "≥ 200,000", take >= 200_000)
        )
        if "hvac" in rate:
            share = ratio(take, rate["hvac"])
            targets.append(
                Target("pool keys/s ÷ hvac → OpenBao datakey/s", share, "≥ 100", share >= 100)
            )
    return targets


def print_client_report(bench: Bench, figures: ClientFigures, targets: list[Target]) -> None:
    rate = {name: p.result.requests_per_second for name, p in figures.phases.items()}
    print("\nclient SDK (one request in flight; pool takes are in-memory pops):")
    for name, value in figures.rates.items():
        print(f"  {name:<28} {value:>12,.0f} /s")
    if "hvac" in rate and "pool sustained" in figures.rates:
        sustained = ratio(figures.rates["pool sustained"], rate["hvac"])
        print(
            f"  {'pool sustained ÷ hvac':<28} {sustained:>12,.1f}"
            "  (bounded by the sidecar's batch issuance on one connection)"
        )
    for name, ratios in figures.round_ratios.items():
        shown = " / ".join(f"{r:.3f}" for r in ratios)
        print(f"  {name + ' ÷ wire, each round':<28} {shown}")
    costs = [
        f"{name} {p.generator_cpu / p.result.requests_per_second * 1e6:,.0f} µs"
        for name, p in figures.phases.items()
        if name in ("wire", "sync", "async") and p.result.requests_per_second
    ]
    if costs:
        print(f"  {'client CPU per call':<28} {', '.join(costs)} (CPU 1; the rest is the server)")
    for note in figures.notes.values():
        print(f"  {note}")
    if any(p.disturbed for p in figures.phases.values()):
        print(
            f"  * other processes used more than {INTERFERENCE_CORES:.0%} of a core during a"
            " phase marked so: rerun on a quiet machine"
        )
    print("\nClient targets (docs/performance.md):")
    for target in targets:
        print(target.line())


def run(args: argparse.Namespace) -> int:
    phases = tuple(p for p in args.phases.split(",") if p)
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        print(f"unknown phases {unknown}; choose from {', '.join(PHASES)}", file=sys.stderr)
        return 2
    cores = Cores.choose()
    if cores.generator is not None:
        os.sched_setaffinity(0, {cores.generator})
    warmup = min(1.0, max(0.2, args.duration / 5))
    loadavg = os.getloadavg()
    print(
        f"kms-sidecar client bench: {args.duration:g} s per phase after {warmup:g} s warm-up;"
        f" {os.cpu_count()} CPUs; load average {loadavg[0]:.2f} {loadavg[1]:.2f}"
        f" {loadavg[2]:.2f}; phases {', '.join(phases)}"
    )
    if cores.server is None:
        print("!!! fewer than 2 CPUs available: no pinning; servers and clients share the CPU")
    print("server, gen: CPU of the server and of this process (client) during the phase\n")
    print(_HEADER, flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="kms-bench-") as tmp,
        asyncio.Runner(loop_factory=_loop_factory()) as runner,
    ):
        bench = Bench(runner, cores, args.duration, warmup, Path(tmp), args.settle, args.rounds)
        bench.pinning["client (this process)"] = affinity_report(os.getpid())
        try:
            bao, bao_pid = start_openbao(bench)
            try:
                figures = measure_client(bench, bao, bao_pid, phases)
                bench.pinning["OpenBao (bao server -dev)"] = affinity_report(bao_pid)
            finally:
                bao.stop()
        finally:
            bench.stop_all()
    targets = client_targets(figures)
    print_client_report(bench, figures, targets)
    print("\npinning (read back from the kernel with sched_getaffinity):")
    for name, report in bench.pinning.items():
        print(f"  {name:<30} {report}")
    errors = sum(p.round_errors for p in figures.phases.values())
    if errors:
        print(f"\n!!! {errors} CALLS FAILED: these figures are not valid (see the !!! lines above)")
    if args.json:
        Path(args.json).write_text(json.dumps(client_json(figures, targets), indent=2) + "\n")
    return 1 if errors else 0


def client_json(figures: ClientFigures, targets: list[Target]) -> dict[str, Any]:
    return {
        "phases": {name: phase.row() for name, phase in figures.phases.items()},
        "rates_per_second": {k: round(v, 1) for k, v in figures.rates.items()},
        "notes": figures.notes,
        "client_over_wire_by_round": figures.round_ratios,
        "targets": [
            {"figure": t.label, "value": t.value, "target": t.target, "pass": t.ok} for t in targets
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_client",
        description="Measure the client SDK against the wire, and pools against hvac.",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 s phases")
    parser.add_argument("--rounds", type=int, default=1, metavar="N", help="rounds per phase")
    parser.add_argument(
        "--settle", type=float, default=10.0, metavar="SECONDS", help="wait for quiet cores"
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated phases to run (default: all of {','.join(PHASES)})",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 1.0)
        args.settle = min(args.settle, 1.0)
    args.rounds = max(1, args.rounds)
    try:
        return run(args)
    except BenchError as exc:
        print(f"\n!!! BENCH FAILED: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
