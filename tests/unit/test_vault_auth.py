"""The upstream token's life, with a scripted upstream and a hand-moved clock (no OpenBao)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.backends.vault_auth import Backoff, UpstreamAuth, UpstreamForbidden
from sidecar.backends.vault_logins import Grant, StaticToken
from sidecar.errors import UpstreamError, UpstreamUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedLogin:
    """An auth method whose logins hand out t1, t2, … or raise what ``failures`` holds."""

    name = "approle"
    mount = "approle"

    def __init__(self, ttl: float | None = 6.0) -> None:
        self.ttl = ttl
        self.logins = 0
        self.failures: list[Exception] = []

    def login(self, send: Any) -> Grant:
        if self.failures:
            raise self.failures.pop(0)
        self.logins += 1
        return Grant(f"t{self.logins}", self.ttl, True, self.ttl)

    def changed(self) -> bool:
        return False

    def secrets(self) -> tuple[str, ...]:
        return ("the-secret-id",)


class Upstream:
    """Answers ``renew-self`` and ``lookup-self`` from a script, recording every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.renew_ttls: list[float | Exception] = []
        self.lookup: Callable[[str], Any] = lambda token: {"data": {"ttl": 0}}

    def __call__(self, operation: str, call: Any, token: str) -> Any:
        self.calls.append((operation, token))
        if operation == "renew-self":
            answer = self.renew_ttls.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return {"auth": {"lease_duration": answer, "renewable": True}}
        if operation == "lookup-self":
            return self.lookup(token)
        raise AssertionError(operation)


def _auth(
    method: Any, upstream: Upstream, clock: Clock, backoff: Backoff | None = None
) -> UpstreamAuth:
    return UpstreamAuth(
        method,
        upstream,
        now=clock,
        backoff=backoff or Backoff(random=lambda: 1.0),
        background=False,
    )


def test_backoff_doubles_with_jitter_up_to_the_cap_and_resets() -> None:
    low = Backoff(base=1.0, cap=8.0, random=lambda: 0.0)
    assert [low.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    high = Backoff(base=1.0, cap=8.0, random=lambda: 1.0)
    assert [high.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    high.reset()
    assert high.next_delay() == 1.0


def test_renews_at_half_ttl_then_logs_in_again_at_max_ttl() -> None:
    clock, upstream, method = Clock(), Upstream(), ScriptedLogin(ttl=6.0)
    auth = _auth(method, upstream, clock)
    assert auth.token() == "t1" and auth.token() == "t1"  # one login, then reused
    assert auth.status()["next_action"] == "renew" and auth.status()["next_in_seconds"] == 3.0

    upstream.renew_ttls = [6.0, 6.0, 3.0]
    clock.now += 2.9
    assert auth.maintain_once() is None  # not yet due
    clock.now += 0.1
    assert auth.maintain_once() == "renew"
    clock.now += 3.0
    assert auth.maintain_once() == "renew"
    assert auth.token() == "t1"
    clock.now += 3.0
    assert auth.maintain_once() == "renew"  # only 3 s granted: the max TTL is near
    status = auth.status()
    assert status["renewals"] == 3 and status["next_action"] == "login", status
    clock.now += 1.5
    assert auth.maintain_once() == "login"
    assert auth.token() == "t2"
    assert [c[0] for c in upstream.calls] == ["renew-self"] * 3
    assert auth.status()["logins"] == 2 and auth.status()["state"] == "ok"


def test_refused_renewal_logs_in_again_at_once() -> None:
    clock, upstream, method = Clock(), Upstream(), ScriptedLogin()
    auth = _auth(method, upstream, clock)
    auth.token()
    upstream.renew_ttls = [UpstreamForbidden("no")]
    clock.now += 3
    assert auth.maintain_once() == "renew"
    assert auth.token() == "t2" and auth.status()["state"] == "ok"


def test_unreachable_renewal_keeps_the_token_and_retries_after_backoff() -> None:
    clock, upstream, method = Clock(), Upstream(), ScriptedLogin()
    auth = _auth(method, upstream, clock)
    auth.token()
    upstream.renew_ttls = [UpstreamUnavailable(), 6.0]
    clock.now += 3
    auth.maintain_once()
    status = auth.status()
    assert status["state"] == "failing" and status["next_action"] == "renew", status
    assert auth.token() == "t1"  # still valid: calls go on
    clock.now += status["next_in_seconds"]
    assert auth.maintain_once() == "renew"
    assert auth.status()["state"] == "ok" and auth.status()["renewals"] == 1


def test_a_failing_login_is_reported_backed_off_and_never_shows_the_secret() -> None:
    clock, upstream, method = Clock(), Upstream(), ScriptedLogin()
    method.failures = [UpstreamError("invalid secret the-secret-id"), UpstreamError("again")]
    auth = _auth(method, upstream, clock)
    with pytest.raises(UpstreamUnavailable, match="cannot authenticate"):
        auth.token()
    status = auth.status()
    assert status["state"] == "failing" and "the-secret-id" not in str(status), status
    assert "[redacted]" in status["last_error"]
    # Bad credentials are not retried on every request, only after the backoff.
    with pytest.raises(UpstreamUnavailable):
        auth.token()
    assert len(method.failures) == 1  # no second login was tried
    clock.now += status["next_in_seconds"]
    assert auth.maintain_once() == "login"  # fails again ("again"); the delay grows
    assert auth.status()["next_in_seconds"] > status["next_in_seconds"]
    clock.now += auth.status()["next_in_seconds"]
    assert auth.token() == "t1" and auth.status()["last_error"] is None


def test_an_unreachable_upstream_does_not_hold_back_the_next_request() -> None:
    clock, upstream, method = Clock(), Upstream(), ScriptedLogin()
    method.failures = [UpstreamUnavailable()]
    auth = _auth(method, upstream, clock)
    with pytest.raises(UpstreamUnavailable):
        auth.token()
    assert auth.token() == "t1"  # the next request tries again at once


def test_a_403_logs_in_again_only_when_the_token_is_dead() -> None:
    clock, upstream, method = Clock(), Upstream(), ScriptedLogin()
    auth = _auth(method, upstream, clock)
    assert auth.token() == "t1"
    assert auth.rejected("t1") is None  # lookup-self works: the policy said no
    assert method.logins == 1

    def dead(token: str) -> Any:
        raise UpstreamForbidden("permission denied")

    upstream.lookup = dead
    assert auth.rejected("t1") == "t2"
    assert auth.rejected("t1") == "t2"  # a second caller with the old token: no new login
    assert method.logins == 2


def test_static_token_file_change_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    upstream = Upstream()
    upstream.lookup = lambda token: {"data": {"ttl": 3600, "creation_ttl": 3600, "renewable": True}}
    auth = _auth(StaticToken("UNUSED", str(path)), upstream, Clock())
    assert auth.token() == "first-token"
    assert auth.status()["token_ttl"] == 3600 and auth.status()["method"] == "token"
    staged = tmp_path / "token.new"
    staged.write_text("second-token")
    os.replace(staged, path)
    assert auth.token() == "second-token"
    assert auth.status()["logins"] == 2
    assert [c for c in upstream.calls if c[0] == "lookup-self"] == [
        ("lookup-self", "first-token"),
        ("lookup-self", "second-token"),
    ]


def test_an_unreadable_token_file_is_reported_without_crashing(tmp_path: Path) -> None:
    auth = _auth(StaticToken("UNUSED", str(tmp_path / "missing")), Upstream(), Clock())
    with pytest.raises(UpstreamUnavailable):
        auth.token()
    assert "cannot be read" in auth.status()["last_error"]


# -- fail fast on configuration, retry on weather -------------------------------------------


def _vault_backend(**settings: Any) -> Any:
    from sidecar.backends.vault import VaultBackend
    from sidecar.config import VaultConfig

    # port 9 (discard) on loopback: nothing answers, and nothing must be asked at construction
    return VaultBackend(VaultConfig(addresses=("http://127.0.0.1:9",), **settings))


@pytest.mark.parametrize(
    ("settings", "key", "detail"),
    [
        (
            {"token_env": "KMS_TEST_NO_SUCH_TOKEN"},
            "backend.vault.token_env",
            "KMS_TEST_NO_SUCH_TOKEN",
        ),
        ({"token_file": "{tmp}/missing"}, "backend.vault.token_file", "cannot be read"),
        ({"token_file": "{tmp}"}, "backend.vault.token_file", "cannot be read"),  # a directory
        ({"token_file": "{tmp}/empty"}, "backend.vault.token_file", "is empty"),
        (
            {"auth_method": "approle", "role_id": "r", "secret_id_file": "{tmp}/missing"},
            "backend.vault.secret_id_file",
            "AppRole secret ID file",
        ),
        (
            {"auth_method": "jwt", "role": "r", "jwt_file": "{tmp}/missing"},
            "backend.vault.jwt_file",
            "JWT file",
        ),
    ],
)
def test_a_credential_that_cannot_exist_stops_start_up_naming_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    settings: dict[str, str],
    key: str,
    detail: str,
) -> None:
    from sidecar.errors import ConfigError

    monkeypatch.delenv("KMS_TEST_NO_SUCH_TOKEN", raising=False)
    (tmp_path / "empty").write_text("\n")
    settings = {k: v.replace("{tmp}", str(tmp_path)) for k, v in settings.items()}
    with pytest.raises(ConfigError) as raised:
        _vault_backend(**settings)
    message = str(raised.value)
    assert message.startswith(f"{key}: ") and detail in message, message


def test_an_empty_token_variable_acts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.errors import ConfigError

    monkeypatch.setenv("KMS_TEST_EMPTY_TOKEN", "  ")
    with pytest.raises(ConfigError, match=r"backend.vault.token_env: .*KMS_TEST_EMPTY_TOKEN"):
        _vault_backend(token_env="KMS_TEST_EMPTY_TOKEN")


def test_an_unreachable_upstream_does_not_stop_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    monkeypatch.setenv("KMS_TEST_SOME_TOKEN", "s.token")
    (tmp_path / "token").write_text("s.token\n")
    for settings in ({"token_env": "KMS_TEST_SOME_TOKEN"}, {"token_file": str(tmp_path / "token")}):
        backend = _vault_backend(**settings)
        assert backend.calls == {}, "nothing is asked upstream at construction"
        asyncio.run(backend.close())
