"""The sidecar's own token for Vault/OpenBao, kept alive the way Vault Agent's auto-auth does.

The three ways to get a token (``backend.vault.auth_method``) are the ``AuthMethod`` classes
of :mod:`sidecar.backends.vault_logins`.

:class:`UpstreamAuth` owns the token. It renews it (``renew-self``) at half its TTL, logs in
again when renewal is refused, when renewal no longer extends the TTL (the token reached its
max TTL) and when the upstream refuses a call with a token that ``lookup-self`` then confirms is
dead. Failures never raise out of the background thread: they show in :meth:`UpstreamAuth.status`
and are retried after :class:`Backoff`. hvac blocks, so everything here runs in the backend's
worker threads or in this module's one ``vault-auth`` thread, never on the event loop.

At construction the backend calls :meth:`AuthMethod.check`: a credential that cannot exist (an
unset token variable, a missing, unreadable or empty file) is a ``ConfigError`` naming its key and
stops start-up. An upstream that cannot be reached is weather, not configuration: start-up goes on
and health says why the sidecar is not ready.

Tokens, secret IDs and JWTs are never logged and never appear in status or errors.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from sidecar.backends.vault_logins import (
    AuthMethod,
    Send,
    grant_from_auth,
)
from sidecar.errors import SidecarError, UpstreamError, UpstreamUnavailable

log = logging.getLogger(__name__)

#: First retry delay after an auth failure, in seconds; doubles per failure up to the cap.
BACKOFF_BASE = 0.5
#: Longest delay between auth retries, in seconds.
BACKOFF_CAP = 30.0
#: Never schedule the next renewal or login sooner than this, in seconds (a TTL near zero
#: must not turn the background thread into a busy loop).
MIN_INTERVAL = 0.5


class UpstreamForbidden(UpstreamError):
    """The upstream answered 403: the token is dead, or its policy does not allow the call."""


class Backoff:
    """Capped exponential backoff with jitter, the one used for every auth retry.

    The n-th consecutive failure waits between d/2 and d seconds, d = min(cap, base * 2**n), so
    retries spread out and never hit zero. ``reset`` after a success.
    """

    def __init__(
        self,
        base: float = BACKOFF_BASE,
        cap: float = BACKOFF_CAP,
        random: Callable[[], float] = random.random,
    ) -> None:
        self._base = base
        self._cap = cap
        self._random = random
        self.failures = 0

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt; counts one more failure."""
        ceiling = min(self._cap, self._base * 2.0 ** min(self.failures, 62))
        self.failures += 1
        return ceiling / 2 + self._random() * ceiling / 2

    def reset(self) -> None:
        self.failures = 0


_AUTH_FAILING = (
    "The sidecar cannot authenticate to the key backend; see /v1/sidecar/status for why."
)


class UpstreamAuth:
    """The current upstream token, renewed and replaced in the background. Thread-safe.

    ``send`` runs upstream calls (see :data:`Send`); ``now`` (monotonic seconds) and
    ``backoff`` are injectable for tests, and ``background=False`` leaves scheduled renewals to
    explicit :meth:`maintain_once` calls. Call :meth:`close` to stop the background thread.
    """

    def __init__(
        self,
        method: AuthMethod,
        send: Send,
        *,
        now: Callable[[], float] = time.monotonic,
        backoff: Backoff | None = None,
        background: bool = True,
    ) -> None:
        self._method = method
        self._background = background
        self._send = send
        self._now = now
        self._backoff = backoff or Backoff()
        # One lock (inside the condition) guards every field below. Network calls never run
        # while holding it: a thread marks itself ``_busy`` instead, and others wait or use
        # the token that still works.
        self._cond = threading.Condition()
        self._token: str | None = None
        self._expires_at: float | None = None
        self._full_ttl: float | None = None
        self._renewable = False
        self._busy = False
        self._next_action: str | None = None
        self._due_at: float | None = None
        #: Until when on-demand logins are refused after the credentials themselves failed.
        self._hold_until = 0.0
        self._unreachable = False
        self._state = "starting"
        self._last_error: str | None = None
        self._renewals = 0
        self._logins = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- used by the backend's worker threads --------------------------------------------------

    def token(self) -> str:
        """A token to call with, logging in first if there is none. Blocks; never on the loop.

        Raises ``UpstreamUnavailable`` when no token can be had now.
        """
        with self._cond:
            self._start_thread()
            while True:
                if self._closed:
                    raise UpstreamUnavailable("The sidecar is shutting down.")
                usable = self._usable()
                if usable is not None and (self._busy or not self._method.changed()):
                    return usable  # (while busy, a replacement is on its way; this one works)
                if self._busy:
                    self._cond.wait()
                    continue
                if usable is None and self._now() < self._hold_until and not self._method.changed():
                    raise UpstreamUnavailable(_AUTH_FAILING)
                self._busy = True
                break
        try:
            return self._obtain("the credentials changed" if usable else "no token yet")
        except UpstreamUnavailable:
            if usable is not None:
                return usable  # the new credentials failed; the old token still works
            raise

    def rejected(self, token: str) -> str | None:
        """The upstream refused a call made with ``token`` (403). Blocks; never on the loop.

        Returns a token to retry the call with (a new login if ``lookup-self`` shows ``token``
        is dead), or ``None`` when ``token`` is alive, so the refusal is the token's policy.
        Raises ``UpstreamUnavailable`` if no new token can be had.
        """
        with self._cond:
            while self._busy:
                self._cond.wait()
            current = self._usable()
            if current is not None and current != token:
                return current
        try:
            self._send("lookup-self", lambda c: c.auth.token.lookup_self(), token)
        except UpstreamUnavailable:
            raise
        except UpstreamError:
            pass  # the token itself is dead: expired, revoked or unknown
        else:
            return None
        with self._cond:
            while self._busy:
                self._cond.wait()
            current = self._usable()
            if current is not None and current != token:
                return current
            if self._token == token:
                self._token = None
            self._busy = True
        return self._obtain("the upstream refused the token")

    def upstream_answered(self) -> None:
        """A node answered after an outage: retry a renewal or login that failed for want of one."""
        with self._cond:
            if self._unreachable and self._due_at is not None:
                self._due_at = min(self._due_at, self._now())
                self._hold_until = 0.0
                self._cond.notify_all()

    def status(self) -> dict[str, Any]:
        """Method, state, TTL left and counters; never the token."""
        with self._cond:
            now = self._now()
            return {
                "method": self._method.name,
                "mount": self._method.mount,
                "state": self._state,
                "token_ttl": None
                if self._expires_at is None or self._token is None
                else round(max(0.0, self._expires_at - now), 1),
                "renewable": self._renewable,
                "renewals": self._renewals,
                "logins": self._logins,
                "next_action": self._next_action,
                "next_in_seconds": None
                if self._due_at is None
                else round(max(0.0, self._due_at - now), 1),
                "last_error": self._last_error,
            }

    def close(self, timeout: float = 2.0) -> None:
        """Stop the background thread (waiting up to ``timeout`` s for a call in flight)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- internals ------------------------------------------------------------------------------

    def _usable(self) -> str | None:
        """The current token if it has not expired. Lock held."""
        if self._token is None:
            return None
        if self._expires_at is not None and self._now() >= self._expires_at:
            return None
        return self._token

    def _start_thread(self) -> None:
        """Lock held."""
        if self._background and self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._maintain, name="vault-auth", daemon=True)
            self._thread.start()

    def _obtain(self, reason: str) -> str:
        """Log in; the caller has set ``_busy``. Returns the token or raises UpstreamUnavailable."""
        try:
            grant = self._method.login(self._send)
        except SidecarError as exc:
            self._failed("login", exc)
            if isinstance(exc, UpstreamUnavailable):
                raise UpstreamUnavailable() from None
            raise UpstreamUnavailable(_AUTH_FAILING) from None
        except BaseException:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            raise
        with self._cond:
            self._logins += 1
            self._apply(grant.token, grant.ttl, grant.renewable, grant.full_ttl)
        log.info(
            "upstream auth (%s): new token because %s; TTL %s, %s",
            self._method.name,
            reason,
            "none" if grant.ttl is None else f"{grant.ttl:.0f}s",
            "renewable" if grant.renewable else "not renewable",
        )
        return grant.token

    def _renew(self, token: str) -> None:
        """Renew ``token``; the caller has set ``_busy``. Logs in instead if renewal is refused."""
        try:
            response = self._send("renew-self", lambda c: c.auth.token.renew_self(), token)
        except UpstreamUnavailable as exc:
            self._failed("renew", exc)
            return
        except UpstreamError:
            log.info("upstream auth (%s): renewal refused; logging in again", self._method.name)
            self._obtain("renewal was refused")
            return
        grant = grant_from_auth(response, token)
        with self._cond:
            self._renewals += 1
            capped = (
                grant.ttl is not None and self._full_ttl is not None and grant.ttl < self._full_ttl
            )
            self._apply(token, grant.ttl, grant.renewable and not capped, self._full_ttl)
        if capped:
            log.info(
                "upstream auth (%s): token at its max TTL (%.0fs left); will log in again",
                self._method.name,
                grant.ttl,
            )

    def _apply(self, token: str, ttl: float | None, renewable: bool, full: float | None) -> None:
        """Install a token and schedule what comes next. Lock held; ends ``_busy``."""
        now = self._now()
        self._token = token
        self._expires_at = None if ttl is None else now + ttl
        self._full_ttl = full
        self._renewable = renewable
        if ttl is None:
            self._next_action, self._due_at = None, None
        else:
            self._next_action = "renew" if renewable else "login"
            self._due_at = now + max(ttl / 2, MIN_INTERVAL)
        self._state = "ok"
        self._last_error = None
        self._unreachable = False
        self._hold_until = 0.0
        self._backoff.reset()
        self._busy = False
        self._cond.notify_all()

    def _failed(self, action: str, exc: SidecarError) -> None:
        """Record a failed renewal or login and schedule its retry. Ends ``_busy``."""
        message = exc.message
        for secret in self._secrets():
            if secret:
                message = message.replace(secret, "[redacted]")
        with self._cond:
            delay = self._backoff.next_delay()
            now = self._now()
            self._state = "failing"
            self._last_error = f"{action}: {message}"
            self._unreachable = isinstance(exc, UpstreamUnavailable)
            self._hold_until = 0.0 if self._unreachable else now + delay
            if self._usable() is None or self._next_action is None:
                self._next_action = "login"
            self._due_at = now + delay
            self._busy = False
            self._cond.notify_all()
        log.warning(
            "upstream auth (%s): %s failed: %s; retrying in %.1fs",
            self._method.name,
            action,
            message,
            delay,
        )

    def _secrets(self) -> tuple[str, ...]:
        try:
            return (*self._method.secrets(), self._token or "")
        except SidecarError:
            return (self._token or "",)

    def maintain_once(self) -> str | None:
        """Renew or log in if that is due now: ``"renew"``, ``"login"`` or None. Never raises.

        The ``vault-auth`` thread calls this when the next action falls due; with
        ``background=False`` a test calls it instead.
        """
        with self._cond:
            if self._closed or self._busy or self._due_at is None or self._due_at > self._now():
                return None
            renew = self._next_action == "renew" and self._usable() is not None
            token = self._token
            self._busy = True
        try:
            if renew and token is not None:
                self._renew(token)
            else:
                self._obtain("the token is due for replacement")
        except UpstreamUnavailable:
            pass  # recorded by _failed; retried after the backoff
        except Exception as exc:  # a bug must not end renewals: report it and back off
            log.exception("upstream auth (%s): unexpected failure", self._method.name)
            self._failed("renew" if renew else "login", UpstreamError(type(exc).__name__))
        return "renew" if renew else "login"

    def _maintain(self) -> None:
        """The ``vault-auth`` thread: wait until something is due, do it; until closed."""
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = self._now()
                    if not self._busy and self._due_at is not None and self._due_at <= now:
                        break
                    wait = None if self._busy or self._due_at is None else self._due_at - now
                    self._cond.wait(wait)
            self.maintain_once()
