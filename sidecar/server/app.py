"""The route table and its handlers: every route the sidecar serves, declared once.

Each entry of :data:`ROUTES` says what the route is — its policy operation, how its items are
scoped, whether it takes ``batch_input`` (see :mod:`sidecar.server.routes`) — and ``build_app``
wraps it once in the request pipeline (:mod:`sidecar.server.pipeline`), which authorizes, audits,
counts and traces every decision under that operation. Only the paths in :data:`UNGUARDED` are
served without authentication and policy.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from sidecar.errors import InvalidRequest
from sidecar.keys.status import READY_STATES
from sidecar.policy.authorizer import AccessRequest
from sidecar.server import fields
from sidecar.server.hmac_routes import HMAC_ROUTES
from sidecar.server.introspection import INTROSPECTION_ROUTES
from sidecar.server.key_metadata import key_metadata
from sidecar.server.key_version import check_key_version, requested_key_version
from sidecar.server.pipeline import Pipeline
from sidecar.server.routes import (
    WRITE,
    Done,
    HandlerCall,
    Route,
    Scope,
    Unguarded,
    context_scope,
    context_ttl_scope,
    key_name,
)
from sidecar.server.services import SERVICES, Services
from sidecar.server.signing import SIGNING_ROUTES
from sidecar.server.tools import TOOLS_ROUTES

log = logging.getLogger(__name__)

# -- keyed operations (each runs once per item of a batch) ---------------------------------


async def _datakey(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    version = requested_key_version(item)
    key = await call.services.keyring.generate_data_key(
        key_name(access),
        bits=fields.bits_field(item),
        context=access.context,
        associated_data=fields.base64_field(item, "associated_data"),
        ttl=access.ttl,
    )
    check_key_version(version, key.root_version)
    data: dict[str, Any] = {
        "ciphertext": key.blob,
        "key_version": key.root_version,
        "expires_at": key.expires_at,
    }
    if access.operation == "datakey":
        data["plaintext"] = base64.b64encode(key.plaintext).decode()
    return Done(data, key.root_version, key.kek_id)


async def _encrypt(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    plaintext = fields.plaintext_field(item, call.services.config.server.max_plaintext_bytes)
    version = requested_key_version(item)
    sealed = await call.services.keyring.encrypt(
        key_name(access),
        plaintext,
        context=access.context,
        associated_data=fields.base64_field(item, "associated_data"),
        ttl=access.ttl,
    )
    check_key_version(version, sealed.root_version)
    data = {
        "ciphertext": sealed.blob,
        "key_version": sealed.root_version,
        "expires_at": sealed.expires_at,
    }
    return Done(data, sealed.root_version, sealed.kek_id)


async def _decrypt(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    opened = await call.services.keyring.open_blob(
        key_name(access),
        fields.string_field(item, "ciphertext"),
        context=access.context,
        associated_data=fields.base64_field(item, "associated_data"),
    )
    data = {"plaintext": base64.b64encode(opened.plaintext).decode()}
    return Done(data, opened.root_version, opened.kek_id)


async def _rewrap(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    sealed = await call.services.keyring.rewrap(
        key_name(access),
        fields.string_field(item, "ciphertext"),
        context=access.context,
        associated_data=fields.base64_field(item, "associated_data"),
    )
    data = {"ciphertext": sealed.blob, "key_version": sealed.root_version}
    return Done(data, sealed.root_version, sealed.kek_id)


async def _read_key(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    name = key_name(access)
    info = await call.services.keyring.key_info(name)
    return Done(key_metadata(call, name, info))


async def _rotate(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    name = key_name(access)
    info = await call.services.keyring.rotate(name)
    return Done(key_metadata(call, name, info), info.latest_version)


# -- sidecar routes ------------------------------------------------------------------------


async def _status(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    services = call.services
    audit = services.audit
    data = {
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
    return Done(data)


def _flush_scope(item: Mapping[str, Any]) -> Scope:
    """The key to flush (``None``: every key)."""
    key = item.get("key")
    if key is not None and not isinstance(key, str):
        raise InvalidRequest("Field 'key' must be a key name.")
    return Scope(key=key)


async def _flush(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    key = access.key
    dropped = call.services.keyring.flush(key)
    log.info("cache flushed for %s: %d KEKs dropped", key or "all keys", dropped)
    return Done({"flushed": key or "*", "keks_dropped": dropped})


async def _health(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    keyring = services.keyring
    keys = {name: keyring.key_state(name) for name in keyring.key_names()}
    upstream = dict(keyring.backend.status())
    not_ready = [name for name, state in keys.items() if state not in READY_STATES]
    ready = bool(keys) and not not_ready
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
    if audit is not None:  # its path is for /v1/sidecar/status, which is authorized
        body["audit"] = {"state": "ok" if audit.healthy else "unavailable"}
    if not keys:
        body["reason"] = "No keys are configured."
    elif not ready:
        body["reason"] = "Keys that cannot issue now: " + "; ".join(
            f"{name} ({keyring.key_problem(name)})" for name in not_ready
        )
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


ROUTES: tuple[Route | Unguarded, ...] = (
    Route(
        WRITE,
        "/v1/transit/datakey/plaintext/{name}",
        "datakey",
        _datakey,
        context_ttl_scope,
        batch=True,
    ),
    Route(
        WRITE,
        "/v1/transit/datakey/wrapped/{name}",
        "datakey-wrapped",
        _datakey,
        context_ttl_scope,
        batch=True,
    ),
    Route(WRITE, "/v1/transit/encrypt/{name}", "encrypt", _encrypt, context_ttl_scope, batch=True),
    Route(WRITE, "/v1/transit/decrypt/{name}", "decrypt", _decrypt, context_scope, batch=True),
    Route(WRITE, "/v1/transit/rewrap/{name}", "rewrap", _rewrap, context_scope, batch=True),
    Route(("GET",), "/v1/transit/keys/{name}", "read", _read_key),
    Route(WRITE, "/v1/transit/keys/{name}/rotate", "rotate", _rotate, intent=True),
    Route(("GET",), "/v1/sidecar/status", "status", _status),
    Route(WRITE, "/v1/sidecar/cache/flush", "flush", _flush, _flush_scope),
    *SIGNING_ROUTES,
    *HMAC_ROUTES,
    *TOOLS_ROUTES,
    *INTROSPECTION_ROUTES,
    Unguarded(
        ("GET", "HEAD"),
        "/v1/sys/health",
        _health,
        "load balancers and orchestrators probe it without credentials; it tells no secret",
    ),
    Unguarded(("GET",), "/metrics", _metrics, "Prometheus scrapes it; counters only"),
)

#: The catch-all route, added after the table: a request no route takes gets its 404 or 405
#: through the pipeline (authenticated, audited and counted under the operation ``none``).
#: ``[\s\S]``, not ``.``: a path may hold a decoded newline (``%0A``).
UNMATCHED = r"/{path:[\s\S]*}"

#: Routes reachable without authentication or a policy check, by explicit choice.
UNGUARDED = frozenset({"/v1/sys/health", "/metrics", "/v1/sys/seal-status", "/v1/sys/leader"})


def build_app(services: Services) -> web.Application:
    """The application for ``services``, with every route of :data:`ROUTES`.

    Each guarded route is wrapped once, here, in the request pipeline; an unguarded route
    outside :data:`UNGUARDED` stops the build.
    """
    pipeline = Pipeline(services)
    app = web.Application(client_max_size=services.config.server.max_body_bytes)
    app[SERVICES] = services
    for route in ROUTES:
        if isinstance(route, Unguarded):
            if route.path not in UNGUARDED:
                raise RuntimeError(f"route {route.path} is unguarded but not in UNGUARDED")
            handler = route.handler
        else:
            handler = pipeline.serve(route)
        for method in route.methods:
            app.router.add_route(method, route.path, handler)
    app.router.add_route("*", UNMATCHED, pipeline.unmatched)  # last: what no route takes
    return app


def _version() -> str:
    from sidecar import __version__

    return __version__
