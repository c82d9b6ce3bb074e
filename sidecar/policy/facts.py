"""What a policy can read about a caller: the proven facts of an ``Identity``.

A fact the caller did not prove (no JWT, no Unix peer, no SPIFFE ID, an empty subject, a missing
claim) reads as ``None``. Claim paths reach into nested objects with dots; a key that itself
contains dots is found too, so ``kubernetes.io.namespace`` reads
``claims["kubernetes.io"]["namespace"]`` of a Kubernetes projected service-account token. A path
that names two claims of one token (``{"a.b": 1, "a": {"b": 2}}`` for ``a.b``) reads as missing:
a claim a token's subject could add can never stand in for the nested one a rule meant.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from sidecar.identity import Identity

MISSING: Final = object()
"""What :func:`resolve_claim` returns for a claim that is not there (``None`` is a JSON value)."""


def resolve_claim(claims: Mapping[str, Any], parts: Sequence[str]) -> Any:
    """The claim at dotted ``parts``, or ``MISSING``.

    ``parts`` may be grouped into names that contain dots (``kubernetes.io``): every grouping is
    tried against the names the token has, and the path resolves only when exactly one reaches a
    value. Two (a top-level ``"kubernetes.io.namespace"`` beside the nested one) mean ``MISSING``.
    """
    found: list[Any] = []
    _collect(claims, tuple(parts), 0, found)
    return found[0] if len(found) == 1 else MISSING


def _collect(node: Mapping[str, Any], parts: tuple[str, ...], start: int, found: list[Any]) -> None:
    """Append to ``found`` what each grouping of ``parts[start:]`` reaches; stop at two."""
    for end in range(len(parts), start, -1):
        if len(found) > 1:
            return
        name = parts[start] if end == start + 1 else ".".join(parts[start:end])
        if name in node:
            value = node[name]
            if end == len(parts):
                found.append(value)
            elif isinstance(value, Mapping):
                _collect(value, parts, end, found)


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
