"""A :class:`PolicySet`: the loaded rules, and the decision for one request.

Semantics, in the order :meth:`PolicySet.decide` applies them:

1. Only rules naming the operation (or ``"*"``) and a key pattern matching the key are considered.
2. If any ``deny`` rule's ``when`` conditions all hold, the request is denied: deny wins.
3. Otherwise the first ``allow`` rule (files in name order, rules in file order) whose ``when``
   conditions, ``context`` bindings and ``max_ttl`` all hold decides; its ``rate`` is then spent.
4. Otherwise the request is denied: deny by default.

Operations that concern no single key (``status``) are requested with ``key=None`` and are
matched only by rules whose ``keys`` contain ``"*"``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from sidecar.errors import ConfigError, InvalidRequest, RateLimited, quoted
from sidecar.identity import Identity
from sidecar.policy.decision import Decision, permission_denied
from sidecar.policy.facts import caller_key
from sidecar.policy.rules import Rule
from sidecar.policy.vocabulary import OPERATIONS, TTL_OPERATIONS, format_seconds

_CANDIDATE_CACHE_SIZE: Final = 16_384
_CACHEABLE_KEY_LENGTH: Final = 128  # no configured key name is longer (see config._KEY_NAME)

_Candidates = tuple[tuple[Rule, ...], tuple[Rule, ...]]
_NOTHING_LOADED: Final = Decision(False, None, "no policies are loaded (deny by default)")
_DEFAULT_DENY: Final = Decision(False, None, "no rule allows this request (deny by default)")


def rules_by_name(rules: Iterable[Rule]) -> dict[str, Rule]:
    """The rules by name. Raises ``ConfigError`` (``FILE:LINE: reason``) for a name used twice."""
    seen: dict[str, Rule] = {}
    for rule in rules:
        first = seen.setdefault(rule.name, rule)
        if first is not rule:
            where = f"{rule.source}: " if rule.source else ""
            earlier = first.source or "another rule"
            raise ConfigError(
                f"{where}rule name {rule.name!r} is already used at {earlier}; "
                "rule names must be unique"
            )
    return seen


class PolicySet:
    """An immutable, ordered set of rules; deny by default. ``len()`` is the number of rules.

    Rate-limit buckets live in the rules, so a reloaded set starts with full buckets. Raises
    ``ConfigError`` for a rule name used twice.
    """

    def __init__(self, rules: Iterable[Rule] = (), *, files: Sequence[str] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        #: The policy files the rules came from, in load order.
        self.files: tuple[str, ...] = tuple(files)
        self._by_name = rules_by_name(self.rules)
        self._by_operation: dict[str, _Candidates] = {}
        for op in OPERATIONS:
            self._by_operation[op] = (
                tuple(r for r in self.rules if r.effect == "deny" and op in r.operations),
                tuple(r for r in self.rules if r.effect == "allow" and op in r.operations),
            )
        self._candidates: dict[tuple[str, str | None, int, str | None], _Candidates] = {}

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"<PolicySet {len(self.rules)} rules from {len(self.files)} files>"

    def rule(self, name: str) -> Rule | None:
        """The rule called ``name``, if any."""
        return self._by_name.get(name)

    def candidates(
        self, operation: str, key: str | None, uid: int = -1, subject: str | None = None
    ) -> _Candidates:
        """(deny rules, allow rules) that can apply to this operation, key, Unix uid (-1: no
        Unix peer) and JWT subject (``None``: no JWT), in order. Cached.

        Rules whose ``unix_uid`` or ``jwt_sub`` rule the caller out are left out here, so many
        rules differing only in those stay cheap."""
        cache_key = (operation, key, uid, subject)
        found = self._candidates.get(cache_key)
        if found is None:
            denies, allows = self._by_operation.get(operation, ((), ()))
            found = (
                tuple(r for r in denies if r.matches_key(key) and r.admits(uid, subject)),
                tuple(r for r in allows if r.matches_key(key) and r.admits(uid, subject)),
            )
            if key is None or len(key) <= _CACHEABLE_KEY_LENGTH:
                if len(self._candidates) >= _CANDIDATE_CACHE_SIZE:
                    self._candidates.clear()  # callers can send any key name; stay bounded
                self._candidates[cache_key] = found
        return found

    def decide(
        self,
        identity: Identity,
        *,
        key: str | None,
        operation: str,
        context: Mapping[str, str] | None = None,
        ttl: float | None = None,
        now: float | None = None,
        consume: bool = True,
    ) -> Decision:
        """Decide one request. ``ttl`` and ``now`` are seconds (``now`` defaults to
        ``time.monotonic()``). With ``consume=False`` no rate-limit token is spent (for
        explanations). Never raises for a denial; see :meth:`authorize`."""
        peer, jwt = identity.peer, identity.jwt
        uid = -1 if peer is None else peer.uid
        subject = None if jwt is None else jwt.subject
        found = self._candidates.get((operation, key, uid, subject))
        if found is None:
            if operation not in OPERATIONS:
                return Decision(False, None, f"unknown operation {operation!r}")
            found = self.candidates(operation, key, uid, subject)
        denies, allows = found
        # The loops below are Rule.identity_holds etc. inlined: this runs on every request.
        for rule in denies:
            for check in rule.checks:
                if check(identity) is not None:
                    break
            else:
                return rule.denied_decision
        for rule in allows:
            for check in rule.checks:
                if check(identity) is not None:
                    break
            else:
                if rule.context and not rule.context_holds(identity, context):
                    continue
                if rule.max_ttl is not None and not rule.ttl_holds(operation, ttl):
                    continue
                limiter = rule.limiter
                if consume and limiter is not None:
                    wait = limiter.take(
                        caller_key(identity), time.monotonic() if now is None else now
                    )
                    if wait > 0.0:
                        return Decision(
                            False,
                            rule.name,
                            f"rate limit {rule.rate} of rule {rule.name!r} exceeded",
                            retry_after=wait,
                        )
                return rule.allowed_decision
        return self._default_deny(identity, allows, operation, context, ttl)

    def _default_deny(
        self,
        identity: Identity,
        allows: tuple[Rule, ...],
        operation: str,
        context: Mapping[str, str] | None,
        ttl: float | None,
    ) -> Decision:
        # Off the hot path: was a too-long (or missing) ttl the only obstacle?
        if operation in TTL_OPERATIONS:
            for rule in allows:
                if (
                    rule.max_ttl is not None
                    and rule.identity_holds(identity)
                    and rule.context_holds(identity, context)
                ):
                    limit = format_seconds(rule.max_ttl)
                    return Decision(
                        False,
                        None,
                        f"rule {rule.name!r} would allow this with a ttl of at most {limit}",
                        max_ttl=rule.max_ttl,
                    )
        if not self.rules:
            return _NOTHING_LOADED
        return _DEFAULT_DENY

    def authorize(
        self,
        identity: Identity,
        *,
        key: str | None,
        operation: str,
        context: Mapping[str, str] | None = None,
        ttl: float | None = None,
        now: float | None = None,
    ) -> Decision:
        """:meth:`decide`, raising for a refusal.

        Raises ``PermissionDenied`` (the same message whether or not the key exists),
        ``RateLimited`` (with ``retry_after`` in seconds), or ``InvalidRequest`` naming ``ttl``
        when a rule would allow the request with a shorter (or any) ttl. Returns the allowing
        decision, whose ``rule`` the audit log records.
        """
        decision = self.decide(
            identity, key=key, operation=operation, context=context, ttl=ttl, now=now
        )
        if decision.allowed:
            return decision
        if decision.retry_after is not None:
            raise RateLimited(
                f"Too many requests for {operation!r}; retry in "
                f"{max(decision.retry_after, 0.001):.3g} seconds.",
                retry_after=decision.retry_after,
                rule=decision.rule,
            )
        if decision.max_ttl is not None:  # the caller's field is at fault, not its rights
            limit = format_seconds(decision.max_ttl)
            if ttl is None:
                raise InvalidRequest(
                    f"Field 'ttl' is required: this caller may request keys of {quoted(key)} "
                    f"only with a ttl of at most {limit}."
                )
            raise InvalidRequest(
                f"Field 'ttl' exceeds the maximum of {limit} this caller may request for key "
                f"{quoted(key)}; ask for a shorter ttl."
            )
        raise permission_denied(operation, key, rule=decision.rule)
