"""Sign, verify and JWKS routes, Vault transit's shape (``/v1/transit/sign/:name[/:hash]``…).

Sign and verify are keyed handlers (:func:`~sidecar.server.routing.keyed`, operations
``sign`` and ``verify``, ``batch_input`` supported). Vault reads ``hash_algorithm``,
``prehashed``, ``marshaling_algorithm``, ``key_version`` and ``context`` from the top of the body
for every batch item; here an item may also carry its own, and a hash in the path wins over both.
Batch items may carry Vault's ``reference``, echoed in their result.

``GET /v1/sidecar/jwks/:name`` (operation ``read``) answers a bare JSON Web Key Set
(``{"keys": [...]}``, no Vault envelope) so JWT libraries can consume it as it is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from sidecar.errors import InvalidRequest
from sidecar.keys.signing import (
    DEFAULT_HASH,
    HASH_ALGORITHMS,
    Signer,
    SignOptions,
    signature_version,
)
from sidecar.server import fields
from sidecar.server.routing import WRITE, Call, Route, call_for, keyed

#: The body's top-level fields and the path's hash, parsed once per request.
_DEFAULTS: web.RequestKey[dict[str, Any]] = web.RequestKey("signing_defaults", dict)


def signer_for(call: Call) -> Signer:
    """The running sidecar's signer."""
    signer = call.services.signer
    if signer is None:
        raise InvalidRequest("This sidecar does not sign.")
    return signer


# -- fields --------------------------------------------------------------------------------


async def _defaults(call: Call) -> dict[str, Any]:
    """The request's top-level options (Vault applies them to every batch item) and path hash."""
    request = call.request
    defaults = request.get(_DEFAULTS)
    if defaults is None:
        path_hash = request.match_info.get("hash")
        if path_hash is not None and path_hash not in HASH_ALGORITHMS:
            raise InvalidRequest(
                f"Unsupported hash algorithm {path_hash!r} in the path; "
                f"use one of {', '.join(HASH_ALGORITHMS)}."
            )
        # The body was read (and kept) by the keyed handler; this parses the top level again.
        body = fields.parse_body(await request.read()) if request.body_exists else {}
        defaults = request[_DEFAULTS] = {**body, "path_hash": path_hash}
    return defaults


def _options(item: Mapping[str, Any], defaults: Mapping[str, Any]) -> SignOptions:
    """The signing options of one item: the path's hash, else the item's, else the body's."""

    def pick(name: str) -> Any:
        value = item.get(name)
        return defaults.get(name) if value is None or value == "" else value

    hash_algorithm = defaults.get("path_hash") or pick("hash_algorithm") or DEFAULT_HASH
    if not isinstance(hash_algorithm, str):
        raise InvalidRequest("Field 'hash_algorithm' must be a string.")
    marshaling = pick("marshaling_algorithm") or "asn1"
    if not isinstance(marshaling, str):
        raise InvalidRequest("Field 'marshaling_algorithm' must be a string.")
    return SignOptions(
        hash_algorithm=hash_algorithm,
        prehashed=_bool(pick("prehashed"), "prehashed"),
        marshaling_algorithm=marshaling,
        key_version=_version(pick("key_version")),
        context=fields.base64_field({"context": pick("context")}, "context") or None,
    )


def _bool(value: Any, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InvalidRequest(f"Field '{name}' must be true or false.")


def _version(value: Any) -> int | None:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if value is None or value == 0:
        return None  # 0 means the latest, as in Vault
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidRequest("Field 'key_version' must be a positive version number.")
    return value


def _input(item: Mapping[str, Any]) -> bytes:
    """The ``input`` field: base64 of the message, or of its digest when prehashed."""
    return fields.base64_field(item, "input", required=True)


def _with_reference(item: Mapping[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    reference = item.get("reference")
    if isinstance(reference, str) and reference:
        result["reference"] = reference
    return result


# -- keyed operations ----------------------------------------------------------------------


async def _sign(call: Call, item: Mapping[str, Any]) -> dict[str, Any]:
    data, options = _input(item), _options(item, await _defaults(call))
    call.authorize()
    signature = await signer_for(call).sign(call.key, data, options)
    call.facts.root_version = signature.key_version
    return _with_reference(
        item, {"signature": signature.signature, "key_version": signature.key_version}
    )


async def _verify(call: Call, item: Mapping[str, Any]) -> dict[str, Any]:
    data, options = _input(item), _options(item, await _defaults(call))
    signature = fields.string_field(item, "signature")
    call.authorize()
    call.facts.root_version = signature_version(signature)
    valid = await signer_for(call).verify(call.key, data, signature, options)
    return _with_reference(item, {"valid": valid})


async def _jwks(request: web.Request) -> web.Response:
    call = call_for(request, "read")
    call.authorize()
    jwks = await signer_for(call).jwks(call.key)
    return web.Response(
        body=json.dumps(jwks).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-cache"},
    )


_jwks.operation = "read"  # type: ignore[attr-defined]


#: The sign, verify and JWKS entries of the route table.
SIGNING_ROUTES: tuple[Route, ...] = (
    Route(WRITE, "/v1/transit/sign/{name}", keyed("sign", _sign, batch=True), "sign"),
    Route(WRITE, "/v1/transit/sign/{name}/{hash}", keyed("sign", _sign, batch=True), "sign"),
    Route(WRITE, "/v1/transit/verify/{name}", keyed("verify", _verify, batch=True), "verify"),
    Route(
        WRITE, "/v1/transit/verify/{name}/{hash}", keyed("verify", _verify, batch=True), "verify"
    ),
    Route(("GET",), "/v1/sidecar/jwks/{name}", _jwks, "read"),
)
