"""The Unix socket: created with its final mode from the first instant, removed on exit."""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
from collections.abc import Iterator

from sidecar.errors import ConfigError
from sidecar.strict_modes import check_directory


class SocketInUse(ConfigError):
    """A live server already answers on the socket path."""


def _claim_path(path: str, setting: str) -> None:
    """Make ``path`` free: remove a stale socket; refuse a live one or any other file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{setting}: {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
    else:
        raise SocketInUse(f"{setting}: another server is already listening on {path}")
    finally:
        probe.close()
    os.unlink(path)  # stale: left by a process that died


@contextlib.contextmanager
def unix_listener(
    path: str, mode: int, group: str = "", backlog: int = 1024, *, setting: str = "server.socket"
) -> Iterator[socket.socket]:
    """A listening Unix socket at ``path`` with permissions ``mode``; removed on exit.

    The umask is set before ``bind`` so the socket never exists with wider permissions than
    ``mode`` (no chmod-after-bind race). ``group``, if set, becomes the socket's group. The
    directory, and every one above it, must pass :func:`~sidecar.strict_modes.check_directory`
    (nobody else may replace the socket); ``setting`` names the config key in messages.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o755, exist_ok=True)
    check_directory(parent, setting=setting, holds="the socket")
    _claim_path(path, setting)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{setting}: cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    inode = os.stat(path).st_ino
    try:
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(f"{setting}_group: no group named {group!r}") from None
            os.chown(path, -1, gid)
        sock.listen(backlog)
        sock.setblocking(False)
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == inode:  # don't remove a successor's socket
                os.unlink(path)
