"""``kms-sidecar policy check``: a decision and, in plain words, why it was made."""

from __future__ import annotations

from collections.abc import Mapping

from sidecar.identity import Identity
from sidecar.policy.decision import Decision
from sidecar.policy.facts import describe_identity
from sidecar.policy.policy_set import PolicySet
from sidecar.policy.vocabulary import OPERATIONS


def explain(
    policy_set: PolicySet,
    identity: Identity,
    key: str | None,
    operation: str,
    context: Mapping[str, str] | None = None,
    ttl: float | None = None,
) -> tuple[Decision, str]:
    """Decide without spending rate-limit tokens, and say why in plain words (for the CLI)."""
    decision = policy_set.decide(
        identity, key=key, operation=operation, context=context, ttl=ttl, consume=False
    )
    who = describe_identity(identity)
    target = "(no key)" if key is None else f"key {key!r}"
    rule = policy_set.rule(decision.rule) if decision.rule else None
    where = f" ({rule.source})" if rule is not None and rule.source else ""
    if operation not in OPERATIONS:
        return decision, (
            f"Denied: {operation!r} is not an operation (expected one of: "
            f"{', '.join(sorted(OPERATIONS))})."
        )
    if decision.allowed and rule is not None:
        text = f"Allowed: rule {rule.name!r}{where} allows {who} to {operation} {target}."
        if rule.rate is not None:
            text += f" The rule limits each caller to {rule.rate}."
        return decision, text
    if rule is not None:
        return decision, (
            f"Denied: deny rule {rule.name!r}{where} matches {who} for {operation} on {target}; "
            "deny rules win over allow rules."
        )
    if not policy_set.rules:
        return decision, "Denied: no policies are loaded, so every request is denied."
    lines = [f"Denied: no rule allows {who} to {operation} {target} (deny by default)."]
    considered = [r for r in policy_set.rules if r.effect == "allow"]
    near = []
    for candidate in considered:
        miss = candidate.miss(identity, key=key, operation=operation, context=context, ttl=ttl)
        if miss is None or miss.stage in ("operation", "key"):
            continue  # rules that do not cover this operation and key are not near misses
        src = f" ({candidate.source})" if candidate.source else ""
        near.append(f"  - {candidate.name!r}{src}: {miss}")
    if near:
        lines.append(f"Allow rules for {operation} on {target} that did not match:")
        lines.extend(near)
    else:
        lines.append(f"No allow rule covers {operation} on {target}.")
    return decision, "\n".join(lines)
