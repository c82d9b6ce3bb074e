"""The machine helpers both benchmark programs share: CPUs, pinning, CPU time, child processes.

``bench.bench`` and ``bench.bench_hsm`` run every server on the first allowed CPU and the load
generator on the second; these choose the CPUs, set and read back the affinity masks, read the
CPU time the kernel reports in ``/proc`` (Linux only), find and stop the servers' processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A server (or the HSM token) could not be set up, or answered wrongly outside a load phase."""


@dataclass(frozen=True)
class Cores:
    """Which CPU the servers get and which the generator gets (None: no pinning possible)."""

    server: int | None
    generator: int | None

    @classmethod
    def choose(cls) -> Cores:
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            return cls(None, None)
        return cls(allowed[0], allowed[1])

    def pin_child(self) -> Callable[[], None] | None:
        """A ``preexec_fn`` pinning a child (and every thread it starts) to the server core."""
        if self.server is None:
            return None
        cpu = self.server
        return lambda: os.sched_setaffinity(0, {cpu})


@contextlib.contextmanager
def own_affinity(cpu: int | None) -> Iterator[None]:
    """Run this thread on ``cpu`` for a while, so children spawned meanwhile inherit it."""
    if cpu is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def thread_ids(pid: int) -> list[int]:
    try:
        return sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return []


def pin_all_threads(pid: int, cpu: int | None) -> None:
    """Pin every existing thread of ``pid`` (Go starts several) to ``cpu``."""
    if cpu is None:
        return
    for tid in thread_ids(pid):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, {cpu})


def affinity_report(pid: int) -> str:
    """The CPUs each thread of ``pid`` may run on, as read back from the kernel."""
    masks: dict[str, int] = {}
    for tid in thread_ids(pid):
        with contextlib.suppress(ProcessLookupError):
            key = ",".join(map(str, sorted(os.sched_getaffinity(tid))))
            masks[key] = masks.get(key, 0) + 1
    return "; ".join(f"CPU {cpus} ({n} thread{'s' * (n != 1)})" for cpus, n in masks.items())


def children_named(name: str) -> list[int]:
    """Pids of this process's children whose command is ``name``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == os.getpid() and comm == name:
            found.append(int(entry))
    return found


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads) so far; 0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def core_busy_seconds() -> dict[int, float]:
    """Seconds each CPU spent running processes (user, nice, system) since boot, /proc/stat.

    Interrupt time is left out: the kernel charges it to no process, and loopback networking
    puts much of a server's own work there.
    """
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in values]
            busy[int(name[3:])] = sum(ticks[:3]) / CLOCK_TICKS
    return busy


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``process`` if it still runs; SIGKILL it if it has not exited 15 s later."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
