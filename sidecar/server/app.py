"""The aiohttp application: every route, one middleware, Vault-shaped bodies.

Every route is declared in :data:`ROUTES` with the policy operation it performs. The middleware
authenticates each request; each keyed handler authorizes each item (of a batch, too) before it
runs. A route without an operation is refused at build time unless it is in :data:`UNGUARDED`.
"""

from __future__ import annotations

import base64
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from sidecar.backends.base import TRANSIT_TYPES
from sidecar.errors import (
    AuditUnavailable,
    DecryptionFailed,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    SidecarError,
    Unauthenticated,
    UnknownPath,
)
from sidecar.identity import ANONYMOUS, Identity
from sidecar.policy import permission_denied
from sidecar.server import fields
from sidecar.server.errors import error_response
from sidecar.server.peer import read_peer_credentials
from sidecar.server.routing import (
    FACTS,
    IDENTITY,
    REQUEST_ID,
    SERVICES,
    WRITE,
    Call,
    Facts,
    Route,
    Services,
    audit_record_for,
    data_response,
    keyed,
    new_request_id,
)
from sidecar.server.signing import SIGNING_ROUTES
from sidecar.server.tls import tls_peer
from sidecar.telemetry import request_id_var, trace_id_hex, tracer

log = logging.getLogger(__name__)

#: Routes reachable without authentication or a policy check, by explicit choice.
UNGUARDED = frozenset({"/v1/sys/health", "/metrics"})


# -- keyed operations (each runs once per item of a batch) ---------------------------------


async def _datakey(call: Call, item: Mapping[str, Any]) -> dict[str, Any]:
    context, ttl = fields.context_field(item), fields.ttl_field(item)
    call.authorize(context, ttl)
    key = await call.services.keyring.generate_data_key(
        call.key,
        bits=fields.bits_field(item),
        context=context,
        associated_data=fields.base64_field(item, "associated_data"),
        ttl=ttl,
    )
    call.facts.sealed(key.root_version, key.kek_id)
    data: dict[str, Any] = {
        "ciphertext": key.blob,
        "key_version": key.root_version,
        "expires_at": key.expires_at,
    }
    if call.operation == "datakey":
        data["plaintext"] = base64.b64encode(key.plaintext).decode()
    return data


async def _encrypt(call: Call, item: Mapping[str, Any]) -> dict[str, Any]:
    context, ttl = fields.context_field(item), fields.ttl_field(item)
    plaintext = fields.plaintext_field(item, call.services.config.server.max_plaintext_bytes)
    call.authorize(context, ttl)
    sealed = await call.services.keyring.encrypt(
        call.key,
        plaintext,
        context=context,
        associated_data=fields.base64_field(item, "associated_data"),
        ttl=ttl,
    )
    call.facts.sealed(sealed.root_version, sealed.kek_id)
    return {
        "ciphertext": sealed.blob,
        "key_version": sealed.root_version,
        "expires_at": sealed.expires_at,
    }


async def _decrypt(call: Call, item: Mapping[str, Any]) -> dict[str, Any]:
    context = fields.context_field(item)
    ciphertext = fields.string_field(item, "ciphertext")
    call.authorize(context)
    opened = await call.services.keyring.open_blob(
        call.key,
        ciphertext,
        context=context,
        associated_data=fields.base64_field(item, "associated_data"),
    )
    call.facts.sealed(opened.root_version, opened.kek_id)
    return {"plaintext": base64.b64encode(opened.plaintext).decode()}


async def _rewrap(call: Call, item: Mapping[str, Any]) -> dict[str, Any]:
    context = fields.context_field(item)
    ciphertext = fields.string_field(item, "ciphertext")
    call.authorize(context)
    sealed = await call.services.keyring.rewrap(
        call.key,
        ciphertext,
        context=context,
        associated_data=fields.base64_field(item, "associated_data"),
    )
    call.facts.sealed(sealed.root_version, sealed.kek_id)
    return {"ciphertext": sealed.blob, "key_version": sealed.root_version}


async def _read_key(call: Call, item: Mapping[str, Any]) -> dict[str, Any]:
    call.authorize()
    info = await call.services.keyring.key_info(call.key)
    return _key_metadata(call, info)


async def _rotate(call: Call, item: Mapping[str, Any]) -> dict[str, Any]:
    call.authorize()
    await call.audit_effect()  # the rotation must never happen unaudited
    info = await call.services.keyring.rotate(call.key)
    call.facts.root_version = info.latest_version
    return _key_metadata(call, info)


def _key_metadata(call: Call, info: Any) -> dict[str, Any]:
    keyring = call.services.keyring
    symmetric = info.key_type == "aes256"
    versions = range(info.min_decryption_version, info.latest_version + 1)
    return {
        "name": call.key,
        "type": TRANSIT_TYPES.get(info.key_type, info.key_type),
        "latest_version": info.latest_version,
        "min_decryption_version": info.min_decryption_version,
        "min_encryption_version": 0,
        "keys": {
            str(v): {"public_key": info.public_keys[v]} if v in info.public_keys else 1
            for v in versions
        },
        "supports_encryption": symmetric,
        "supports_decryption": symmetric,
        "supports_derivation": False,
        "supports_signing": not symmetric,
        "exportable": False,
        "deletion_allowed": bool(info.extra.get("deletion_allowed", False)),
        "backend": keyring.backend.kind,
        "root_key": info.name,
        "kek": keyring.status().as_json()["keys"][call.key],
    }


# -- sidecar routes ------------------------------------------------------------------------


async def _status(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    request[FACTS].rule = services.authorizer.authorize(
        request[IDENTITY], key=None, operation="status"
    )
    audit = services.audit
    body = {
        "version": _version(),
        "backend": dict(services.keyring.backend.status()),
        **services.keyring.status().as_json(),
        "audit": None
        if audit is None
        else {
            "path": audit.path,
            "healthy": audit.healthy,
            "head": audit.head,
            "head_seq": audit.head_seq,
            "last_error": audit.last_error,
        },
    }
    return data_response(request, body)


async def _flush(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    body = fields.parse_body(await request.read()) if request.can_read_body else {}
    key = body.get("key")
    if key is not None and not isinstance(key, str):
        raise InvalidRequest("Field 'key' must be a key name.")
    facts = request[FACTS]
    facts.key = key
    facts.rule = services.authorizer.authorize(request[IDENTITY], key=key, operation="flush")
    if key is not None and not services.keyring.has_key(key):
        raise permission_denied("flush", key)
    dropped = services.keyring.flush(key)
    log.info("cache flushed for %s: %d KEKs dropped", key or "all keys", dropped)
    return data_response(request, {"flushed": key or "*", "keks_dropped": dropped})


async def _health(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    keyring = services.keyring
    keys = {name: keyring.key_state(name) for name in keyring.key_names()}
    upstream = dict(keyring.backend.status())
    ready = bool(keys) and any(state != "unavailable" for state in keys.values())
    body = {
        "initialized": True,
        "sealed": False,
        "standby": False,
        "ready": ready,
        "version": _version(),
        "keys": keys,
        "upstream": {
            "kind": upstream.get("kind"),
            "state": upstream.get("state"),
            "auth": (upstream.get("auth") or {}).get("state"),
        },
    }
    audit = services.audit
    if audit is not None:
        body["audit"] = {"state": "ok" if audit.healthy else "unavailable", "path": audit.path}
    if not keys:
        body["reason"] = "No keys are configured."
    elif not ready:
        body["reason"] = "No key can be issued: the key backend is unavailable."
    elif audit is not None and audit.fail_closed and not audit.healthy:
        ready = body["ready"] = False
        body["reason"] = "The audit log cannot be written, so key operations are refused."
    return web.json_response(body, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    return web.Response(
        body=services.metrics.render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


ROUTES: tuple[Route, ...] = (
    Route(
        WRITE,
        "/v1/transit/datakey/plaintext/{name}",
        keyed("datakey", _datakey, batch=True),
        "datakey",
    ),
    Route(
        WRITE,
        "/v1/transit/datakey/wrapped/{name}",
        keyed("datakey-wrapped", _datakey, batch=True),
        "datakey-wrapped",
    ),
    Route(WRITE, "/v1/transit/encrypt/{name}", keyed("encrypt", _encrypt, batch=True), "encrypt"),
    Route(WRITE, "/v1/transit/decrypt/{name}", keyed("decrypt", _decrypt, batch=True), "decrypt"),
    Route(WRITE, "/v1/transit/rewrap/{name}", keyed("rewrap", _rewrap, batch=True), "rewrap"),
    Route(("GET",), "/v1/transit/keys/{name}", keyed("read", _read_key, batch=False), "read"),
    Route(WRITE, "/v1/transit/keys/{name}/rotate", keyed("rotate", _rotate, batch=False), "rotate"),
    Route(("GET",), "/v1/sidecar/status", _status, "status"),
    Route(WRITE, "/v1/sidecar/cache/flush", _flush, "flush"),
    *SIGNING_ROUTES,
    Route(("GET", "HEAD"), "/v1/sys/health", _health, None),
    Route(("GET",), "/metrics", _metrics, None),
)


# -- middleware and responses --------------------------------------------------------------


def _bearer(request: web.Request) -> str | None:
    """The token in ``Authorization: Bearer`` or ``X-Vault-Token``.

    Any other ``Authorization`` scheme is refused rather than ignored: a credential the caller
    meant to present never silently falls back to the peer credentials.
    """
    auth = request.headers.get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthenticated(
                f"The Authorization scheme {scheme[:20]!r} is not supported; use 'Bearer <jwt>'."
            )
        return token.strip() or ""
    return request.headers.get("X-Vault-Token") or None


_SPAN_TOKEN: web.RequestKey[Any] = web.RequestKey("span_token", object)

_HTTP_ERRORS: dict[int, type[SidecarError]] = {
    404: UnknownPath,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


def _connection_identity(transport: Any) -> Identity:
    """What the connection itself proves: Unix peer credentials, or a verified client cert."""
    if transport is None:
        return ANONYMOUS
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is not None:
        return Identity(tls=tls_peer(ssl_object))
    sock = transport.get_extra_info("socket")
    return Identity(peer=read_peer_credentials(sock, connected_at=time.time()) if sock else None)


def _make_middleware(
    connections: weakref.WeakKeyDictionary[Any, Identity],
) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request_id = request[REQUEST_ID] = new_request_id()
        if request.path in UNGUARDED:
            response, _ = await _answer(request, handler)
            return response
        services = request.app[SERVICES]
        started = time.perf_counter()
        log_token = request_id_var.set(request_id)
        facts = request[FACTS] = Facts(
            operation=getattr(request.match_info.handler, "operation", None),
            key=request.match_info.get("name"),
        )
        span = _start_span(request, facts) if services.tracing else None
        facts.trace_id = trace_id_hex(span) if span else _incoming_trace_id(request)
        try:
            transport = request.transport
            try:
                connection = connections[transport]
            except KeyError:  # the first request on this connection
                connection = _connection_identity(transport)
                if transport is not None:
                    connections[transport] = connection
            request[IDENTITY] = connection
            response, error = await _answer(request, handler, authenticate=True)
            if services.audit is not None:
                try:
                    await services.audit.write(audit_record_for(request, facts, error))
                except AuditUnavailable as exc:
                    response, error = error_response(exc, request_id), exc
            outcome = "ok" if error is None else error.code
            services.metrics.observe(
                facts.operation or "none", outcome, time.perf_counter() - started
            )
            if span is not None:
                _end_span(span, request, facts, outcome)
            return response
        finally:
            request_id_var.reset(log_token)

    return middleware


async def _answer(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    *,
    authenticate: bool = False,
) -> tuple[web.StreamResponse, SidecarError | None]:
    """The handler's response, or the error response and the error it answers."""
    request_id = request[REQUEST_ID]
    try:
        if authenticate:
            services = request.app[SERVICES]
            request[IDENTITY] = await services.authenticator.identify(
                request[IDENTITY], _bearer(request)
            )
        return await handler(request), None
    except SidecarError as exc:
        if isinstance(exc, DecryptionFailed):
            request[FACTS].cause = exc.cause
        return error_response(exc, request_id), exc
    except web.HTTPException as exc:
        mapped = _HTTP_ERRORS.get(exc.status)
        if mapped is None:
            raise
        if mapped is PayloadTooLarge:
            limit = request.app[SERVICES].config.server.max_body_bytes
            error: SidecarError = mapped(f"The request body exceeds {limit} bytes.")
        else:
            error = mapped()
        response = error_response(error, request_id)
        if isinstance(exc, web.HTTPMethodNotAllowed):
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response, error
    except Exception:
        log.exception("internal error in %s %s", request.method, request.path)
        error = InternalError()
        return error_response(error, request_id), error


def _start_span(request: web.Request, facts: Facts) -> trace.Span:
    parent = propagate.extract(request.headers)
    span = tracer.start_span(
        f"kms {facts.operation or request.method}", context=parent, kind=trace.SpanKind.SERVER
    )
    request[_SPAN_TOKEN] = otel_context.attach(trace.set_span_in_context(span))
    return span


def _end_span(span: trace.Span, request: web.Request, facts: Facts, outcome: str) -> None:
    identity = request.get(IDENTITY)
    attributes = {
        "kms.request_id": request[REQUEST_ID],
        "kms.operation": facts.operation or "none",
        "kms.key": facts.key or "",
        "kms.outcome": outcome,
        "kms.identity.kind": identity.kind if identity else "anonymous",
        "kms.rule": facts.rule or "",
    }
    if facts.root_version is not None:
        attributes["kms.root_version"] = facts.root_version
    if facts.kek_id is not None:
        attributes["kms.kek_id"] = facts.kek_id.hex()
    span.set_attributes(attributes)
    span.add_event("audit", attributes)
    if outcome != "ok":
        span.set_status(trace.StatusCode.ERROR, outcome)
    span.end()
    otel_context.detach(request[_SPAN_TOKEN])


def _incoming_trace_id(request: web.Request) -> str | None:
    """The trace id of a valid W3C ``traceparent``, so audit records join the caller's trace."""
    header = request.headers.get("traceparent", "")
    parts = header.split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        try:
            int(parts[1], 16)
        except ValueError:
            return None
        return parts[1].lower()
    return None


def build_app(services: Services) -> web.Application:
    """The application for ``services``, with every route of :data:`ROUTES`."""
    app = web.Application(
        middlewares=[_make_middleware(weakref.WeakKeyDictionary())],
        client_max_size=services.config.server.max_body_bytes,
    )
    app[SERVICES] = services
    for route in ROUTES:
        if route.operation is None and route.path not in UNGUARDED:
            raise RuntimeError(f"route {route.path} has no policy operation")
        for method in route.methods:
            app.router.add_route(method, route.path, route.handler)
    return app


def _version() -> str:
    from sidecar import __version__

    return __version__
