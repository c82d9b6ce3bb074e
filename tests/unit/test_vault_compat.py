"""Pieces of Vault compatibility that need no server: the LIST rewrite, what a caller may see."""

from __future__ import annotations

import os

import pytest

from sidecar.errors import InvalidRequest
from sidecar.identity import Identity, PeerCredentials
from sidecar.policy import PolicySet, parse_policy_text
from sidecar.policy.introspection import rules_for, visible_keys
from sidecar.server.key_version import check_key_version
from sidecar.server.list_verb import as_get_list


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            b"LIST /v1/transit/keys HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/transit/keys?list=true HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            b"LIST /v1/transit/keys?a=b HTTP/1.1\r\n\r\n",
            b"GET /v1/transit/keys?a=b&list=true HTTP/1.1\r\n\r\n",
        ),
        (b"LIST /v1/transit/keys", b"LIST /v1/transit/keys"),  # the line is not whole yet
        (b"LIST /a b HTTP/1.1\r\n\r\n", b"LIST /a b HTTP/1.1\r\n\r\n"),  # not three words
    ],
)
def test_the_list_verb_becomes_get_list_true(raw: bytes, expected: bytes) -> None:
    assert as_get_list(raw) == expected


UID = os.getuid()
POLICY = f"""
[[allow]]
name = "mine"
when.unix_uid = [{UID}]
keys = ["payments", "orders"]
operations = ["datakey", "decrypt"]

[[allow]]
name = "stats"
when.unix_uid = [{UID}]
keys = ["*"]
operations = ["status", "list"]

[[deny]]
name = "orders-frozen"
when.unix_uid = [{UID}]
keys = ["orders"]
operations = ["datakey", "decrypt"]

[[allow]]
name = "someone-else"
when.unix_uid = [{UID + 1}]
keys = ["*"]
operations = ["*"]
"""


def test_a_caller_sees_the_keys_it_may_use_and_the_rules_that_hold() -> None:
    policies = PolicySet(parse_policy_text(POLICY))
    me = Identity(peer=PeerCredentials(uid=UID, gid=UID, pid=1))
    assert visible_keys(policies, me, ["orders", "payments", "reports"]) == ["payments"]
    assert [r.name for r in rules_for(policies, me)] == ["mine", "stats", "orders-frozen"]
    assert visible_keys(policies, Identity(), ["payments"]) == []


def test_key_version_other_than_the_latest_is_refused() -> None:
    check_key_version(None, 3)
    check_key_version(3, 3)
    for version, words in ((4, "higher"), (2, r"latest version \(3\) only")):
        with pytest.raises(InvalidRequest, match=words):
            check_key_version(version, 3)
    with pytest.raises(InvalidRequest) as refused:  # a caller's huge number is not echoed whole
        check_key_version(10**300, 3)
    assert "higher" in refused.value.message and len(refused.value.message) < 120
