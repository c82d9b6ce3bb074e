"""Policy rules and decisions: who may do which operation on which key (DESIGN §5).

Semantics, in the order :meth:`PolicySet.decide` applies them:

1. Only rules naming the operation (or ``"*"``) and a key pattern matching the key are considered.
2. If any ``deny`` rule's ``when`` conditions all hold, the request is denied: deny wins.
3. Otherwise the first ``allow`` rule (files in name order, rules in file order) whose ``when``
   conditions, ``context`` bindings and ``max_ttl`` all hold decides; its ``rate`` is then spent.
4. Otherwise the request is denied: deny by default.

Conditions (``when.*``) each test one fact of the :class:`~sidecar.identity.Identity`; a condition
on a fact the caller did not prove (no JWT, no Unix peer, no SPIFFE ID, an empty subject, a missing
claim) does not hold. A list means "any of". ``when`` keys:

- ``unix_uid``, ``unix_gid``: integers (the peer's primary gid, as SO_PEERCRED reports it).
- ``unix_exe``, ``spiffe_id``: path globs (below).
- ``jwt_iss``, ``jwt_sub``: exact strings.
- ``jwt_claims.<path>``: exact strings; a claim holding a list of strings holds if any element is
  listed. ``<path>`` reaches into nested objects with dots; a key that itself contains dots is
  found too, the longest matching key first, so ``kubernetes.io.namespace`` reads
  ``claims["kubernetes.io"]["namespace"]`` of a Kubernetes projected service-account token.
  Numbers, booleans and objects never equal a string.

Globs never cross boundaries by surprise:

- key patterns (``keys``): ``*`` is any run of characters and ``?`` one character; key names have
  no separators, so ``payments*`` also matches ``payments-admin`` (write ``payments-*`` if that is
  not meant). Only letters, digits, ``_ . -`` and the two wildcards are allowed; there are no
  character classes. Matching is case-sensitive.
- ``unix_exe`` and ``spiffe_id``: ``*`` and ``?`` stay within one ``/``-separated segment; ``**``
  spans segments. ``spiffe://example.org/ns/prod/sa/*`` matches ``.../sa/api`` but not
  ``.../sa/api/extra``.

``context.<name>`` binds the request's ``encryption_context[name]``: a literal string, or a template
of ``{jwt.sub}``, ``{jwt.iss}``, ``{jwt.claims.<path>}``, ``{spiffe_id}``, ``{unix_uid}``,
``{unix_gid}`` (mixable with literal text). A missing fact or a missing context entry means the
rule does not match.

``max_ttl`` bounds the ``ttl`` of ``datakey`` and ``datakey-wrapped``: a request with a longer ttl,
or with no ttl at all (a key that never expires), does not match that rule. Other operations
ignore it. ``rate`` (``"2000/s"``, ``"100/m"``, ``"10/h"``) is a token bucket per rule and caller;
the caller is the JWT (issuer, subject) if one was presented, else the mTLS SPIFFE ID or subject,
else the Unix uid.

Operations that concern no single key (``status``) are requested with ``key=None`` and are
matched only by rules whose ``keys`` contain ``"*"``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sidecar.config import parse_duration
from sidecar.errors import PermissionDenied, RateLimited
from sidecar.identity import Identity
from sidecar.policy.ratelimit import Rate, RateLimiter, parse_rate

OPERATIONS: Final = frozenset(
    {
        "datakey",
        "datakey-wrapped",
        "decrypt",
        "encrypt",
        "rewrap",
        "sign",
        "verify",
        "read",
        "rotate",
        "flush",
        "status",
    }
)
"""Every operation a rule can name (plus ``"*"`` for all of them)."""

KEYLESS_OPERATIONS: Final = frozenset({"status"})
"""Operations about the sidecar as a whole; requested with ``key=None``."""

TTL_OPERATIONS: Final = frozenset({"datakey", "datakey-wrapped"})
"""Operations whose ``ttl`` a rule's ``max_ttl`` bounds."""

WHEN_KEYS: Final = (
    "unix_uid",
    "unix_gid",
    "unix_exe",
    "jwt_iss",
    "jwt_sub",
    "jwt_claims",
    "spiffe_id",
)

_ALLOW_KEYS: Final = frozenset(
    {"name", "description", "when", "keys", "operations", "context", "max_ttl", "rate"}
)
_DENY_KEYS: Final = frozenset({"name", "description", "when", "keys", "operations"})
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_.*?-]{1,128}$")
_CONTEXT_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_MAX_CLAIM_PARTS = 16
_CANDIDATE_CACHE_SIZE = 16_384
_CACHEABLE_KEY_LENGTH = 128  # no configured key name is longer (see config._KEY_NAME)


class RuleError(ValueError):
    """A rule is invalid. ``key`` is the dotted key at fault inside the rule, if known."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one policy check.

    ``rule`` names the rule that decided (``None`` when nothing matched: deny by default).
    ``reason`` is for the audit log and operators, not for callers. ``retry_after`` (seconds) is
    set when the deciding rule's rate was exceeded; ``max_ttl`` (seconds) when the only thing
    keeping an allow rule from matching was a too-long or missing ttl.
    """

    allowed: bool
    rule: str | None
    reason: str
    retry_after: float | None = None
    max_ttl: float | None = None


# --- facts ------------------------------------------------------------------------------------

_MISSING: Final = object()


def resolve_claim(claims: Mapping[str, Any], parts: Sequence[str]) -> Any:
    """The claim at dotted ``parts`` (keys containing dots tried longest first), or ``_MISSING``."""
    return _resolve(claims, tuple(parts), 0)


def _resolve(node: Mapping[str, Any], parts: tuple[str, ...], start: int) -> Any:
    for end in range(len(parts), start, -1):
        name = parts[start] if end == start + 1 else ".".join(parts[start:end])
        if name in node:
            value = node[name]
            if end == len(parts):
                return value
            if isinstance(value, Mapping):
                found = _resolve(value, parts, end)
                if found is not _MISSING:
                    return found
    return _MISSING


def caller_key(identity: Identity) -> str:
    """Who a rate limit counts: the JWT (iss, sub), else the mTLS identity, else the Unix uid."""
    if identity.jwt is not None:
        return f"jwt:{identity.jwt.issuer}\x00{identity.jwt.subject}"
    if identity.tls is not None:
        return f"tls:{identity.tls.spiffe_id or identity.tls.subject}"
    if identity.peer is not None:
        return f"uid:{identity.peer.uid}"
    return "anonymous"


def describe_identity(identity: Identity) -> str:
    """The caller's proven facts in words, for explanations and logs (no secrets)."""
    parts = []
    if identity.peer is not None:
        peer = identity.peer
        exe = f", exe {peer.exe}" if peer.exe else ""
        parts.append(f"uid {peer.uid} gid {peer.gid} (pid {peer.pid}{exe})")
    if identity.jwt is not None:
        parts.append(f"JWT subject {identity.jwt.subject!r} from issuer {identity.jwt.issuer!r}")
    if identity.tls is not None:
        if identity.tls.spiffe_id:
            parts.append(f"SPIFFE ID {identity.tls.spiffe_id}")
        else:
            parts.append(f"client certificate {identity.tls.subject!r}")
    return ", ".join(parts) if parts else "an anonymous caller"


FactGetter = Callable[[Identity], "str | None"]


def fact_getter(fact: str, claim_parts: tuple[str, ...] = ()) -> FactGetter:
    """A function reading one fact of a caller as a string (``None``: not proven, or empty).

    ``fact`` is ``jwt.sub``, ``jwt.iss``, ``spiffe_id``, ``unix_uid``, ``unix_gid`` or
    ``claim`` (then ``claim_parts`` is its dotted path; strings and integers only).
    """
    if fact == "claim":
        parts = claim_parts

        def claim(identity: Identity) -> str | None:
            jwt = identity.jwt
            if jwt is None:
                return None
            value = resolve_claim(jwt.claims, parts)
            if isinstance(value, str):
                return value or None
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
            return None

        return claim
    if fact == "jwt.sub":
        return lambda identity: (identity.jwt.subject or None) if identity.jwt else None
    if fact == "jwt.iss":
        return lambda identity: (identity.jwt.issuer or None) if identity.jwt else None
    if fact == "spiffe_id":
        return lambda identity: (identity.tls.spiffe_id or None) if identity.tls else None
    if fact == "unix_uid":
        return lambda identity: str(identity.peer.uid) if identity.peer else None
    if fact == "unix_gid":
        return lambda identity: str(identity.peer.gid) if identity.peer else None
    raise ValueError(f"unknown fact {fact!r}")


# --- globs ------------------------------------------------------------------------------------


def glob_to_regex(pattern: str, *, segmented: bool) -> str:
    """Regex source for a glob: ``*`` and ``?``; with ``segmented``, they stop at ``/`` and ``**``
    crosses it. Everything else is literal."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "*":
            run = 1
            while i + run < len(pattern) and pattern[i + run] == "*":
                run += 1
            out.append(".*" if not segmented or run >= 2 else "[^/]*")
            i += run
            continue
        if char == "?":
            out.append("[^/]" if segmented else ".")
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _compile_globs(patterns: Iterable[str], *, segmented: bool) -> re.Pattern[str]:
    # No DOTALL: a newline in a caller-supplied name never matches a wildcard.
    return re.compile("|".join(f"(?:{glob_to_regex(p, segmented=segmented)})" for p in patterns))


# --- conditions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """One ``when`` test: ``holds(identity)`` on the hot path, ``why_not`` for explanations."""

    key: str
    holds: Callable[[Identity], bool]
    why_not: Callable[[Identity], str]
    #: The values an equality condition admits (uids, gids, subjects, issuers), for indexing.
    values: frozenset[Any] | None = None


def _as_list(value: Any, key: str, kind: type, what: str) -> list[Any]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RuleError(f"'{key}' must not be an empty list", key)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, kind):
            raise RuleError(f"'{key}' must be {what} or a list of them, got {item!r}", key)
    return items


def _ids_condition(key: str, value: Any, attr: str) -> Condition:
    ids = _as_list(value, key, int, "an integer")
    if any(i < 0 for i in ids):
        raise RuleError(f"'{key}' values must not be negative", key)
    allowed = frozenset(ids)
    label = attr  # "uid" or "gid"

    if attr == "uid":

        def holds(identity: Identity) -> bool:
            peer = identity.peer
            return peer is not None and peer.uid in allowed

    else:

        def holds(identity: Identity) -> bool:
            peer = identity.peer
            return peer is not None and peer.gid in allowed

    def why_not(identity: Identity) -> str:
        if identity.peer is None:
            return "the caller has no Unix peer credentials"
        return f"{label} {getattr(identity.peer, attr)} is not in {sorted(allowed)}"

    return Condition(key, holds, why_not, allowed)


def _exe_condition(key: str, value: Any) -> Condition:
    globs = _as_list(value, key, str, "a path glob")
    for glob in globs:
        if not glob.startswith("/"):
            raise RuleError(f"'{key}' globs must be absolute paths, got {glob!r}", key)
    regex = _compile_globs(globs, segmented=True)
    match = regex.fullmatch

    def holds(identity: Identity) -> bool:
        peer = identity.peer
        return peer is not None and peer.exe is not None and match(peer.exe) is not None

    def why_not(identity: Identity) -> str:
        if identity.peer is None:
            return "the caller has no Unix peer credentials"
        if identity.peer.exe is None:
            return "the caller's executable could not be determined"
        return f"executable {identity.peer.exe} does not match {globs}"

    return Condition(key, holds, why_not)


def _spiffe_condition(key: str, value: Any) -> Condition:
    globs = _as_list(value, key, str, "a SPIFFE ID glob")
    for glob in globs:
        if not glob.startswith("spiffe://"):
            raise RuleError(f"'{key}' must start with 'spiffe://', got {glob!r}", key)
    match = _compile_globs(globs, segmented=True).fullmatch

    def holds(identity: Identity) -> bool:
        spiffe_id = identity.spiffe_id
        return spiffe_id is not None and match(spiffe_id) is not None

    def why_not(identity: Identity) -> str:
        if not identity.spiffe_id:
            return "the caller presented no SPIFFE ID"
        return f"SPIFFE ID {identity.spiffe_id} does not match {globs}"

    return Condition(key, holds, why_not)


def _jwt_string_condition(key: str, value: Any, attr: str) -> Condition:
    allowed = frozenset(_as_list(value, key, str, "a string"))
    if "" in allowed:
        raise RuleError(f"'{key}' values must not be empty", key)
    label = "issuer" if attr == "issuer" else "subject"

    def holds(identity: Identity) -> bool:
        jwt = identity.jwt
        return jwt is not None and getattr(jwt, attr) in allowed

    def why_not(identity: Identity) -> str:
        if identity.jwt is None:
            return "the caller presented no JWT"
        return f"JWT {label} {getattr(identity.jwt, attr)!r} is not in {sorted(allowed)}"

    return Condition(key, holds, why_not, allowed)


def _claim_condition(key: str, parts: tuple[str, ...], value: Any) -> Condition:
    allowed = frozenset(_as_list(value, key, str, "a string"))
    claim = ".".join(parts)

    def holds(identity: Identity) -> bool:
        jwt = identity.jwt
        if jwt is None:
            return False
        found = resolve_claim(jwt.claims, parts)
        if isinstance(found, str):
            return found in allowed
        if isinstance(found, list):
            return any(isinstance(item, str) and item in allowed for item in found)
        return False

    def why_not(identity: Identity) -> str:
        if identity.jwt is None:
            return "the caller presented no JWT"
        found = resolve_claim(identity.jwt.claims, parts)
        if found is _MISSING:
            return f"the JWT has no claim {claim!r}"
        return f"JWT claim {claim!r} is not in {sorted(allowed)}"

    return Condition(key, holds, why_not)


def _flatten_claims(value: Any, prefix: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(value, Mapping):
        if not value:
            raise RuleError(f"'when.jwt_claims.{'.'.join(prefix)}' is empty", "when.jwt_claims")
        out: list[tuple[tuple[str, ...], Any]] = []
        for name, sub in value.items():
            out.extend(_flatten_claims(sub, (*prefix, *str(name).split("."))))
        return out
    return [(prefix, value)]


def _compile_when(raw: Any) -> tuple[Condition, ...]:
    if not isinstance(raw, Mapping):
        raise RuleError("'when' must be a table of conditions", "when")
    conditions: list[Condition] = []
    for name, value in raw.items():
        key = f"when.{name}"
        if name in ("unix_uid", "unix_gid"):
            conditions.append(_ids_condition(key, value, name.removeprefix("unix_")))
        elif name == "unix_exe":
            conditions.append(_exe_condition(key, value))
        elif name == "spiffe_id":
            conditions.append(_spiffe_condition(key, value))
        elif name in ("jwt_iss", "jwt_sub"):
            attr = "issuer" if name == "jwt_iss" else "subject"
            conditions.append(_jwt_string_condition(key, value, attr))
        elif name == "jwt_claims":
            if not isinstance(value, Mapping) or not value:
                raise RuleError(
                    "'when.jwt_claims' must be a table such as when.jwt_claims.tenant = \"acme\"",
                    key,
                )
            for parts, expected in _flatten_claims(value, ()):
                claim_key = f"{key}.{'.'.join(parts)}"
                if len(parts) > _MAX_CLAIM_PARTS or any(not p for p in parts):
                    raise RuleError(f"'{claim_key}' is not a usable claim path", claim_key)
                conditions.append(_claim_condition(claim_key, parts, expected))
        else:
            raise RuleError(
                f"unknown condition '{key}' (expected one of: {', '.join(WHEN_KEYS)})", key
            )
    # Cheap, frequently decisive tests first.
    order = {"when.unix_uid": 0, "when.unix_gid": 1, "when.jwt_sub": 2, "when.jwt_iss": 3}
    conditions.sort(key=lambda c: order.get(c.key, 9))
    return tuple(conditions)


# --- context templates ------------------------------------------------------------------------

_Piece = str | FactGetter  # literal text, or a fact of the caller


@dataclass(frozen=True, slots=True)
class Template:
    """A ``context.<name>`` value: literal text and facts of the caller."""

    source: str
    pieces: tuple[_Piece, ...]

    def render(self, identity: Identity) -> str | None:
        """The value for this caller, or ``None`` if a fact it needs is missing."""
        pieces = self.pieces
        if len(pieces) == 1:
            only = pieces[0]
            return only if isinstance(only, str) else only(identity)
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            value = piece(identity)
            if value is None:
                return None
            out.append(value)
        return "".join(out)


_SIMPLE_FACTS = frozenset({"jwt.sub", "jwt.iss", "spiffe_id", "unix_uid", "unix_gid"})


def compile_template(source: str, key: str) -> Template:
    """Parse a ``context.<name>`` value. Raises :class:`RuleError` for unknown placeholders."""
    if not isinstance(source, str):
        raise RuleError(f"'{key}' must be a string (a literal or a template such as "
                        "'{jwt.claims.tenant}')", key)  # fmt: skip
    pieces: list[_Piece] = []
    texts: list[str] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(source):
        text = source[pos : match.start()]
        if text:
            pieces.append(text)
            texts.append(text)
        fact = match.group(1).strip()
        if fact in _SIMPLE_FACTS:
            pieces.append(fact_getter(fact))
        elif fact.startswith("jwt.claims.") and len(fact) > len("jwt.claims."):
            parts = tuple(fact.removeprefix("jwt.claims.").split("."))
            if len(parts) > _MAX_CLAIM_PARTS or any(not p for p in parts):
                raise RuleError(f"'{key}': {{{fact}}} is not a usable claim path", key)
            pieces.append(fact_getter("claim", parts))
        else:
            raise RuleError(
                f"'{key}': unknown placeholder {{{fact}}} (expected {{jwt.sub}}, {{jwt.iss}}, "
                "{jwt.claims.<claim>}, {spiffe_id}, {unix_uid} or {unix_gid})",
                key,
            )
        pos = match.end()
    rest = source[pos:]
    if rest or not pieces:
        pieces.append(rest)
        texts.append(rest)
    if any("{" in text or "}" in text for text in texts):
        raise RuleError(f"'{key}': unbalanced '{{' or '}}' in {source!r}", key)
    return Template(source=source, pieces=tuple(pieces))


# --- rules ------------------------------------------------------------------------------------


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
        self._key_match = _compile_globs(key_patterns, segmented=False).fullmatch
        #: The uids a ``unix_uid`` condition admits (``None``: no such condition).
        self.uids = next((c.values for c in conditions if c.key == "when.unix_uid"), None)
        #: The subjects a ``jwt_sub`` condition admits (``None``: no such condition).
        self.subjects = next((c.values for c in conditions if c.key == "when.jwt_sub"), None)
        #: The condition tests alone, for the hot path.
        self.checks = tuple(c.holds for c in conditions)
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
            if not check(identity):
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

    def why_not(
        self,
        identity: Identity,
        *,
        key: str | None,
        operation: str,
        context: Mapping[str, str] | None,
        ttl: float | None,
    ) -> str | None:
        """The first reason this rule does not match, in words; ``None`` if it matches."""
        if operation not in self.operations:
            return f"it does not cover operation {operation!r}"
        if not self.matches_key(key):
            if key is None:
                return "it does not cover every key ('*'), which this operation needs"
            return f"its keys {list(self.key_patterns)} do not match {key!r}"
        for condition in self.conditions:
            if not condition.holds(identity):
                return condition.why_not(identity)
        for name, template in self.context:
            expected = template.render(identity)
            if expected is None:
                return f"context.{name} = {template.source!r} needs a fact the caller lacks"
            given = context.get(name) if context else None
            if given is None:
                return f"the request's encryption_context has no {name!r}"
            if given != expected:
                return f"encryption_context.{name} is not {expected!r}"
        if not self.ttl_holds(operation, ttl):
            limit = format_seconds(self.max_ttl or 0.0)
            if ttl is None:
                return f"it requires a ttl of at most {limit} and the request has none"
            return f"the requested ttl {format_seconds(ttl)} exceeds its max_ttl {limit}"
        return None


def format_seconds(seconds: float) -> str:
    """``90.0`` → ``"90s"``, ``600.0`` → ``"10m"``, ``7200.0`` → ``"2h"``."""
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds:g}s"


def _string_list(raw: Any, key: str) -> list[str]:
    items = _as_list(raw, key, str, "a string")
    return items


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
        conditions = _compile_when(raw["when"])
    elif effect == "allow":
        raise RuleError(
            "an allow rule needs 'when' conditions; write 'when = {}' to allow every caller",
            "name",
        )
    else:
        conditions = ()

    if "keys" not in raw:
        raise RuleError("'keys' is required (a list of key name globs; \"*\" for all)", "name")
    patterns = _string_list(raw["keys"], "keys")
    for pattern in patterns:
        if not _KEY_PATTERN.match(pattern):
            raise RuleError(
                f"key pattern {pattern!r} may use only letters, digits, '_', '.', '-' and the "
                "wildcards '*' and '?'",
                "keys",
            )

    if "operations" not in raw:
        raise RuleError('\'operations\' is required (for example ["datakey", "decrypt"])', "name")
    named = _string_list(raw["operations"], "operations")
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


# --- the set ----------------------------------------------------------------------------------

_Candidates = tuple[tuple[Rule, ...], tuple[Rule, ...]]
_NOTHING_LOADED: Final = Decision(False, None, "no policies are loaded (deny by default)")
_DEFAULT_DENY: Final = Decision(False, None, "no rule allows this request (deny by default)")


def permission_denied(operation: str, key: str | None) -> PermissionDenied:
    """The one denial callers see, whether the key is forbidden or does not exist."""
    if key is None:
        return PermissionDenied(f"Permission denied: this caller may not use {operation!r}.")
    return PermissionDenied(
        f"Permission denied: this caller may not {operation} with key {key!r}, "
        "or no such key exists."
    )


class PolicySet:
    """An immutable, ordered set of rules; deny by default. ``len()`` is the number of rules.

    Rate-limit buckets live in the rules, so a reloaded set starts with full buckets.
    """

    def __init__(self, rules: Iterable[Rule] = (), *, files: Sequence[str] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        #: The policy files the rules came from, in load order.
        self.files: tuple[str, ...] = tuple(files)
        seen: dict[str, Rule] = {}
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(
                    f"rule name {rule.name!r} is used twice ({seen[rule.name].source} and "
                    f"{rule.source})"
                )
            seen[rule.name] = rule
        self._by_name = seen
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
                if not check(identity):
                    break
            else:
                return rule.denied_decision
        for rule in allows:
            for check in rule.checks:
                if not check(identity):
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

        Raises ``PermissionDenied`` (the same message whether or not the key exists) or
        ``RateLimited`` (with ``retry_after`` in seconds). Returns the allowing decision, whose
        ``rule`` the audit log records.
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
            )
        if decision.max_ttl is not None:
            limit = format_seconds(decision.max_ttl)
            if ttl is None:
                raise PermissionDenied(
                    f"Permission denied: this caller must request a ttl of at most {limit} for "
                    f"key {key!r}; set ttl."
                )
            raise PermissionDenied(
                f"Permission denied: the requested ttl exceeds the maximum of {limit} this "
                f"caller may request for key {key!r}; ask for a shorter ttl."
            )
        raise permission_denied(operation, key)


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
        why = candidate.why_not(identity, key=key, operation=operation, context=context, ttl=ttl)
        if why is None or why.startswith(("it does not cover", "its keys")):
            continue
        src = f" ({candidate.source})" if candidate.source else ""
        near.append(f"  - {candidate.name!r}{src}: {why}")
    if near:
        lines.append(f"Allow rules for {operation} on {target} that did not match:")
        lines.extend(near)
    else:
        lines.append(f"No allow rule covers {operation} on {target}.")
    return decision, "\n".join(lines)
