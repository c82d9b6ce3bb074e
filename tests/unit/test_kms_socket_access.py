"""The KMS v2 socket is held to the same rule as the main one: world-connectable only when every
allow rule tells callers apart."""

from __future__ import annotations

import pytest

from sidecar.config import config_from_mapping
from sidecar.errors import ConfigError
from sidecar.policy import parse_policy_text
from sidecar.server.socket_access import check_config_sockets

OPEN_RULE = '[[allow]]\nname = "anyone"\nwhen = {}\nkeys = ["etcd"]\noperations = ["decrypt"]\n'
UID_RULE = '[[allow]]\nname = "apiserver"\nwhen.unix_uid = [0]\nkeys = ["etcd"]\noperations = ["decrypt"]\n'


def config(kms_mode: str) -> object:
    return config_from_mapping(
        {"keys": {"etcd": {}}, "kms_v2": {"key": "etcd", "socket_mode": kms_mode}}
    )


def test_a_world_connectable_kms_socket_refuses_a_rule_anyone_meets() -> None:
    with pytest.raises(ConfigError, match=r"^kms_v2\.socket_mode: 0666 lets every local user"):
        check_config_sockets(config("0666"), parse_policy_text(OPEN_RULE))  # type: ignore[arg-type]
    check_config_sockets(config("0666"), parse_policy_text(UID_RULE))  # type: ignore[arg-type]
    check_config_sockets(config("0600"), parse_policy_text(OPEN_RULE))  # type: ignore[arg-type]
