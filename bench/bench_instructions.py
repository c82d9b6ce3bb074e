"""CPU instructions per request, counted by valgrind's callgrind: figures that do not drift.

    python -m bench.bench_instructions [--requests N] [--tree DIR ...]

On a shared VM the req/s of ``bench.bench`` moves by a quarter from one minute to the next, so
a change of a few per cent in the server's own work cannot be seen in it. Instructions can: the
same requests to the same server execute the same instructions to within a fraction of a per
cent, whatever the host is doing. They are not time (a syscall or a cache miss costs more than
an instruction), but for Python code the two move together, and the figures compare commits.

For each tree (this checkout by default; ``--tree DIR`` adds another checkout, such as an older
commit made with ``git worktree add``), against one dev OpenBao:

- **datakey**: ``POST /v1/transit/datakey/plaintext/bench`` with ``{}``, 16 connections;
- **batch**: the same with a ``batch_input`` of 100 (reported per item);
- **audit**: datakey with a fail-closed audit log (its ``fdatasync`` runs in a thread, which is
  counted too);

and once, **bare**: the bare aiohttp handler of ``bench.bench`` sent the datakey request. The
server runs under ``valgrind --tool=callgrind`` with instrumentation off; it is switched on (by
``callgrind_control``) only for the measured requests, after a warm-up of 200. Each server is
run from its tree, with this checkout's Python. Needs valgrind (Debian's ``valgrind``); a run
takes about a minute per tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench import (
    DATAKEY_PATH,
    KEY_NAME,
    REPO_ROOT,
    ServerProcess,
    Sidecar,
    bench_server_argv,
)
from bench.loadgen import Endpoint, build_request, fetch, run_load
from bench.machine import BenchError, Cores

#: Counting instructions needs no pinning (nor two cores).
UNPINNED = Cores(None, None)

CONNECTIONS = 16
WARMUP = 200
BATCH = 100
#: (phase, items per request, audit on)
PHASES = (("datakey", 1, False), ("batch", BATCH, False), ("audit", 1, True))


def counted(
    server: ServerProcess,
    endpoint: Endpoint,
    request: bytes,
    requests: int,
    ready_path: str,
) -> float:
    """Instructions per request of ``server`` (its argv run under callgrind) over ``requests``."""
    out = server.log_path.with_name("callgrind.out")
    server.argv = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        *server.argv,
    ]
    server.start()
    try:
        server.wait_ready(endpoint, ready_path, timeout=120)  # Python starts slowly under valgrind
        asyncio.run(run_load(endpoint, request, connections=CONNECTIONS, requests=WARMUP, warmup=0))
        _callgrind(server.pid, "--instr=on")
        result = asyncio.run(
            run_load(
                endpoint,
                request,
                connections=CONNECTIONS,
                requests=requests,
                warmup=0,
                drain_timeout=600,
            )
        )
        _callgrind(server.pid, "--instr=off")
        _callgrind(server.pid, "--dump")  # the counts are on disk however the server then ends
    finally:
        server.stop()
    if result.errors:
        raise BenchError(f"{result.errors} of {requests} requests failed: {result.first_error}")
    return _total_instructions(out) / result.completed


def _callgrind(pid: int, command: str) -> None:
    subprocess.run(
        ["callgrind_control", command, str(pid)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _total_instructions(out: Path) -> int:
    """The sum of every thread's and part's totals in callgrind's output files."""
    total = 0
    for part in out.parent.glob(out.name + "*"):
        for line in part.read_text().splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


def measure_tree(
    tree: Path, bao_address: str, token: str, requests: int, workdir: Path
) -> dict[str, float]:
    """Instructions per request (per item for ``batch``) of each phase on ``tree``'s sidecar."""
    figures = {}
    for phase, items, audit in PHASES:
        phase_dir = workdir / phase
        phase_dir.mkdir()
        sidecar = Sidecar(phase_dir, bao_address, token, UNPINNED, phase, audit=audit, tree=tree)
        body = json.dumps({"batch_input": [{}] * items}).encode() if items > 1 else b"{}"
        request = build_request("POST", DATAKEY_PATH, body)
        per_request = counted(
            sidecar, sidecar.endpoint, request, max(20, requests // items), "/v1/sys/health"
        )
        figures[phase] = per_request / items
    return figures


def measure_bare(requests: int, workdir: Path) -> float:
    path = str(workdir / "bare.sock")
    server = ServerProcess(
        "bare aiohttp", bench_server_argv("bare", path), workdir / "bare.log", UNPINNED
    )
    request = build_request("POST", DATAKEY_PATH, b"{}")
    return counted(server, Endpoint(unix_path=path), request, requests, "/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_instructions", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=2000,
        help="measured requests per phase (default: 2000; batch: a 100th)",
    )
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        type=Path,
        help="also measure the sidecar of this checkout (repeatable)",
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    from sidecar.devserver import DevOpenBao

    trees = [REPO_ROOT, *(tree.resolve() for tree in args.tree)]
    with tempfile.TemporaryDirectory(prefix="kms-bench-ir-") as tmp, DevOpenBao() as bao:
        workdir = Path(tmp)
        status, body = fetch(
            Endpoint(host="127.0.0.1", port=bao.port),
            "POST",
            f"/v1/transit/keys/{KEY_NAME}",
            b"{}",
            {"X-Vault-Token": bao.root_token},
        )
        if status not in (200, 204):
            raise BenchError(f"creating the bench key answered {status}: {body[:200]!r}")
        try:
            bare = measure_bare(args.requests, workdir)
            print(f"bare aiohttp handler       {bare / 1e3:8.1f}k instructions per request")
            for i, tree in enumerate(trees):
                tree_dir = workdir / f"tree{i}"
                tree_dir.mkdir()
                figures = measure_tree(tree, bao.address, bao.root_token, args.requests, tree_dir)
                print(f"\n{tree}")
                print(
                    f"  datakey                  {figures['datakey'] / 1e3:8.1f}k per request"
                    f"   bare ÷ datakey {bare / figures['datakey']:.3f}"
                )
                print(f"  batch_input of {BATCH}      {figures['batch'] / 1e3:8.1f}k per item")
                print(
                    f"  fail-closed audit        {figures['audit'] / 1e3:8.1f}k per request"
                    f"   datakey ÷ audit {figures['datakey'] / figures['audit']:.3f}"
                )
        except BenchError as exc:
            print(f"\n!!! BENCH FAILED: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
