"""How the sidecar gets an upstream token: one small :class:`AuthMethod` per ``auth_method``.

- ``token``: a token from ``token_file`` (re-read whenever the file changes) or ``token_env``;
- ``approle``: ``role_id`` plus the secret ID in ``secret_id_file`` (``auth_mount``, default
  ``approle``);
- ``jwt``: the JWT in ``jwt_file`` (re-read when it changes, e.g. a rotated projected service
  account token) for ``role`` (``auth_mount``, default ``jwt``).

:meth:`AuthMethod.check` runs at construction: a credential that cannot exist (an unset token
variable, a missing, unreadable or empty file) is a ``ConfigError`` naming its key. Keeping the
token alive is :mod:`sidecar.backends.vault_auth`'s job. Secrets never appear in a message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import hvac

from sidecar.config import VaultConfig, check_auth_method
from sidecar.errors import ConfigError, UpstreamError

#: ``send(operation, call, token)``: run ``call`` on an hvac client carrying ``token`` ("" for
#: none), failing over across the configured addresses; raises the sidecar's errors only.
Send = Callable[[str, Callable[[hvac.Client], Any], str], Any]


class CredentialError(UpstreamError):
    """The sidecar's own credentials (a token, secret ID or JWT file) could not be read."""


@dataclass(frozen=True, slots=True)
class Grant:
    """A token and what the upstream said about it. ``ttl`` is seconds; ``None`` never expires."""

    token: str = field(repr=False)
    ttl: float | None
    renewable: bool
    #: The TTL a renewal can give at most (the login's TTL); a shorter renewal means max TTL.
    full_ttl: float | None = None


class AuthMethod(Protocol):
    """How the sidecar gets a token: one small class per ``auth_method``."""

    #: ``token``, ``approle`` or ``jwt``.
    name: str
    #: The auth mount the method logs in at (``token`` for a given token).
    mount: str

    def login(self, send: Send) -> Grant:
        """A fresh token. Raises ``UpstreamUnavailable`` (no node answered) or ``UpstreamError``."""

    def changed(self) -> bool:
        """True when a credential changed in a way that makes the current token stale."""

    def secrets(self) -> tuple[str, ...]:
        """The credential values in use, so they can be kept out of messages."""

    def check(self) -> None:
        """Read the credentials once, at start. Raises ``ConfigError`` naming the config key.

        A credential that cannot exist (an unset variable, a missing, unreadable or empty file)
        is a configuration error and stops start-up; an upstream that cannot be reached is not
        checked here (it is weather: retried, and shown by health).
        """


class WatchedFile:
    """A small file's text, re-read when its inode, size or modification time changes."""

    def __init__(self, path: str, what: str, key: str = "") -> None:
        self.path = path
        self._what = what
        #: The dotted config key that names the file (``backend.vault.token_file``).
        self.key = key
        self._signature: tuple[int, int, int] | None = None
        self._text = ""

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self) -> bool:
        """True if the file differs from what was last read (or cannot be read now)."""
        try:
            return self._stat() != self._signature
        except OSError:
            return False  # keep what was read; the next read() reports the error

    def read(self) -> str:
        """The stripped text, read afresh if the file changed. Raises ``CredentialError``."""
        try:
            signature = self._stat()
            if signature != self._signature:
                with open(self.path, encoding="utf-8") as fh:
                    text = fh.read().strip()
                self._text, self._signature = text, signature
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise CredentialError(
                f"The {self._what} file {self.path} cannot be read ({reason})."
            ) from None
        if not self._text:
            raise CredentialError(f"The {self._what} file {self.path} is empty.")
        return self._text

    def check(self) -> None:
        """Read the file now; raises ``ConfigError`` naming :attr:`key` if it cannot be read."""
        try:
            self.read()
        except CredentialError as exc:
            raise ConfigError(f"{self.key}: {exc.message}") from None


def grant_from_auth(response: Any, token: str | None = None) -> Grant:
    """A :class:`Grant` from a login or renewal answer's ``auth`` block.

    ``token`` is the token renewed (a renewal's answer may leave ``client_token`` out).
    """
    try:
        auth = response["auth"]
        ttl = float(auth.get("lease_duration") or 0) or None
        client_token = token or str(auth["client_token"])
        return Grant(client_token, ttl, bool(auth.get("renewable")), ttl)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UpstreamError("The key backend answered a login with no usable token.") from None


class StaticToken:
    """``auth_method = "token"``: a token from a file (re-read on change) or a variable.

    "Logging in" reads the token and asks ``lookup-self`` for its TTL, so a renewable token is
    renewed like any other; a token the upstream refuses is reported, not used blindly.
    """

    name = "token"
    mount = "token"

    def __init__(self, env: str, path: str) -> None:
        self._env = env
        self._file = (
            WatchedFile(path, "upstream token", "backend.vault.token_file") if path else None
        )
        self._token = ""

    def _read(self) -> str:
        if self._file is not None:
            return self._file.read()
        token = os.environ.get(self._env, "").strip()
        if not token:
            raise CredentialError(
                f"The environment variable {self._env} holding the upstream token is empty."
            )
        return token

    def login(self, send: Send) -> Grant:
        token = self._token = self._read()
        response = send("lookup-self", lambda c: c.auth.token.lookup_self(), token)
        try:
            data = response["data"]
            ttl = float(data.get("ttl") or 0) or None
            full = float(data.get("creation_ttl") or 0) or ttl
            renewable = bool(data.get("renewable"))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UpstreamError("The key backend answered lookup-self unexpectedly.") from None
        return Grant(token, ttl, renewable, full)

    def changed(self) -> bool:
        return self._file is not None and self._file.changed()

    def secrets(self) -> tuple[str, ...]:
        return (self._token,)

    def check(self) -> None:
        if self._file is not None:
            self._file.check()
        elif not os.environ.get(self._env, "").strip():
            raise ConfigError(
                f"backend.vault.token_env: the environment variable {self._env} holding the "
                "upstream token is not set or empty (set it, or set backend.vault.token_file)"
            )


class AppRoleLogin:
    """``auth_method = "approle"``: ``role_id`` and the secret ID in ``secret_id_file``."""

    name = "approle"

    def __init__(self, role_id: str, secret_id_path: str, mount: str) -> None:
        self._role_id = role_id
        self._secret_id = WatchedFile(
            secret_id_path, "AppRole secret ID", "backend.vault.secret_id_file"
        )
        self.mount = mount

    def login(self, send: Send) -> Grant:
        secret_id = self._secret_id.read()
        return grant_from_auth(
            send(
                "login",
                lambda c: c.auth.approle.login(
                    self._role_id, secret_id=secret_id, use_token=False, mount_point=self.mount
                ),
                "",
            )
        )

    def changed(self) -> bool:
        return False  # a new secret ID is used at the next login; the current token stays good

    def secrets(self) -> tuple[str, ...]:
        return (self._secret_id.read(),) if self._secret_id.path else ()

    def check(self) -> None:
        self._secret_id.check()


class JwtLogin:
    """``auth_method = "jwt"``: the JWT in ``jwt_file`` (re-read on change) for ``role``."""

    name = "jwt"

    def __init__(self, role: str, jwt_path: str, mount: str) -> None:
        self._role = role
        self._jwt = WatchedFile(jwt_path, "JWT", "backend.vault.jwt_file")
        self.mount = mount

    def login(self, send: Send) -> Grant:
        jwt = self._jwt.read()
        return grant_from_auth(
            send(
                "login",
                lambda c: c.auth.jwt.jwt_login(self._role, jwt, use_token=False, path=self.mount),
                "",
            )
        )

    def changed(self) -> bool:
        return False  # a rotated JWT is used at the next login

    def secrets(self) -> tuple[str, ...]:
        return (self._jwt.read(),) if self._jwt.path else ()

    def check(self) -> None:
        self._jwt.check()


def auth_method_for(
    config: VaultConfig, resolve_path: Callable[[str], str] = lambda p: p
) -> AuthMethod:
    """The :class:`AuthMethod` that ``config.auth_method`` names.

    Raises ``ConfigError`` as config loading does (:func:`~sidecar.config.check_auth_method`).
    """
    check_auth_method(config)
    if config.auth_method == "approle":
        return AppRoleLogin(
            config.role_id, resolve_path(config.secret_id_file), config.auth_mount or "approle"
        )
    if config.auth_method == "jwt":
        return JwtLogin(config.role, resolve_path(config.jwt_file), config.auth_mount or "jwt")
    return StaticToken(config.token_env, resolve_path(config.token_file))
