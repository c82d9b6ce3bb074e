"""One ``[[allow]]`` or ``[[deny]]`` rule: validated from its TOML table and compiled for matching.

A rule matches a request when it names the operation (or ``"*"``), a key pattern covers the key,
every ``when`` condition holds, every ``context.<name>`` binding equals the request's encryption
context and, for :data:`~sidecar.policy.vocabulary.TTL_OPERATIONS`, the ttl is within ``max_ttl``
(a request without a ttl asks for a key that never expires, which exceeds any ``max_ttl``).
``rate`` (``"2000/s"``, ``"100/m"``, ``"10/h"``) is a token bucket per rule and caller.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from sidecar.config import parse_duration
from sidecar.identity import Identity
from sidecar.policy.conditions import Condition, Miss, Test, as_list, compile_when
from sidecar.policy.decision import Decision
from sidecar.policy.globs import compile_globs
from sidecar.policy.ratelimit import Rate, RateLimiter, parse_rate
from sidecar.policy.templates import Template, compile_template
from sidecar.policy.vocabulary import (
    KEYLESS_OPERATIONS,
    OPERATIONS,
    TTL_OPERATIONS,
    RuleError,
    format_seconds,
)

_ALLOW_KEYS: Final = frozenset(
    {"name", "description", "when", "keys", "operations", "context", "max_ttl", "rate"}
)
_DENY_KEYS: Final = frozenset({"name", "description", "when", "keys", "operations"})
_KEY_PATTERN: Final = re.compile(r"^[A-Za-z0-9_.*?-]{1,128}$")
_CONTEXT_NAME: Final = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")


class Rule:
    """One compiled ``[[allow]]`` or ``[[deny]]`` rule. Build it with :func:`compile_rule`."""

    __slots__ = (
        "_key_match",
        "allowed_decision",
        "checks",
        "conditions",
        "context",
        "denied_decision",
        "description",
        "effect",
        "key_patterns",
        "limiter",
        "matches_all_keys",
        "max_ttl",
        "name",
        "operations",
        "rate",
        "source",
        "subjects",
        "uids",
    )

    def __init__(
        self,
        *,
        name: str,
        effect: str,
        key_patterns: tuple[str, ...],
        operations: frozenset[str],
        conditions: tuple[Condition, ...] = (),
        context: tuple[tuple[str, Template], ...] = (),
        max_ttl: float | None = None,
        rate: Rate | None = None,
        source: str = "",
        description: str = "",
    ) -> None:
        self.name = name
        self.effect = effect
        self.key_patterns = key_patterns
        self.operations = operations
        self.conditions = conditions
        self.context = context
        self.max_ttl = max_ttl
        self.rate = rate
        self.limiter = RateLimiter(rate) if rate is not None else None
        self.source = source
        self.description = description
        self.matches_all_keys = any(set(p) == {"*"} for p in key_patterns)
        self._key_match = compile_globs(key_patterns, segmented=False).fullmatch
        #: The uids a ``unix_uid`` condition admits (``None``: no such condition).
        self.uids = next((c.values for c in conditions if c.key == "when.unix_uid"), None)
        #: The subjects a ``jwt_sub`` condition admits (``None``: no such condition).
        self.subjects = next((c.values for c in conditions if c.key == "when.jwt_sub"), None)
        #: The condition tests alone, for the hot path (each is ``None`` when it holds).
        self.checks: tuple[Test, ...] = tuple(c.test for c in conditions)
        #: Decisions are immutable, so each rule's outcome is built once.
        self.allowed_decision = Decision(True, name, f"allowed by rule {name!r}")
        self.denied_decision = Decision(False, name, f"denied by rule {name!r}")

    def __repr__(self) -> str:
        return f"<Rule {self.effect} {self.name!r} {self.source}>"

    def matches_key(self, key: str | None) -> bool:
        """Whether a key pattern covers ``key`` (``None``: a keyless operation; needs ``"*"``)."""
        if key is None:
            return self.matches_all_keys
        return self._key_match(key) is not None

    def admits(self, uid: int, subject: str | None) -> bool:
        """False if the ``unix_uid`` or ``jwt_sub`` condition rules this caller out (uid -1: no
        Unix peer; subject ``None``: no JWT)."""
        if self.uids is not None and uid not in self.uids:
            return False
        return self.subjects is None or subject in self.subjects

    def identity_holds(self, identity: Identity) -> bool:
        """Whether every ``when`` condition holds for this caller."""
        # Hot path: a plain loop is several times cheaper than all() over a generator.
        for check in self.checks:  # noqa: SIM110
            if check(identity) is not None:
                return False
        return True

    def context_holds(self, identity: Identity, context: Mapping[str, str] | None) -> bool:
        """Whether every ``context.<name>`` binding equals the request's encryption context."""
        if not self.context:
            return True
        if not context:
            return False
        for name, template in self.context:
            given = context.get(name)
            if given is None or given != template.render(identity):
                return False
        return True

    def ttl_holds(self, operation: str, ttl: float | None) -> bool:
        """Whether ``ttl`` is within ``max_ttl`` (only bounds :data:`TTL_OPERATIONS`)."""
        if self.max_ttl is None or operation not in TTL_OPERATIONS:
            return True
        return ttl is not None and ttl <= self.max_ttl

    def miss(
        self,
        identity: Identity,
        *,
        key: str | None,
        operation: str,
        context: Mapping[str, str] | None,
        ttl: float | None,
    ) -> Miss | None:
        """The first reason this rule does not match the request; ``None`` if it matches.

        The same condition tests the hot path runs decide here, so the two cannot disagree.
        """
        if operation not in self.operations:
            return Miss("operation", f"it does not cover operation {operation!r}")
        if not self.matches_key(key):
            if key is None:
                return Miss("key", "it does not cover every key ('*'), which this operation needs")
            return Miss("key", f"its keys {list(self.key_patterns)} do not match {key!r}")
        for check in self.checks:
            reason = check(identity)
            if reason is not None:
                return Miss("when", reason.words(identity))
        for name, template in self.context:
            expected = template.render(identity)
            if expected is None:
                source = template.source
                return Miss("context", f"context.{name} = {source!r} needs a fact the caller lacks")
            given = context.get(name) if context else None
            if given is None:
                return Miss("context", f"the request's encryption_context has no {name!r}")
            if given != expected:
                return Miss("context", f"encryption_context.{name} is not {expected!r}")
        if not self.ttl_holds(operation, ttl):
            limit = format_seconds(self.max_ttl or 0.0)
            if ttl is None:
                return Miss("ttl", f"it requires a ttl of at most {limit} and the request has none")
            asked = format_seconds(ttl)
            return Miss("ttl", f"the requested ttl {asked} exceeds its max_ttl {limit}")
        return None


def compile_rule(effect: str, raw: Mapping[str, Any], *, source: str = "") -> Rule:
    """Validate one rule's table and compile it. Raises :class:`RuleError` naming the key."""
    if effect not in ("allow", "deny"):
        raise RuleError(f"unknown rule kind {effect!r} (expected 'allow' or 'deny')")
    if not isinstance(raw, Mapping):
        raise RuleError(f"each [[{effect}]] entry must be a table")
    known = _ALLOW_KEYS if effect == "allow" else _DENY_KEYS
    for name in raw:
        if name not in known:
            hint = ""
            if name in _ALLOW_KEYS:
                hint = f"; '{name}' only applies to allow rules"
            raise RuleError(
                f"unknown key '{name}' in a [[{effect}]] rule (expected one of: "
                f"{', '.join(sorted(known))}){hint}",
                name,
            )

    rule_name = raw.get("name")
    if not isinstance(rule_name, str) or not rule_name.strip():
        raise RuleError(f"every [[{effect}]] rule needs a non-empty 'name'", "name")
    if len(rule_name) > 128 or not _CONTEXT_NAME.match(rule_name):
        raise RuleError("'name' must be at most 128 printable characters", "name")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise RuleError("'description' must be a string", "description")

    if "when" in raw:
        conditions = compile_when(raw["when"])
    elif effect == "allow":
        raise RuleError(
            "an allow rule needs 'when' conditions; write 'when = {}' to allow every caller",
            "name",
        )
    else:
        conditions = ()

    if "keys" not in raw:
        raise RuleError("'keys' is required (a list of key name globs; \"*\" for all)", "name")
    patterns = as_list(raw["keys"], "keys", str, "a string")
    for pattern in patterns:
        if not _KEY_PATTERN.match(pattern):
            raise RuleError(
                f"key pattern {pattern!r} may use only letters, digits, '_', '.', '-' and the "
                "wildcards '*' and '?'",
                "keys",
            )

    if "operations" not in raw:
        raise RuleError('\'operations\' is required (for example ["datakey", "decrypt"])', "name")
    named = as_list(raw["operations"], "operations", str, "a string")
    operations: set[str] = set()
    for op in named:
        if op == "*":
            operations |= OPERATIONS
        elif op in OPERATIONS:
            operations.add(op)
        else:
            raise RuleError(
                f"unknown operation {op!r} (expected '*' or one of: "
                f"{', '.join(sorted(OPERATIONS))})",
                "operations",
            )
    keyless = KEYLESS_OPERATIONS.intersection(named)
    if keyless and not any(set(p) == {"*"} for p in patterns):
        raise RuleError(
            f'operation {sorted(keyless)[0]!r} concerns no single key; its rule needs keys = ["*"]',
            "keys",
        )

    context: list[tuple[str, Template]] = []
    raw_context = raw.get("context", {})
    if not isinstance(raw_context, Mapping):
        raise RuleError("'context' must be a table such as context.tenant = \"acme\"", "context")
    for name, value in raw_context.items():
        ckey = f"context.{name}"
        if not _CONTEXT_NAME.match(name):
            raise RuleError(f"'{ckey}' is not a usable context name", ckey)
        if isinstance(value, Mapping):
            raise RuleError(
                f"'{ckey}' must be a string; quote context names that contain dots "
                f'(context."{name}.…")',
                ckey,
            )
        context.append((name, compile_template(value, ckey)))

    max_ttl: float | None = None
    if "max_ttl" in raw:
        try:
            max_ttl = parse_duration(raw["max_ttl"])
        except (ValueError, TypeError) as exc:
            raise RuleError(f"'max_ttl': {exc}", "max_ttl") from None
        if max_ttl <= 0:
            raise RuleError("'max_ttl' must be positive", "max_ttl")
        if not operations & TTL_OPERATIONS:
            raise RuleError(
                "'max_ttl' bounds datakey and datakey-wrapped, which this rule does not allow",
                "max_ttl",
            )

    rate: Rate | None = None
    if "rate" in raw:
        try:
            rate = parse_rate(raw["rate"])
        except ValueError as exc:
            raise RuleError(f"'rate': {exc}", "rate") from None

    return Rule(
        name=rule_name,
        effect=effect,
        key_patterns=tuple(patterns),
        operations=frozenset(operations),
        conditions=conditions,
        context=tuple(context),
        max_ttl=max_ttl,
        rate=rate,
        source=source,
        description=description,
    )
