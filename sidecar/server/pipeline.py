"""The request path, top to bottom: identify → authenticate → handle → audit → observe.

``build_app`` wraps each guarded :class:`~sidecar.server.routes.Route` of the table once, with
:meth:`Pipeline.serve`; requests that match no route take the same path with the operation
``none`` (:meth:`Pipeline.unmatched`, the table's last, catch-all route: no middleware runs on
the hot path). For one request:

1. **identify** the connection: its Unix peer credentials or verified client certificate, read
   when its first request arrives and kept for the connection's life
   (:class:`~sidecar.transport.identities.ConnectionIdentities`);
2. **authenticate**: add what a bearer token proves (``Authenticator.identify``; 401 if bad);
3. **handle**: refuse ``X-Vault-Wrap-TTL``, read the body, then decide each item — the request,
   or each item of a ``batch_input`` — on its own (:func:`_decide`): read its scope, authorize
   one :class:`~sidecar.policy.authorizer.AccessRequest`, run the route's handler. Each decision
   ends as one immutable :class:`Outcome`;
4. **audit**: one record per outcome (a batch item's carries ``batch_index``), durable before
   the answer when ``audit.fail_closed``;
5. **observe**: the request's latency and each decision counted under the route's operation;
   the span (if tracing) ends, with an event per audit record, and the OTel context is
   detached on every exit path.

Errors become Vault-shaped answers here only: a :class:`~sidecar.errors.SidecarError` by its
code, aiohttp's 404/405/413 mapped to ours, anything else ``internal`` (logged, never told).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple

from aiohttp import web
from aiohttp.http_exceptions import PayloadEncodingError
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from sidecar.audit import AuditRecord, audit_record
from sidecar.errors import (
    AuditUnavailable,
    DecryptionFailed,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    SidecarError,
    Unauthenticated,
    UnknownPath,
)
from sidecar.identity import ANONYMOUS, Identity
from sidecar.policy import permission_denied
from sidecar.policy.authorizer import AccessRequest
from sidecar.server import fields
from sidecar.server.errors import error_response, status_for, to_json
from sidecar.server.routes import Done, HandlerCall, Route
from sidecar.server.services import Services
from sidecar.telemetry import request_id_var, trace_id_hex
from sidecar.tracing import tracer
from sidecar.transport.identities import ConnectionIdentities

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Error codes that mean "not allowed" in the audit log; every other error is an "error".
DENIALS = frozenset({"unauthenticated", "permission_denied", "rate_limited"})

#: The operation of a request that matched no route.
NO_OPERATION = "none"

_HTTP_ERRORS: dict[int, type[SidecarError]] = {
    404: UnknownPath,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


class Outcome(NamedTuple):
    """How one decision ended — a request, or one item of a batch. Immutable; becomes one audit
    record, one counted decision and one span event.

    ``access`` is ``None`` when the request or item failed before its scope was read; ``rule``
    names the rule that allowed or refused (``None``: none did, or no check was reached);
    ``closed`` marks a caller that went away mid-body.
    """

    access: AccessRequest | None
    rule: str | None
    done: Done | None
    error: SidecarError | None
    #: ``(index, size)`` for an item of a ``batch_input``.
    batch: tuple[int, int] | None = None
    closed: bool = False

    @property
    def audit_outcome(self) -> str:
        if self.error is not None:
            return "denied" if self.error.code in DENIALS else "error"
        return "client_closed" if self.closed else "ok"

    @property
    def code(self) -> str:
        """``ok``, ``client_closed`` or the error code: the metric's outcome label."""
        if self.error is not None:
            return self.error.code
        return "client_closed" if self.closed else "ok"


class ClientClosed(Exception):
    """The caller disconnected before its request body was read whole."""


class Pipeline:
    """The request path for one app: its services and the identities of open connections."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.connections = ConnectionIdentities()

    def serve(self, route: Route) -> Handler:
        """The aiohttp handler of ``route``: the whole pipeline around its item handler."""

        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, route)

        return handler

    async def unmatched(self, request: web.Request) -> web.StreamResponse:
        """The handler of the catch-all route: answers a request no other route takes (404, or
        405 when its path is served with other methods) through the same pipeline."""
        return await self._serve(request, None)

    async def _serve(self, request: web.Request, route: Route | None) -> web.StreamResponse:
        services = self.services
        operation = NO_OPERATION if route is None else route.operation
        request_id = new_request_id()
        started = time.perf_counter()
        log_token = request_id_var.set(request_id)
        span = _start_span(request, operation) if services.tracing else None
        span_token = otel_context.attach(trace.set_span_in_context(span)) if span else None
        trace_id = trace_id_hex(span) if span else _incoming_trace_id(request)
        path_key = request.match_info.get("name")
        identity = ANONYMOUS
        outcomes: Sequence[Outcome] = ()
        try:
            # 1. identify the connection
            identity = self.connections.identity(request.transport)
            try:
                # 2. authenticate
                identity = await services.authenticator.identify(identity, _bearer(request))
                # 3. handle
                if route is None:
                    raise await _no_route(request)
                call = HandlerCall(services, request, request_id, trace_id)
                response, outcomes = await _handle(call, route, identity, path_key)
            except ClientClosed:
                response = error_response(InvalidRequest(), request_id)  # nobody reads it
                outcomes = (Outcome(None, None, None, None, closed=True),)
            except Exception as exc:  # the request as a whole failed: one decision
                error = _sidecar_error(exc, request, services)
                response = _error_response(error, exc, request_id)
                outcomes = (Outcome(None, None, None, error),)
            # 4. audit
            failure = (
                None
                if services.audit is None
                else await _audit(
                    services, request_id, trace_id, identity, operation, path_key, outcomes
                )
            )
            if failure is not None:
                response = error_response(failure, request_id)
                outcomes = [o._replace(done=None, error=failure) for o in outcomes]
            # 5. observe
            metrics = services.metrics
            for outcome in outcomes:
                metrics.decided(operation, outcome.code)
            metrics.observe(operation, _request_code(outcomes), time.perf_counter() - started)
            return response
        finally:
            if span is not None and span_token is not None:
                _end_span(span, request_id, operation, path_key, identity, outcomes)
                otel_context.detach(span_token)
            request_id_var.reset(log_token)


# -- 1. identify the connection: ConnectionIdentities, in sidecar.transport.identities ------


# -- 2. authenticate -----------------------------------------------------------------------


def _bearer(request: web.Request) -> str | None:
    """The token in ``Authorization: Bearer`` or ``X-Vault-Token``.

    Any other ``Authorization`` scheme is refused rather than ignored: a credential the caller
    meant to present never silently falls back to the peer credentials.
    """
    headers = request.headers
    auth = headers.get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthenticated(
                f"The Authorization scheme {scheme[:20]!r} is not supported; use 'Bearer <jwt>'."
            )
        return token.strip() or ""
    return headers.get("X-Vault-Token") or None


# -- 3. handle -----------------------------------------------------------------------------


async def _handle(
    call: HandlerCall, route: Route, identity: Identity, path_key: str | None
) -> tuple[web.StreamResponse, Sequence[Outcome]]:
    """The answer to an authenticated request and how each of its decisions ended."""
    request, services = call.request, call.services
    if "X-Vault-Wrap-TTL" in request.headers:
        raise InvalidRequest(
            "The X-Vault-Wrap-TTL header asks for response wrapping, which this sidecar does not "
            "offer; send the request without it."
        )
    body = fields.parse_body(await _read(request)) if request.can_read_body else {}
    limit = services.config.server.max_batch_items
    items = fields.batch_items(body, limit) if route.batch else None
    if items is None:
        outcome = await _decide(call, route, identity, path_key, body, body, None)
        if outcome.error is not None:
            return error_response(outcome.error, call.request_id), (outcome,)
        done = outcome.done
        assert done is not None
        return done.response or data_response(call.request_id, done.data), (outcome,)
    override = fields.status_code_field(body, "partial_failure_response_code")
    size = len(items)
    outcomes = [
        await _decide(call, route, identity, path_key, body, item, (index, size))
        for index, item in enumerate(items)
    ]
    results = [_batch_result(item, outcome) for item, outcome in zip(items, outcomes, strict=True)]
    status = _batch_status(outcomes, override)
    return data_response(call.request_id, {"batch_results": results}, status), outcomes


async def _no_route(request: web.Request) -> web.HTTPException:
    """404, or 405 naming the methods of the routes whose path matches (aiohttp's own
    answers, which the catch-all route takes the place of)."""
    catch_all = request.match_info.route.resource
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not catch_all:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        return web.HTTPMethodNotAllowed(request.method, allowed)
    return web.HTTPNotFound()


async def _read(request: web.Request) -> bytes:
    """The whole body; :class:`ClientClosed` when the caller goes away before sending it."""
    content = request.content
    try:
        if content.is_eof():  # it has all arrived (a small request does): take it as is
            body = content.read_nowait()
            if len(body) > request.client_max_size:
                raise web.HTTPRequestEntityTooLarge(request.client_max_size, len(body))
            return body
        return await request.read()
    except ConnectionError as exc:  # aiohttp's "Connection lost" mid-body
        raise ClientClosed from exc
    except PayloadEncodingError as exc:  # the stream ended short of its Content-Length
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ClientClosed from exc
        raise


async def _decide(
    call: HandlerCall,
    route: Route,
    identity: Identity,
    path_key: str | None,
    body: Mapping[str, Any],
    item: Mapping[str, Any],
    batch: tuple[int, int] | None,
) -> Outcome:
    """Authorize and run one item: read its scope, check the policy, run the handler.

    ``body`` is the request's top level (the item itself when there is no batch).
    """
    services = call.services
    try:
        scope = route.scope(item)
    except SidecarError as exc:
        return Outcome(None, None, None, exc, batch)
    key = path_key if path_key is not None else scope.key
    access = AccessRequest(identity, key, route.operation, scope.context, scope.ttl)
    try:
        rule = services.authorizer.authorize(access)
    except (PermissionDenied, RateLimited) as exc:
        return Outcome(access, exc.rule, None, exc, batch)
    if key is not None and not services.keyring.has_key(key):
        # refused exactly like a forbidden key, so names can't be probed
        return Outcome(access, None, None, permission_denied(route.operation, key), batch)
    try:
        if route.intent:
            await _write_intent(call, access, rule, batch)
        done = await route.handler(call, access, item, body)
    except PermissionDenied:  # a root key missing upstream answers like a forbidden key
        return Outcome(access, rule, None, permission_denied(route.operation, key), batch)
    except SidecarError as exc:
        return Outcome(access, rule, None, exc, batch)
    except Exception:
        log.exception("internal error in %s %s", call.request.method, call.request.path)
        return Outcome(access, rule, None, InternalError(), batch)
    return Outcome(access, rule, done, None, batch)


def _batch_result(item: Mapping[str, Any], outcome: Outcome) -> dict[str, Any]:
    """One entry of ``batch_results``: the item's data or error, and its ``reference`` (``""``
    when it sent none, as OpenBao answers)."""
    error, done = outcome.error, outcome.done
    if error is not None:
        result: dict[str, Any] = {"error": error.message, "code": error.code}
    else:
        assert done is not None
        result = done.data  # made for this item alone (see Done)
    reference = item.get("reference")
    result["reference"] = "" if reference is None else reference
    return result


def _batch_status(outcomes: Sequence[Outcome], override: int | None) -> int:
    """Vault's status for a batch: 200 if every item succeeded; else 400 when an item failed by
    the caller's fault (or, with only server-side failures, the first one's status) — unless
    some item succeeded and ``override`` (``partial_failure_response_code``) names another.
    """
    failed = [o.error for o in outcomes if o.error is not None]
    if not failed:
        return 200
    statuses = [status_for(error) for error in failed]
    status = 400 if any(s < 500 for s in statuses) else statuses[0]
    if override is not None and len(failed) < len(outcomes):
        return override
    return status


# -- 4. audit ------------------------------------------------------------------------------


async def _audit(
    services: Services,
    request_id: str,
    trace_id: str | None,
    identity: Identity,
    operation: str,
    path_key: str | None,
    outcomes: Sequence[Outcome],
) -> SidecarError | None:
    """Write one record per outcome; the error that refuses the answer if they can't be."""
    audit = services.audit
    assert audit is not None
    now = time.time()
    records = [
        _record(services, now, request_id, trace_id, identity, operation, path_key, outcome)
        for outcome in outcomes
    ]
    try:
        if len(records) == 1:
            await audit.write(records[0])
        else:
            await audit.write_all(records)
    except AuditUnavailable as exc:
        return exc
    except Exception:  # a bug: the answer must not go out unaudited
        log.exception("the audit records of request %s could not be written", request_id)
        return InternalError()
    return None


def _record(
    services: Services,
    now: float,
    request_id: str,
    trace_id: str | None,
    identity: Identity,
    operation: str,
    path_key: str | None,
    outcome: Outcome,
    *,
    audit_outcome: str | None = None,
) -> AuditRecord:
    access, done, error = outcome.access, outcome.done, outcome.error
    batch = outcome.batch
    assert services.audit is not None
    return audit_record(
        time=now,
        request_id=request_id,
        trace_id=trace_id,
        identity=identity,
        rule=outcome.rule,
        operation=operation,
        key=access.key if access is not None else path_key,
        root_version=done.root_version if done is not None else None,
        kek_id=done.kek_id.hex() if done is not None and done.kek_id else None,
        outcome=audit_outcome or outcome.audit_outcome,
        error_code=None if error is None else error.code,
        context=access.context if access is not None else None,
        hmac_key=services.audit.hmac_key,
        cause=error.cause if isinstance(error, DecryptionFailed) else None,
        batch_index=None if batch is None else batch[0],
        batch_size=None if batch is None else batch[1],
    )


async def _write_intent(
    call: HandlerCall, access: AccessRequest, rule: str, batch: tuple[int, int] | None
) -> None:
    """An ``allowed`` record before an operation with a lasting effect (a root-key rotation)."""
    services = call.services
    if services.audit is None:
        return
    outcome = Outcome(access, rule, None, None, batch)
    await services.audit.write(
        _record(
            services,
            time.time(),
            call.request_id,
            call.trace_id,
            access.identity,
            access.operation,
            access.key,
            outcome,
            audit_outcome="allowed",
        )
    )


# -- 5. observe ----------------------------------------------------------------------------


def _request_code(outcomes: Sequence[Outcome]) -> str:
    """The request's metric outcome: ``ok`` if every decision was, else the first other one."""
    for outcome in outcomes:
        if outcome.error is not None or outcome.closed:
            return outcome.code
    return "ok"


def _start_span(request: web.Request, operation: str) -> trace.Span:
    parent = propagate.extract(request.headers)
    return tracer.start_span(f"kms {operation}", context=parent, kind=trace.SpanKind.SERVER)


def _end_span(
    span: trace.Span,
    request_id: str,
    operation: str,
    path_key: str | None,
    identity: Identity | None,
    outcomes: Sequence[Outcome],
) -> None:
    """Span attributes from the first decision, an ``audit`` event per decision, then end."""
    code = _request_code(outcomes) if outcomes else "internal"
    kind = identity.kind if identity else "anonymous"
    first: dict[str, Any] | None = None
    for outcome in outcomes:
        attributes = _span_facts(request_id, operation, path_key, kind, outcome)
        span.add_event("audit", attributes)
        first = first or attributes
    if first is None:
        first = {
            "kms.request_id": request_id,
            "kms.operation": operation,
            "kms.key": path_key or "",
        }
    span.set_attributes({**first, "kms.outcome": code, "kms.decisions": len(outcomes)})
    if code != "ok":
        span.set_status(trace.StatusCode.ERROR, code)
    span.end()


def _span_facts(
    request_id: str, operation: str, path_key: str | None, kind: str, outcome: Outcome
) -> dict[str, Any]:
    access, done = outcome.access, outcome.done
    attributes: dict[str, Any] = {
        "kms.request_id": request_id,
        "kms.operation": operation,
        "kms.key": (access.key if access is not None else path_key) or "",
        "kms.outcome": outcome.code,
        "kms.identity.kind": kind,
        "kms.rule": outcome.rule or "",
    }
    if outcome.batch is not None:
        attributes["kms.batch_index"] = outcome.batch[0]
    if done is not None and done.root_version is not None:
        attributes["kms.root_version"] = done.root_version
    if done is not None and done.kek_id is not None:
        attributes["kms.kek_id"] = done.kek_id.hex()
    return attributes


def _incoming_trace_id(request: web.Request) -> str | None:
    """The trace id of a valid W3C ``traceparent``, so audit records join the caller's trace."""
    header = request.headers.get("traceparent")
    if not header:
        return None
    parts = header.split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        try:
            int(parts[1], 16)
        except ValueError:
            return None
        return parts[1].lower()
    return None


# -- answers -------------------------------------------------------------------------------


def _sidecar_error(exc: Exception, request: web.Request, services: Services) -> SidecarError:
    """``exc`` as the error the caller is told: ours as is, aiohttp's mapped, others internal."""
    if isinstance(exc, SidecarError):
        return exc
    if isinstance(exc, web.HTTPException):
        mapped = _HTTP_ERRORS.get(exc.status)
        if mapped is PayloadTooLarge:
            limit = services.config.server.max_body_bytes
            return PayloadTooLarge(f"The request body exceeds {limit} bytes.")
        if mapped is not None:
            return mapped()
    log.exception("internal error in %s %s", request.method, request.path, exc_info=exc)
    return InternalError()


def _error_response(error: SidecarError, exc: Exception, request_id: str) -> web.Response:
    response = error_response(error, request_id)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    return response


def data_response(request_id: str, data: Mapping[str, Any], status: int = 200) -> web.Response:
    """Vault's response envelope around ``data``."""
    body = _ENVELOPE % (request_id.encode(), to_json(data))
    return web.Response(body=body, status=status, content_type="application/json")


_ENVELOPE = (
    b'{"request_id":"%s","lease_id":"","renewable":false,"lease_duration":0,"data":%s,'
    b'"wrap_info":null,"warnings":null,"auth":null}'
)


def new_request_id() -> str:
    """A random UUID (version 4), formatted without the ``uuid`` module's overhead."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
