"""What a route is: the entries of the route table and the values its handlers take and give.

A guarded :class:`Route` names its policy ``operation`` and says how to read the facts the
policy needs from a request or batch item (its ``scope``); the pipeline
(:mod:`sidecar.server.pipeline`) authorizes each item with them, runs ``handler`` for it, and
audits, counts and traces the decision under that operation. An :class:`Unguarded` route is
answered without authentication, policy or audit; only the paths in ``UNGUARDED`` may be one.

Handlers never see HTTP details they don't need: they get the request-wide :class:`HandlerCall`,
the item's :class:`~sidecar.policy.authorizer.AccessRequest` (already allowed), the item and the
body's top level, and return a :class:`Done`: the data to answer and the key facts for the audit
record.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from aiohttp import web

from sidecar.policy.authorizer import AccessRequest
from sidecar.server import fields
from sidecar.server.services import Services

#: The methods of a write: Vault clients send POST or PUT.
WRITE = ("POST", "PUT")


class HandlerCall(NamedTuple):
    """The request-wide facts a handler may use; the same for every item of a batch."""

    services: Services
    request: web.Request
    request_id: str
    #: The trace the request belongs to (its span's, or the caller's ``traceparent``).
    trace_id: str | None


class Done(NamedTuple):
    """What one handled item gives back. Never holds what the audit log must not see apart from
    ``data``, which only goes to the caller.

    ``data`` goes into Vault's envelope (or, with its ``reference`` added, a batch result: so it is
    a dict made for this item alone); ``response``, when set, is sent as is
    instead (for bodies that are not Vault-shaped, such as a JWKS). ``root_version`` and
    ``kek_id`` are what the audit record and span say was used.
    """

    data: dict[str, Any]
    root_version: int | None = None
    kek_id: bytes | None = None
    response: web.Response | None = None


class Scope(NamedTuple):
    """What the policy needs from one item besides the caller and the operation.

    ``key`` is read only on routes without a ``{name}`` in the path (on the others it is the
    path's).
    """

    context: Mapping[str, str] | None = None
    ttl: float | None = None
    key: str | None = None


NO_SCOPE = Scope()

#: ``(call, access, item, body)``: ``item`` is the batch item, or the body of a single request;
#: ``body`` is the request's top level (Vault's request-wide options for a batch).
ItemHandler = Callable[
    [HandlerCall, AccessRequest, Mapping[str, Any], Mapping[str, Any]], Awaitable[Done]
]
ScopeReader = Callable[[Mapping[str, Any]], Scope]


def no_scope(item: Mapping[str, Any]) -> Scope:
    """For operations the policy decides from the caller, key and operation alone."""
    return NO_SCOPE


def context_scope(item: Mapping[str, Any]) -> Scope:
    """The item's ``encryption_context``."""
    return Scope(fields.context_field(item))


def context_ttl_scope(item: Mapping[str, Any]) -> Scope:
    """The item's ``encryption_context`` and ``ttl`` (which a rule's ``max_ttl`` bounds)."""
    return Scope(fields.context_field(item), fields.ttl_field(item))


def key_name(access: AccessRequest) -> str:
    """The key of a request to a keyed route (one with ``{name}`` in its path)."""
    assert access.key is not None, "a keyed route always has a key"
    return access.key


@dataclass(frozen=True, slots=True)
class Route:
    """A guarded entry of the route table: every fact about the route, declared once.

    ``operation`` is what the policy check, the audit record, the metric and the span see.
    ``batch`` routes accept ``batch_input``: each item is then decided on its own. ``intent``
    writes an ``allowed`` audit record before ``handler`` runs, for operations with an effect
    outside the sidecar (a root-key rotation), so the effect never happens unaudited.
    """

    methods: tuple[str, ...]
    path: str
    operation: str
    handler: ItemHandler
    scope: ScopeReader = no_scope
    batch: bool = False
    intent: bool = False

    @property
    def keyed(self) -> bool:
        """Whether the key is the path's ``{name}`` (else the scope's, or none)."""
        return "{name}" in self.path


@dataclass(frozen=True, slots=True)
class Unguarded:
    """An entry answered without authentication, policy or audit; ``reason`` says why."""

    methods: tuple[str, ...]
    path: str
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    reason: str
