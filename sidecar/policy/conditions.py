"""``when.*`` conditions: each written once, as one test that says why it fails.

A condition's ``test(identity)`` returns ``None`` when it holds, and otherwise the
:class:`Reason` it fails — made once, when the rule is compiled, so a failing test allocates
nothing. The hot path only compares with ``None``; an explanation asks the reason for its words.
A condition on a fact the caller did not prove does not hold; a list means "any of". ``when``
keys:

- ``unix_uid``, ``unix_gid``: integers (the peer's primary gid, as SO_PEERCRED reports it).
- ``unix_exe``, ``spiffe_id``: path globs (:mod:`sidecar.policy.globs`).
- ``jwt_iss``, ``jwt_sub``: exact strings.
- ``jwt_claims.<path>``: exact strings; a claim holding a list of strings holds if any element is
  listed. Numbers, booleans and objects never equal a string (paths: :mod:`sidecar.policy.facts`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from sidecar.identity import Identity
from sidecar.policy.facts import MISSING, resolve_claim
from sidecar.policy.globs import compile_globs
from sidecar.policy.vocabulary import MAX_CLAIM_PARTS, WHEN_KEYS, RuleError


class Miss(NamedTuple):
    """Why a rule does not match one request: the ``stage`` that failed, and why in words.

    ``stage`` is ``"operation"``, ``"key"``, ``"when"``, ``"context"`` or ``"ttl"``.
    """

    stage: str
    text: str

    def __str__(self) -> str:
        return self.text


class Reason:
    """One way a condition can fail; ``words(identity)`` says it for that caller."""

    __slots__ = ("words",)

    def __init__(self, words: Callable[[Identity], str]) -> None:
        self.words = words

    @classmethod
    def fixed(cls, text: str) -> Reason:
        """A reason whose words do not depend on the caller."""
        return cls(lambda _identity: text)


Test = Callable[[Identity], "Reason | None"]

_NO_PEER: Final = Reason.fixed("the caller has no Unix peer credentials")
_NO_EXE: Final = Reason.fixed("the caller's executable could not be determined")
_NO_SPIFFE: Final = Reason.fixed("the caller presented no SPIFFE ID")
_NO_JWT: Final = Reason.fixed("the caller presented no JWT")


def _peer_attr(identity: Identity, attr: str) -> Any:
    return None if identity.peer is None else getattr(identity.peer, attr)


def _jwt_attr(identity: Identity, attr: str) -> Any:
    return None if identity.jwt is None else getattr(identity.jwt, attr)


@dataclass(frozen=True, slots=True)
class Condition:
    """One ``when`` condition: ``test(identity)`` is ``None`` if it holds, else why not."""

    key: str
    test: Test
    #: The values an equality condition admits (uids, gids, subjects, issuers), for indexing.
    values: frozenset[Any] | None = None


def as_list(value: Any, key: str, kind: type, what: str) -> list[Any]:
    """``value`` as a non-empty list of ``kind`` (a single value is a list of one)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RuleError(f"'{key}' must not be an empty list", key)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, kind):
            raise RuleError(f"'{key}' must be {what} or a list of them, got {item!r}", key)
    return items


def _ids_condition(key: str, value: Any, attr: str) -> Condition:
    ids = as_list(value, key, int, "an integer")
    if any(i < 0 for i in ids):
        raise RuleError(f"'{key}' values must not be negative", key)
    allowed = frozenset(ids)
    listed = sorted(allowed)
    not_listed = Reason(lambda identity: f"{attr} {_peer_attr(identity, attr)} is not in {listed}")

    if attr == "uid":

        def test(identity: Identity) -> Reason | None:
            peer = identity.peer
            if peer is None:
                return _NO_PEER
            return None if peer.uid in allowed else not_listed

    else:

        def test(identity: Identity) -> Reason | None:
            peer = identity.peer
            if peer is None:
                return _NO_PEER
            return None if peer.gid in allowed else not_listed

    return Condition(key, test, allowed)


def _exe_condition(key: str, value: Any) -> Condition:
    globs = as_list(value, key, str, "a path glob")
    for glob in globs:
        if not glob.startswith("/"):
            raise RuleError(f"'{key}' globs must be absolute paths, got {glob!r}", key)
    match = compile_globs(globs, segmented=True).fullmatch
    no_match = Reason(
        lambda identity: f"executable {_peer_attr(identity, 'exe')} does not match {globs}"
    )

    def test(identity: Identity) -> Reason | None:
        peer = identity.peer
        if peer is None:
            return _NO_PEER
        if peer.exe is None:
            return _NO_EXE
        return None if match(peer.exe) is not None else no_match

    return Condition(key, test)


def _spiffe_condition(key: str, value: Any) -> Condition:
    globs = as_list(value, key, str, "a SPIFFE ID glob")
    for glob in globs:
        if not glob.startswith("spiffe://"):
            raise RuleError(f"'{key}' must start with 'spiffe://', got {glob!r}", key)
    match = compile_globs(globs, segmented=True).fullmatch
    no_match = Reason(lambda identity: f"SPIFFE ID {identity.spiffe_id} does not match {globs}")

    def test(identity: Identity) -> Reason | None:
        spiffe_id = identity.spiffe_id
        if not spiffe_id:
            return _NO_SPIFFE
        return None if match(spiffe_id) is not None else no_match

    return Condition(key, test)


def _jwt_string_condition(key: str, value: Any, attr: str) -> Condition:
    allowed = frozenset(as_list(value, key, str, "a string"))
    if "" in allowed:
        raise RuleError(f"'{key}' values must not be empty", key)
    listed = sorted(allowed)
    not_listed = Reason(
        lambda identity: f"JWT {attr} {_jwt_attr(identity, attr)!r} is not in {listed}"
    )

    if attr == "issuer":

        def test(identity: Identity) -> Reason | None:
            jwt = identity.jwt
            if jwt is None:
                return _NO_JWT
            return None if jwt.issuer in allowed else not_listed

    else:

        def test(identity: Identity) -> Reason | None:
            jwt = identity.jwt
            if jwt is None:
                return _NO_JWT
            return None if jwt.subject in allowed else not_listed

    return Condition(key, test, allowed)


def _claim_condition(key: str, parts: tuple[str, ...], value: Any) -> Condition:
    allowed = frozenset(as_list(value, key, str, "a string"))
    claim = ".".join(parts)
    missing = Reason.fixed(f"the JWT has no claim {claim!r}")
    other = Reason.fixed(f"JWT claim {claim!r} is not in {sorted(allowed)}")

    def test(identity: Identity) -> Reason | None:
        jwt = identity.jwt
        if jwt is None:
            return _NO_JWT
        found = resolve_claim(jwt.claims, parts)
        if isinstance(found, str):
            return None if found in allowed else other
        if isinstance(found, list):
            if any(isinstance(item, str) and item in allowed for item in found):
                return None
            return other
        return missing if found is MISSING else other

    return Condition(key, test)


def _flatten_claims(value: Any, prefix: tuple[str, ...]) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(value, Mapping):
        if not value:
            raise RuleError(f"'when.jwt_claims.{'.'.join(prefix)}' is empty", "when.jwt_claims")
        out: list[tuple[tuple[str, ...], Any]] = []
        for name, sub in value.items():
            out.extend(_flatten_claims(sub, (*prefix, *str(name).split("."))))
        return out
    return [(prefix, value)]


def compile_when(raw: Any) -> tuple[Condition, ...]:
    """A rule's ``when`` table → its conditions, cheap and often decisive ones first.

    Raises :class:`RuleError` naming the condition at fault.
    """
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
                if len(parts) > MAX_CLAIM_PARTS or any(not p for p in parts):
                    raise RuleError(f"'{claim_key}' is not a usable claim path", claim_key)
                conditions.append(_claim_condition(claim_key, parts, expected))
        else:
            raise RuleError(
                f"unknown condition '{key}' (expected one of: {', '.join(WHEN_KEYS)})", key
            )
    order = {"when.unix_uid": 0, "when.unix_gid": 1, "when.jwt_sub": 2, "when.jwt_iss": 3}
    conditions.sort(key=lambda c: order.get(c.key, 9))
    return tuple(conditions)
