"""The host checked as sshd's StrictModes does: paths others could replace stop start-up.

Whoever can write to a directory can rename what is in it and put their own file (or socket) in
its place. So the directory that holds the socket or the audit log, and every directory above
it up to ``/``, must be:

- owned by root or by the sidecar's own user, and
- writable by no one else (no group or other write bit), unless its sticky bit is set, as on
  ``/tmp``: then others may add names but not rename or remove the sidecar's.

A directory that fails stops start-up with a :class:`~sidecar.errors.ConfigError` naming the
setting, the path and what to change. A file the sidecar keeps (the audit log) must be owned by
it and writable by no one else; :func:`tighten_file` sets one it finds writable by others to
0600, and says so.
"""

from __future__ import annotations

import logging
import os
import stat

from sidecar.errors import ConfigError

log = logging.getLogger(__name__)

_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def check_directory(directory: str, *, setting: str, holds: str) -> None:
    """Refuse ``directory`` unless it and every directory above it are safe (see the module).

    ``setting`` is the dotted config key the path came from and ``holds`` what the directory
    holds ("the socket"), both for the message. Symbolic links are resolved first, so the
    directories checked are the ones the path really goes through. Raises ``ConfigError``.
    """
    path = os.path.realpath(directory)
    while True:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot check {path}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{setting}: {path} is not a directory")
        mode = stat.S_IMODE(st.st_mode)
        if not _trusted_owner(st.st_uid):
            raise ConfigError(
                f"{setting}: {path} is owned by uid {st.st_uid}, another user, who could replace "
                f"{holds}; use a directory owned by root or by this user (uid {os.geteuid()})"
            )
        if mode & _WRITABLE_BY_OTHERS and not mode & stat.S_ISVTX:
            who = "other users" if mode & stat.S_IWOTH else "its group"
            raise ConfigError(
                f"{setting}: {path} (mode {mode:04o}) is writable by {who} without the sticky "
                f"bit, so {holds} could be replaced; run chmod go-w {path}, or use a directory "
                "only this user can write"
            )
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def tighten_file(path: str, *, setting: str) -> None:
    """Set the existing file at ``path`` to 0600 if others may write it, and log that it did.

    A file owned by another non-root user is refused (``ConfigError``): that user could loosen
    it again. A missing file is left to be created (with mode 0600).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        return  # not a file the sidecar keeps: opening it refuses it, naming what it is
    if not _trusted_owner(st.st_uid):
        raise ConfigError(
            f"{setting}: {path} is owned by uid {st.st_uid}, another user; it must belong to "
            f"this user (uid {os.geteuid()}) or root"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & _WRITABLE_BY_OTHERS:
        os.chmod(path, 0o600)
        log.warning(
            "%s: %s was mode %04o, writable by others; changed it to 0600", setting, path, mode
        )
