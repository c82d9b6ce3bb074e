"""Policy decisions, table-driven: deny wins, deny by default, every ``when`` key,
globs, context bindings, max_ttl, rate limits with an injected clock, and explanations."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import pytest

from sidecar.errors import InvalidRequest, PermissionDenied, RateLimited
from sidecar.identity import Identity, JwtClaims, PeerCredentials, TlsPeer
from sidecar.policy import PolicySet, explain, parse_policy_text, permission_denied

ISSUER = "https://issuer.example"

POLICY = """
[[allow]]
name = "app"
when.unix_uid = [1000]
keys = ["payments", "payments-*"]
operations = ["datakey", "decrypt"]

[[deny]]
name = "no-root"
when.unix_uid = [0]
keys = ["*"]
operations = ["*"]

[[allow]]
name = "root-and-app-encrypt"
when.unix_uid = [0, 1000]
keys = ["payments"]
operations = ["encrypt"]

[[allow]]
name = "group"
when.unix_gid = [2000]
keys = ["group-key"]
operations = ["read"]

[[allow]]
name = "exe"
when.unix_exe = ["/usr/bin/worker", "/opt/app/*/bin/run"]
keys = ["exe-key"]
operations = ["sign"]

[[allow]]
name = "jwt"
when.jwt_iss = "https://issuer.example"
when.jwt_sub = ["svc-a", "svc-b"]
keys = ["jwt-key"]
operations = ["datakey"]

[[allow]]
name = "claims"
when.jwt_claims.team = ["blue", "green"]
when.jwt_claims."kubernetes.io".namespace = "prod"
keys = ["claims-key"]
operations = ["decrypt"]

[[allow]]
name = "spiffe"
when.spiffe_id = "spiffe://example.org/ns/prod/sa/*"
keys = ["mesh-key"]
operations = ["decrypt"]

[[allow]]
name = "tenant"
when.jwt_iss = "https://issuer.example"
keys = ["tenant-data"]
operations = ["datakey", "decrypt"]
context.tenant = "{jwt.claims.tenant}"
context.env = "prod"

[[allow]]
name = "namespace"
when = {}
keys = ["ns-data"]
operations = ["decrypt"]
context.ns = "{jwt.claims.kubernetes.io.namespace}"
context.owner = "uid-{unix_uid}"

[[allow]]
name = "ephemeral"
when.unix_uid = [1000]
keys = ["ephemeral"]
operations = ["datakey", "datakey-wrapped", "decrypt"]
max_ttl = "10m"

[[allow]]
name = "status"
when.unix_uid = [1000]
keys = ["*"]
operations = ["status"]

[[deny]]
name = "no-rotate-for-jwt"
when.jwt_iss = "https://issuer.example"
keys = ["*"]
operations = ["rotate"]

[[allow]]
name = "rotate"
when.jwt_sub = "svc-a"
keys = ["jwt-key"]
operations = ["rotate"]

[[deny]]
name = "no-payments-for-svc-z"
when.jwt_sub = "svc-z"
keys = ["payments"]
operations = ["datakey"]
"""


@pytest.fixture(scope="module")
def policy() -> PolicySet:
    return PolicySet(parse_policy_text(POLICY, path="test.toml"))


def unix(uid: int = 1000, gid: int = 1000, exe: str | None = "/usr/bin/app") -> Identity:
    return Identity(peer=PeerCredentials(uid=uid, gid=gid, pid=4242, exe=exe))


def with_jwt(
    subject: str = "svc-a",
    issuer: str = ISSUER,
    claims: Mapping[str, Any] | None = None,
    uid: int = 1000,
) -> Identity:
    body = {"iss": issuer, "sub": subject, **(claims or {})}
    return Identity(
        peer=PeerCredentials(uid=uid, gid=uid, pid=4242, exe="/usr/bin/app"),
        jwt=JwtClaims(issuer=issuer, subject=subject, claims=MappingProxyType(body)),
    )


def mesh(spiffe_id: str | None) -> Identity:
    return Identity(tls=TlsPeer(spiffe_id=spiffe_id, subject="CN=workload"))


K8S = {"kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "api"}}}


class Case(NamedTuple):
    id: str
    identity: Identity
    key: str | None
    operation: str
    allowed: bool
    rule: str | None
    context: Mapping[str, str] | None = None
    ttl: float | None = None


# fmt: off
CASES = [
    # default deny and deny-wins
    Case("listed uid, listed key", unix(), "payments", "datakey", True, "app"),
    Case("glob key", unix(), "payments-eu", "decrypt", True, "app"),
    Case("glob needs its prefix", unix(), "xpayments-eu", "decrypt", False, None),
    Case("glob does not add a suffix", unix(), "payments2", "decrypt", False, None),
    Case("operation not listed", unix(), "payments", "rotate", False, None),
    Case("other uid: default deny", unix(uid=1001), "payments", "datakey", False, None),
    Case("unknown key: default deny", unix(), "no-such-key", "datakey", False, None),
    Case("no identity at all", Identity(), "payments", "datakey", False, None),
    Case("deny wins over a later allow", unix(uid=0), "payments", "encrypt", False, "no-root"),
    Case("the same allow for another uid", unix(), "payments", "encrypt", True,
         "root-and-app-encrypt"),
    Case("deny wins over a later allow", with_jwt("svc-a"), "jwt-key", "rotate", False,
         "no-rotate-for-jwt"),
    Case("deny wins over an earlier allow", with_jwt("svc-z"), "payments", "datakey", False,
         "no-payments-for-svc-z"),
    Case("that deny spares other subjects", with_jwt("svc-y"), "payments", "datakey", True,
         "app"),
    Case("unknown operation", unix(), "payments", "explode", False, None),
    Case("newline never matches a wildcard", unix(), "payments-eu\nx", "decrypt", False, None),
    # unix_gid
    Case("gid listed", unix(uid=5, gid=2000), "group-key", "read", True, "group"),
    Case("gid not listed", unix(uid=5, gid=2001), "group-key", "read", False, None),
    # unix_exe
    Case("exe exact", unix(exe="/usr/bin/worker"), "exe-key", "sign", True, "exe"),
    Case("exe glob within a segment", unix(exe="/opt/app/v2/bin/run"), "exe-key", "sign", True,
         "exe"),
    Case("exe glob does not cross '/'", unix(exe="/opt/app/v2/evil/bin/run"), "exe-key", "sign",
         False, None),
    Case("exe unknown (pid reused)", unix(exe=None), "exe-key", "sign", False, None),
    # jwt_iss / jwt_sub
    Case("jwt sub listed", with_jwt("svc-b"), "jwt-key", "datakey", True, "jwt"),
    Case("jwt sub not listed", with_jwt("svc-c"), "jwt-key", "datakey", False, None),
    Case("jwt other issuer", with_jwt("svc-a", issuer="https://evil"), "jwt-key", "datakey",
         False, None),
    Case("no jwt: condition on a missing fact", unix(), "jwt-key", "datakey", False, None),
    # jwt_claims, including a nested claim under a dotted name
    Case("claims match", with_jwt(claims={"team": "blue", **K8S}), "claims-key", "decrypt", True,
         "claims"),
    Case("list claim intersects", with_jwt(claims={"team": ["red", "green"], **K8S}),
         "claims-key", "decrypt", True, "claims"),
    Case("claim value not listed", with_jwt(claims={"team": "red", **K8S}), "claims-key",
         "decrypt", False, None),
    Case("nested claim differs",
         with_jwt(claims={"team": "blue", "kubernetes.io": {"namespace": "dev"}}),
         "claims-key", "decrypt", False, None),
    Case("claim missing", with_jwt(claims={"team": "blue"}), "claims-key", "decrypt", False, None),
    Case("claim not a string", with_jwt(claims={"team": 1, **K8S}), "claims-key", "decrypt",
         False, None),
    # spiffe_id
    Case("spiffe glob", mesh("spiffe://example.org/ns/prod/sa/api"), "mesh-key", "decrypt", True,
         "spiffe"),
    Case("spiffe glob stays in its segment", mesh("spiffe://example.org/ns/prod/sa/api/x"),
         "mesh-key", "decrypt", False, None),
    Case("spiffe other namespace", mesh("spiffe://example.org/ns/dev/sa/api"), "mesh-key",
         "decrypt", False, None),
    Case("certificate without SPIFFE ID", mesh(None), "mesh-key", "decrypt", False, None),
    # context bindings
    Case("context bound to a claim", with_jwt(claims={"tenant": "acme"}), "tenant-data",
         "datakey", True, "tenant", {"tenant": "acme", "env": "prod", "extra": "ok"}),
    Case("context names another tenant", with_jwt(claims={"tenant": "acme"}), "tenant-data",
         "datakey", False, None, {"tenant": "globex", "env": "prod"}),
    Case("literal context differs", with_jwt(claims={"tenant": "acme"}), "tenant-data",
         "datakey", False, None, {"tenant": "acme", "env": "dev"}),
    Case("context entry missing", with_jwt(claims={"tenant": "acme"}), "tenant-data", "datakey",
         False, None, {"env": "prod"}),
    Case("no context at all", with_jwt(claims={"tenant": "acme"}), "tenant-data", "datakey",
         False, None, None),
    Case("claim missing: the binding cannot hold", with_jwt(), "tenant-data", "datakey", False,
         None, {"tenant": "", "env": "prod"}),
    Case("template from nested claim and uid", with_jwt(claims=K8S), "ns-data", "decrypt", True,
         "namespace", {"ns": "prod", "owner": "uid-1000"}),
    Case("template with another uid", with_jwt(claims=K8S, uid=7), "ns-data", "decrypt", False,
         None, {"ns": "prod", "owner": "uid-1000"}),
    Case("template needs a JWT", unix(), "ns-data", "decrypt", False, None,
         {"ns": "prod", "owner": "uid-1000"}),
    # max_ttl
    Case("ttl within max", unix(), "ephemeral", "datakey", True, "ephemeral", None, 600.0),
    Case("ttl above max", unix(), "ephemeral", "datakey", False, None, None, 601.0),
    Case("no ttl when a max is set", unix(), "ephemeral", "datakey-wrapped", False, None),
    Case("max_ttl does not bound decrypt", unix(), "ephemeral", "decrypt", True, "ephemeral"),
    # keyless operations
    Case("status needs a '*' rule", unix(), None, "status", True, "status"),
    Case("status for another uid", unix(uid=1001), None, "status", False, None),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decision(policy: PolicySet, case: Case) -> None:
    decision = policy.decide(
        case.identity,
        key=case.key,
        operation=case.operation,
        context=case.context,
        ttl=case.ttl,
        now=0.0,
    )
    assert (decision.allowed, decision.rule) == (case.allowed, case.rule), decision.reason


def test_an_empty_set_denies_everything() -> None:
    empty = PolicySet([])
    assert len(empty) == 0
    decision = empty.decide(unix(), key="payments", operation="datakey")
    assert not decision.allowed
    assert "no policies are loaded" in decision.reason


def test_unknown_key_is_denied_exactly_like_a_forbidden_one(policy: PolicySet) -> None:
    with pytest.raises(PermissionDenied) as forbidden:
        policy.authorize(unix(uid=1001), key="payments", operation="datakey")
    with pytest.raises(PermissionDenied) as unknown:
        policy.authorize(unix(uid=1001), key="ghost", operation="datakey")
    assert forbidden.value.message.replace("'payments'", "K") == unknown.value.message.replace(
        "'ghost'", "K"
    )
    # The server uses the same helper for a key the policy allows but the config lacks.
    assert permission_denied("datakey", "ghost").message == unknown.value.message
    assert "no such key exists" in unknown.value.message


def test_authorize_returns_the_deciding_rule(policy: PolicySet) -> None:
    assert policy.authorize(unix(), key="payments", operation="datakey").rule == "app"


def test_too_long_ttl_says_so(policy: PolicySet) -> None:
    decision = policy.decide(unix(), key="ephemeral", operation="datakey", ttl=3600.0)
    assert decision.max_ttl == 600.0
    # The caller may use the key, so the field is at fault: a 400 naming it, not a 403.
    with pytest.raises(InvalidRequest, match="Field 'ttl' exceeds the maximum of 10m"):
        policy.authorize(unix(), key="ephemeral", operation="datakey", ttl=3600.0)
    with pytest.raises(InvalidRequest, match=r"Field 'ttl' is required.*at most 10m"):
        policy.authorize(unix(), key="ephemeral", operation="datakey-wrapped")
    # Another caller is not told about a rule that would not apply to it anyway.
    with pytest.raises(PermissionDenied) as other:
        policy.authorize(unix(uid=1001), key="ephemeral", operation="datakey", ttl=3600.0)
    assert "ttl" not in other.value.message


RATE_POLICY = """
[[allow]]
name = "limited"
when.unix_uid = [1000, 1001]
keys = ["payments"]
operations = ["datakey"]
rate = "2/s"

[[allow]]
name = "per-minute"
when.unix_uid = [1000]
keys = ["slow"]
operations = ["datakey"]
rate = "60/m"
"""


def test_rate_limit_per_rule_and_caller_with_an_injected_clock() -> None:
    policy = PolicySet(parse_policy_text(RATE_POLICY, path="rate.toml"))
    app, other = unix(1000), unix(1001)

    def allowed(identity: Identity, now: float, key: str = "payments") -> bool:
        return policy.decide(identity, key=key, operation="datakey", now=now).allowed

    assert allowed(app, 100.0) and allowed(app, 100.0)  # the burst is one second's worth
    limited = policy.decide(app, key="payments", operation="datakey", now=100.0)
    assert not limited.allowed and limited.rule == "limited"
    assert limited.retry_after == pytest.approx(0.5)
    with pytest.raises(RateLimited) as raised:
        policy.authorize(app, key="payments", operation="datakey", now=100.25)
    assert raised.value.retry_after == pytest.approx(0.25)
    assert allowed(other, 100.25)  # each caller has its own bucket
    assert allowed(app, 100.5)  # refilled at 2 per second
    assert not allowed(app, 100.5)
    assert allowed(app, 200.0) and allowed(app, 200.0) and not allowed(app, 200.0)
    # Another rule has its own bucket for the same caller.
    assert allowed(app, 200.0, key="slow")


def test_explain_names_the_deciding_rule_and_its_source(policy: PolicySet) -> None:
    decision, text = explain(policy, unix(), "payments", "datakey", None)
    assert decision.allowed
    assert text.startswith("Allowed: rule 'app' (test.toml:")
    assert "uid 1000" in text

    decision, text = explain(policy, unix(uid=0), "payments", "encrypt", None)
    assert not decision.allowed
    assert "deny rule 'no-root' (test.toml:" in text

    decision, text = explain(policy, unix(uid=1001), "payments", "datakey", None)
    assert not decision.allowed and decision.rule is None
    assert "deny by default" in text
    assert "'app' (test.toml:" in text and "uid 1001 is not in [1000]" in text

    _, text = explain(
        policy, with_jwt(claims={"tenant": "acme"}), "tenant-data", "datakey", {"tenant": "x"}
    )
    assert "encryption_context.tenant is not 'acme'" in text

    _, text = explain(policy, unix(), "ephemeral", "datakey", None, ttl=3600.0)
    assert "exceeds its max_ttl 10m" in text

    _, text = explain(PolicySet([]), unix(), "payments", "datakey", None)
    assert "no policies are loaded" in text


def test_explain_spends_no_rate_tokens() -> None:
    policy = PolicySet(parse_policy_text(RATE_POLICY, path="rate.toml"))
    for _ in range(10):
        decision, text = explain(policy, unix(), "payments", "datakey", None)
        assert decision.allowed
    assert "limits each caller to 2/s" in text
    assert policy.decide(unix(), key="payments", operation="datakey", now=0.0).allowed
