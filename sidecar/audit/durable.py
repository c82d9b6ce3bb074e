"""File primitives the audit log relies on: whole writes, durable names, UTC-stamped names."""

from __future__ import annotations

import os
import time


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write fewer)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(path: str) -> None:
    """Make the names in directory ``path`` (a new file, a rename) survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stamp(unix_seconds: float) -> str:
    """``20250101T000000Z``: the UTC time suffix of rotated and set-aside files."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(unix_seconds))


def free_name(name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... : the first that does not exist yet."""
    candidate, n = name, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{name}-{n}"
    return candidate
