"""What Vault clients ask about the server and about themselves.

- ``LIST /v1/transit/keys`` and ``GET /v1/transit/keys?list=true`` (operation ``list``, a keyless
  operation: a rule with ``keys = ["*"]``): the configured keys the caller may do anything with
  (:func:`~sidecar.policy.introspection.visible_keys`), as Vault's ``{"keys": [...]}``. The LIST
  verb reaches this route through :mod:`sidecar.server.list_verb`.
- ``GET /v1/auth/token/lookup-self`` (operation ``lookup-self``, keyless): the caller's identity
  as the sidecar proved it, in the shape of Vault's token lookup, so ``bao token lookup`` and
  hvac's ``is_authenticated()`` work. ``id`` is always empty: a token is never echoed.
  ``policies`` names the allow rules whose ``when`` holds; ``sidecar.rules`` lists every rule
  that could apply (allow and deny) with its keys and operations.
- ``GET /v1/sys/seal-status`` (unguarded, like Vault's): an unsealed node that names the
  sidecar, so ``bao status`` works; ``GET /v1/sys/leader`` likewise, a node that is its own
  leader with HA disabled.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from sidecar import __version__
from sidecar.errors import MethodNotAllowed
from sidecar.identity import Identity
from sidecar.policy.authorizer import AccessRequest
from sidecar.policy.introspection import rules_for, visible_keys
from sidecar.policy.policy_set import PolicySet
from sidecar.policy.rules import Rule
from sidecar.server.routes import Done, HandlerCall, Route, Unguarded
from sidecar.server.services import SERVICES

_STARTED = datetime.datetime.now(datetime.timezone.utc)


def _policies(call: HandlerCall) -> PolicySet:
    """The loaded policy set (an authorizer without one shows no rules)."""
    policies = getattr(call.services.authorizer, "policies", None)
    return policies if isinstance(policies, PolicySet) else PolicySet()


async def _list_keys(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    if call.request.query.get("list", "").lower() not in ("true", "1"):
        raise MethodNotAllowed("Use LIST, or GET with ?list=true, to list keys.")
    keys = visible_keys(_policies(call), access.identity, call.services.keyring.key_names())
    return Done({"keys": keys})


def identity_facts(identity: Identity) -> dict[str, Any]:
    """The proven facts of ``identity``, typed; absent facts are left out. Never a token."""
    facts: dict[str, Any] = {"kind": identity.kind}
    if identity.peer is not None:
        peer = identity.peer
        facts.update(unix_uid=peer.uid, unix_gid=peer.gid, pid=peer.pid, unix_exe=peer.exe)
    if identity.jwt is not None:
        facts.update(jwt_iss=identity.jwt.issuer, jwt_sub=identity.jwt.subject)
    if identity.tls is not None:
        facts.update(spiffe_id=identity.tls.spiffe_id, tls_subject=identity.tls.subject)
    return {name: value for name, value in facts.items() if value is not None}


def _display_name(identity: Identity) -> str:
    if identity.jwt is not None:
        return f"jwt-{identity.jwt.subject}"
    if identity.tls is not None:
        return identity.tls.spiffe_id or f"cert-{identity.tls.subject}"
    if identity.peer is not None:
        return f"unix-{identity.peer.uid}"
    return "anonymous"


def _rule_summary(rule: Rule) -> dict[str, Any]:
    return {
        "name": rule.name,
        "effect": rule.effect,
        "keys": list(rule.key_patterns),
        "operations": sorted(rule.operations),
        "source": rule.source,
    }


async def _lookup_self(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    identity = access.identity
    facts = identity_facts(identity)
    rules = rules_for(_policies(call), identity)
    data = {
        "accessor": "",
        "creation_time": int(_STARTED.timestamp()),
        "creation_ttl": 0,
        "display_name": _display_name(identity),
        "entity_id": "",
        "expire_time": None,
        "explicit_max_ttl": 0,
        "id": "",
        "issue_time": _STARTED.isoformat().replace("+00:00", "Z"),
        "meta": {name: str(value) for name, value in facts.items()},
        "num_uses": 0,
        "orphan": True,
        "path": "",
        "policies": [rule.name for rule in rules if rule.effect == "allow"],
        "renewable": False,
        "ttl": 0,
        "type": "service",
        "sidecar": {"identity": facts, "rules": [_rule_summary(rule) for rule in rules]},
    }
    return Done(data)


async def _seal_status(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return web.json_response(
        {
            "type": "kms-sidecar",
            "initialized": True,
            "sealed": False,
            "t": 0,
            "n": 0,
            "progress": 0,
            "nonce": "",
            "version": __version__,
            "commit_date": "",
            "migration": False,
            "cluster_name": "kms-sidecar",
            "cluster_id": "",
            "recovery_seal": False,
            "storage_type": f"kms-sidecar ({services.keyring.backend.kind} backend)",
        }
    )


async def _leader(request: web.Request) -> web.Response:
    return web.json_response({"ha_enabled": False})


_UNSEALED = "Vault serves it without a token; it says only that the sidecar is up (as health)"

#: The list, token lookup, seal-status and leader entries of the route table.
INTROSPECTION_ROUTES: tuple[Route | Unguarded, ...] = (
    Route(("GET",), "/v1/transit/keys", "list", _list_keys),
    Route(("GET", "POST"), "/v1/auth/token/lookup-self", "lookup-self", _lookup_self),
    Unguarded(("GET",), "/v1/sys/seal-status", _seal_status, _UNSEALED),
    Unguarded(("GET",), "/v1/sys/leader", _leader, _UNSEALED),
)
