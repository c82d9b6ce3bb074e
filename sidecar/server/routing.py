"""What every route shares: services, the request's facts, keyed calls, route-table entries.

:func:`keyed` turns an item handler into a route handler that authorizes and runs it for the
request, or for each item of a ``batch_input``. Handlers record what they did in the request's
:class:`Facts`, which become its audit record and span attributes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from sidecar.audit import AuditLog, AuditRecord, audit_record
from sidecar.config import Config
from sidecar.errors import SidecarError
from sidecar.identity import Identity
from sidecar.keys.keyring import Keyring
from sidecar.keys.signing import Signer
from sidecar.policy import permission_denied
from sidecar.server import fields
from sidecar.telemetry import Metrics


class Authenticator(Protocol):
    """Turns a request's credentials into an :class:`Identity`; raises ``Unauthenticated``."""

    async def identify(self, connection: Identity, token: str | None) -> Identity:
        """``connection`` holds what the socket proved (peer credentials, client certificate)."""
        ...


class Authorizer(Protocol):
    """Allows or refuses one operation; raises ``PermissionDenied`` or ``RateLimited``.

    Returns the name of the rule that allowed it, for the audit trail.
    """

    def authorize(
        self,
        identity: Identity,
        *,
        key: str | None,
        operation: str,
        context: Mapping[str, str] | None = None,
        ttl: float | None = None,
    ) -> str: ...


@dataclass(frozen=True, slots=True)
class Services:
    """What handlers use, kept in the app under :data:`SERVICES`."""

    config: Config
    keyring: Keyring
    authenticator: Authenticator
    authorizer: Authorizer
    metrics: Metrics
    #: ``None`` when ``audit.path`` is empty.
    audit: AuditLog | None = None
    #: Whether spans are recorded (an exporter is configured, or a provider was installed).
    tracing: bool = False
    #: Signs and verifies with asymmetric keys; caches their public keys.
    signer: Signer | None = None


SERVICES = web.AppKey("services", Services)
IDENTITY = web.RequestKey("identity", Identity)
REQUEST_ID = web.RequestKey("request_id", str)


@dataclass(slots=True)
class Facts:
    """What one request did, for its audit record and span. Never key bytes or plaintext."""

    operation: str | None = None
    key: str | None = None
    rule: str | None = None
    context: Mapping[str, str] | None = None
    root_version: int | None = None
    kek_id: bytes | None = None
    #: Why a blob did not open; told to the audit log and trace only, never to the caller.
    cause: str | None = None
    trace_id: str | None = None

    def sealed(self, root_version: int | None, kek_id: bytes | None) -> None:
        self.root_version = root_version
        self.kek_id = kek_id  # hex only when a record or span is written


FACTS = web.RequestKey("facts", Facts)


@dataclass(slots=True)
class Call:
    """One authenticated request to a keyed route."""

    services: Services
    identity: Identity
    key: str
    operation: str
    facts: Facts
    request: web.Request

    async def audit_effect(self) -> None:
        """Write an ``allowed`` record before an operation with a lasting effect."""
        await audit_effect(self.request)

    def authorize(self, context: Mapping[str, str] | None = None, ttl: float | None = None) -> str:
        """The allowing rule's name. An unknown key is refused exactly like a forbidden one."""
        self.facts.context = context
        rule = self.services.authorizer.authorize(
            self.identity, key=self.key, operation=self.operation, context=context, ttl=ttl
        )
        self.facts.rule = rule
        if not self.services.keyring.has_key(self.key):
            raise permission_denied(self.operation, self.key)
        return rule


def call_for(request: web.Request, operation: str) -> Call:
    """The :class:`Call` of a request to a route with a ``{name}`` (the key) in its path."""
    return Call(
        request.app[SERVICES],
        request[IDENTITY],
        request.match_info["name"],
        operation,
        request[FACTS],
        request,
    )


ItemHandler = Callable[[Call, Mapping[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Route:
    """One entry of the route table. ``operation`` is what the policy check sees."""

    methods: tuple[str, ...]
    path: str
    handler: Callable[[web.Request], Awaitable[web.Response]]
    operation: str | None


WRITE = ("POST", "PUT")


def keyed(
    operation: str, run: ItemHandler, *, batch: bool
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A route handler that authorizes and runs ``run`` for the request, or each batch item."""

    async def handler(request: web.Request) -> web.Response:
        services = request.app[SERVICES]
        call = call_for(request, operation)
        body = fields.parse_body(await request.read()) if request.can_read_body else {}
        items = fields.batch_items(body, services.config.server.max_batch_items) if batch else None
        if items is None:
            return data_response(request, await run(call, body))
        results = []
        for item in items:
            try:
                results.append(await run(call, item))
            except SidecarError as exc:
                results.append({"error": exc.message, "code": exc.code})
        return data_response(request, {"batch_results": results})

    handler.operation = operation  # type: ignore[attr-defined]
    return handler


def new_request_id() -> str:
    """A random UUID (version 4), formatted without the ``uuid`` module's overhead."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


#: One compact encoder, made once (``json.dumps`` with options builds a new one per call).
_to_json = json.JSONEncoder(separators=(",", ":")).encode
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}
_ENVELOPE = (
    '{{"request_id":"{}","lease_id":"","renewable":false,"lease_duration":0,"data":{},'
    '"wrap_info":null,"warnings":null,"auth":null}}'
)


def data_response(request: web.Request, data: Mapping[str, Any]) -> web.Response:
    """Vault's response envelope around ``data``."""
    body = _ENVELOPE.format(request[REQUEST_ID], _to_json(data))
    return web.Response(body=body.encode(), content_type="application/json")


#: Error codes that mean "not allowed" in the audit log; every other error is an "error".
DENIALS = frozenset({"unauthenticated", "permission_denied", "rate_limited"})


def audit_record_for(
    request: web.Request, facts: Facts, error: SidecarError | None, *, outcome: str | None = None
) -> AuditRecord:
    if outcome is None:
        outcome = "ok" if error is None else "denied" if error.code in DENIALS else "error"
    return audit_record(
        time=time.time(),
        request_id=request[REQUEST_ID],
        trace_id=facts.trace_id,
        identity=request.get(IDENTITY),
        rule=facts.rule,
        operation=facts.operation or "none",
        key=facts.key,
        root_version=facts.root_version,
        kek_id=facts.kek_id.hex() if facts.kek_id else None,
        outcome=outcome,
        error_code=None if error is None else error.code,
        context=facts.context,
        hmac_key=request.app[SERVICES].audit.hmac_key,  # type: ignore[union-attr]
        cause=facts.cause,
    )


async def audit_effect(request: web.Request) -> None:
    """Write an ``allowed`` record before an operation with a lasting effect (a rotation)."""
    services = request.app[SERVICES]
    if services.audit is not None:
        await services.audit.write(
            audit_record_for(request, request[FACTS], None, outcome="allowed")
        )
