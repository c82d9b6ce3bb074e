"""`kms-sidecar policy check` explains a decision and exits 0 (allow) or 1 (deny)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.cli import main

POLICY = """
[[allow]]
name = "payments-api"
when.unix_uid = [1000]
keys = ["payments"]
operations = ["datakey", "decrypt"]
context.tenant = "{unix_uid}"

[[deny]]
name = "no-root"
when.unix_uid = [0]
keys = ["*"]
operations = ["*"]
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "main.toml").write_text(POLICY)
    path = tmp_path / "sidecar.toml"
    path.write_text('[policies]\ndir = "policies"\n[keys.payments]\n')
    return path


def check(config: Path, *args: str) -> int:
    return main(["policy", "check", "--config", str(config), *args])


def test_allowed_names_the_rule(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = check(
        config, "--uid", "1000", "--key", "payments", "--op", "datakey", "--context", "tenant=1000"
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("Allowed") and "payments-api" in out and "main.toml" in out


def test_deny_rule_is_named(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(config, "--uid", "0", "--key", "payments", "--op", "datakey") == 1
    assert "no-root" in capsys.readouterr().out


def test_default_deny_says_why(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = check(
        config, "--uid", "1000", "--key", "payments", "--op", "datakey", "--context", "tenant=7"
    )
    assert code == 1
    out = capsys.readouterr().out
    assert out.startswith("Denied") and "deny by default" in out


def test_bad_context_argument_is_a_usage_error(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        check(config, "--uid", "1000", "--key", "payments", "--op", "datakey", "--context", "oops")
        == 2
    )
    assert "NAME=VALUE" in capsys.readouterr().err
