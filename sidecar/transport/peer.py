"""Unix peer credentials of a socket connection (SO_PEERCRED), read once per connection."""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

from sidecar.identity import PeerCredentials

_UCRED = struct.Struct("3i")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def read_peer_credentials(sock: Any, *, connected_at: float) -> PeerCredentials | None:
    """The uid, gid and pid the kernel recorded for the peer, and the pid's executable.

    ``exe`` is read from ``/proc`` and kept only if the process provably is the one that
    connected: it must have started no later than ``connected_at`` (Unix seconds) and keep
    the same start time across the read, so a pid reused by another program is never trusted.
    Returns ``None`` when the socket is not a Unix socket.
    """
    if getattr(sock, "family", None) != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except (OSError, AttributeError):
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(uid=uid, gid=gid, pid=pid, exe=_exe_of(pid, connected_at))


def _exe_of(pid: int, connected_at: float) -> str | None:
    if pid <= 0:
        return None
    before = _start_time(pid)
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    after = _start_time(pid)
    if before is None or before != after or before > connected_at + 1.0:
        return None
    return exe


def _boot_time() -> float:
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("btime "):
                return float(line.split()[1])
    return time.time() - time.monotonic()


_BOOT_TIME = _boot_time()


def _start_time(pid: int) -> float | None:
    """When ``pid`` started, in Unix seconds, from ``/proc/<pid>/stat``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return _BOOT_TIME + int(fields[19]) / _CLOCK_TICKS
