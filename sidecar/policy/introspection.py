"""What the policy says about one caller, without deciding a request: the rules whose ``when``
conditions hold for it, and the keys it may do anything with.

For ``auth/token/lookup-self`` and key listing. Context bindings, ``max_ttl`` and rates are left
aside (they depend on each request); no rate-limit token is spent.
"""

from __future__ import annotations

from collections.abc import Iterable

from sidecar.identity import Identity
from sidecar.policy.policy_set import PolicySet
from sidecar.policy.rules import Rule
from sidecar.policy.vocabulary import KEYLESS_OPERATIONS


def rules_for(policies: PolicySet, identity: Identity) -> list[Rule]:
    """The rules, allow and deny, in policy order, whose every ``when`` condition holds."""
    return [rule for rule in policies.rules if rule.identity_holds(identity)]


def visible_keys(policies: PolicySet, identity: Identity, key_names: Iterable[str]) -> list[str]:
    """The keys on which some allow rule that holds grants an operation no holding deny rule
    takes away: what the caller may see when it lists keys."""
    holding = rules_for(policies, identity)
    allows = [r for r in holding if r.effect == "allow"]
    denies = [r for r in holding if r.effect == "deny"]
    visible = []
    for key in key_names:
        for rule in allows:
            if not rule.matches_key(key):
                continue
            denied = set().union(*(d.operations for d in denies if d.matches_key(key)))
            if rule.operations - KEYLESS_OPERATIONS - denied:
                visible.append(key)
                break
    return visible
