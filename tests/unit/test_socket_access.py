"""A world-connectable socket: accepted, and refused only with a rule any local user satisfies."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from sidecar.cli import main
from sidecar.config import config_from_mapping
from sidecar.errors import ConfigError
from sidecar.policy import PolicySet, parse_policy_text
from sidecar.policy.authorizer import PolicyAuthorizer
from sidecar.server.socket_access import check_socket_access, describe_socket_access

UID = os.getuid()
BY_UID = f'[[allow]]\nname = "by-uid"\nwhen.unix_uid = [{UID}]\nkeys = ["*"]\noperations = ["*"]\n'
ANYONE = '[[allow]]\nname = "anyone"\nwhen = {}\nkeys = ["payments"]\noperations = ["datakey"]\n'
BY_EXE = (
    '[[allow]]\nname = "by-exe"\nwhen.unix_exe = "/usr/bin/app"\nkeys = ["*"]\n'
    'operations = ["datakey"]\n'
)
DENY_ALL = '[[deny]]\nname = "nobody"\nkeys = ["*"]\noperations = ["rotate"]\n'


@pytest.mark.parametrize("mode", ["0666", "0777", "666"])
def test_world_connectable_modes_are_accepted(mode: str) -> None:
    assert config_from_mapping({"server": {"socket_mode": mode}}).server.socket_mode_bits & 0o006


@pytest.mark.parametrize("text", [BY_UID, BY_UID + DENY_ALL])
def test_rules_that_tell_callers_apart_pass(text: str) -> None:
    check_socket_access(0o666, parse_policy_text(text))


@pytest.mark.parametrize(("text", "rule"), [(ANYONE, "anyone"), (BY_UID + BY_EXE, "by-exe")])
def test_a_rule_any_local_user_satisfies_is_refused_on_a_world_socket(text: str, rule: str) -> None:
    rules = parse_policy_text(text, path="p.toml")
    with pytest.raises(ConfigError, match=f"server.socket_mode: 0666 .* rule '{rule}' \\(p.toml:"):
        check_socket_access(0o666, rules)
    check_socket_access(0o660, rules)  # only group members connect: the group is the condition


def test_the_start_log_says_who_tells_callers_apart() -> None:
    assert "peer credentials" in describe_socket_access(0o666, "")
    assert "every local user" not in describe_socket_access(0o660, "workloads")
    assert "'workloads'" in describe_socket_access(0o660, "workloads")


def test_check_config_and_reload_refuse_an_open_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.toml").write_text(ANYONE)
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f'[server]\nsocket = "{tmp_path}/s.sock"\nsocket_mode = "0666"\n'
        '[backend.vault]\naddresses = ["http://127.0.0.1:1"]\n[keys.payments]\n'
    )
    assert main(["check-config", "--config", str(config)]) == 2
    assert "rule 'anyone'" in capsys.readouterr().err

    (policies / "p.toml").write_text(BY_UID)

    def check(policy_set: PolicySet) -> None:
        check_socket_access(0o666, policy_set.rules)

    authorizer = PolicyAuthorizer(str(policies), check=check)
    (policies / "p.toml").write_text(ANYONE)
    asyncio.run(authorizer.reload())  # the open rule is refused on SIGHUP too
    assert authorizer.policies.rule("by-uid") is not None, "the previous rules stay"
