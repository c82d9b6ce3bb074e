"""Sign, verify and JWKS routes, Vault transit's shape (``/v1/transit/sign/:name[/:hash]``…).

Sign and verify are keyed routes (operations ``sign`` and ``verify``, ``batch_input``
supported). Vault reads ``hash_algorithm``,
``prehashed``, ``marshaling_algorithm``, ``key_version`` and ``context`` from the top of the body
for every batch item; here an item may also carry its own, and a hash in the path wins over both.
Batch items may carry Vault's ``reference``, echoed in their result (by the pipeline, as on
every batch route).

``GET /v1/sidecar/jwks/:name`` (operation ``read``) answers a bare JSON Web Key Set
(``{"keys": [...]}``, no Vault envelope) so JWT libraries can consume it as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from sidecar.errors import InvalidRequest, quoted
from sidecar.keys.envelope import MAX_ROOT_VERSION
from sidecar.keys.signing import (
    DEFAULT_HASH,
    HASH_ALGORITHMS,
    Signer,
    SignOptions,
    signature_version,
)
from sidecar.policy.authorizer import AccessRequest
from sidecar.server import fields
from sidecar.server.errors import to_json
from sidecar.server.hmac_routes import verify_hmac
from sidecar.server.routes import WRITE, Done, HandlerCall, Route, key_name


def signer_for(call: HandlerCall) -> Signer:
    """The running sidecar's signer."""
    signer = call.services.signer
    if signer is None:
        raise InvalidRequest("This sidecar does not sign.")
    return signer


# -- fields --------------------------------------------------------------------------------


def _defaults(call: HandlerCall, body: Mapping[str, Any]) -> dict[str, Any]:
    """The request's top-level options (Vault applies them to every batch item) and path hash."""
    path_hash = call.request.match_info.get("hash")
    if path_hash is not None and path_hash not in HASH_ALGORITHMS:
        raise InvalidRequest(
            f"Unsupported hash algorithm {quoted(path_hash)} in the path; "
            f"use one of {', '.join(HASH_ALGORITHMS)}."
        )
    return {**body, "path_hash": path_hash}


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
    try:
        version = fields.integer_value(value, "key_version")
    except InvalidRequest:
        version = -1
    if version is None or version == 0:
        return None  # 0 means the latest, as in Vault
    if not 0 < version <= MAX_ROOT_VERSION:
        raise InvalidRequest("Field 'key_version' must be a positive version number.")
    return version


def _input(item: Mapping[str, Any]) -> bytes:
    """The ``input`` field: base64 of the message, or of its digest when prehashed."""
    return fields.base64_field(item, "input", required=True)


# -- keyed operations ----------------------------------------------------------------------


async def _sign(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    data, options = _input(item), _options(item, _defaults(call, body))
    signature = await signer_for(call).sign(key_name(access), data, options)
    return Done(
        {"signature": signature.signature, "key_version": signature.key_version},
        signature.key_version,
    )


async def _verify(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    if item.get("hmac") is not None:  # Vault's verify checks an HMAC when given one
        return await verify_hmac(call, access, item, body)
    data, options = _input(item), _options(item, _defaults(call, body))
    signature = fields.string_field(item, "signature")
    valid = await signer_for(call).verify(key_name(access), data, signature, options)
    return Done({"valid": valid}, signature_version(signature))


async def _jwks(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    jwks = await signer_for(call).jwks(key_name(access))
    response = web.Response(
        body=to_json(jwks),
        content_type="application/json",
        headers={"Cache-Control": "no-cache"},
    )
    return Done(jwks, response=response)


#: The sign, verify and JWKS entries of the route table.
SIGNING_ROUTES: tuple[Route, ...] = (
    Route(WRITE, "/v1/transit/sign/{name}", "sign", _sign, batch=True),
    Route(WRITE, "/v1/transit/sign/{name}/{hash}", "sign", _sign, batch=True),
    Route(WRITE, "/v1/transit/verify/{name}", "verify", _verify, batch=True),
    Route(WRITE, "/v1/transit/verify/{name}/{hash}", "verify", _verify, batch=True),
    Route(("GET",), "/v1/sidecar/jwks/{name}", "read", _jwks),
)
