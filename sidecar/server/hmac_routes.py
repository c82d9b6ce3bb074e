"""``transit/hmac/:name[/:algorithm]`` and HMAC ``verify``, Vault transit's shape.

``hmac`` (policy operation ``hmac``) answers ``{"hmac": "vault:vN:…"}``; ``verify`` with an
``hmac`` field instead of ``signature`` (policy operation ``verify``, routed here from
:mod:`sidecar.server.signing`) answers ``{"valid": …}``. Both take ``batch_input``. As in Vault,
``algorithm`` and ``key_version`` may be given at the top of the body for every item, and the
path's algorithm wins over both. The HMAC is made by the backend with the root key's HMAC key
(:class:`~sidecar.keys.hmac_keys.HmacKeys`); a backend that cannot answers 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.keys.hmac_keys import HmacKeys, hmac_algorithm
from sidecar.policy.authorizer import AccessRequest
from sidecar.server import fields
from sidecar.server.routes import WRITE, Done, HandlerCall, Route, key_name


def _hmac_keys(call: HandlerCall) -> HmacKeys:
    services = call.services
    return HmacKeys(services.keyring.backend, services.config.root_key_name)


def _algorithm(call: HandlerCall, item: Mapping[str, Any], body: Mapping[str, Any]) -> str:
    """The path's algorithm, else the item's, else the body's (Vault's precedence)."""
    in_path = call.request.match_info.get("algorithm") or call.request.match_info.get("hash")
    if in_path is not None:
        return hmac_algorithm(in_path, "the path")
    return hmac_algorithm(item.get("algorithm") or body.get("algorithm"), "field 'algorithm'")


def _key_version(item: Mapping[str, Any], body: Mapping[str, Any]) -> int | None:
    value = item.get("key_version")
    version = fields.integer_value(
        body.get("key_version") if value is None else value, "key_version"
    )
    return None if version == 0 else version  # 0 means the latest, as in Vault


async def _hmac(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    algorithm = _algorithm(call, item, body)
    data = fields.base64_field(item, "input", required=True)
    mac = await _hmac_keys(call).hmac(
        key_name(access), data, algorithm=algorithm, key_version=_key_version(item, body)
    )
    return Done({"hmac": mac.hmac}, mac.key_version)


async def verify_hmac(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    """``verify`` of an item carrying ``hmac``: whether it is the HMAC of ``input``."""
    algorithm = _algorithm(call, item, body)
    data = fields.base64_field(item, "input", required=True)
    mac = fields.string_field(item, "hmac")
    valid = await _hmac_keys(call).verify(key_name(access), data, mac, algorithm=algorithm)
    return Done({"valid": valid}, _version_of(mac))


def _version_of(mac: str) -> int | None:
    """N of ``vault:vN:…`` for the audit record, if it says so."""
    parts = mac.split(":", 2)
    if len(parts) == 3 and parts[1][:1] == "v" and parts[1][1:].isdigit():
        return int(parts[1][1:])
    return None


#: The HMAC entries of the route table (HMAC verify shares the signing verify routes).
HMAC_ROUTES: tuple[Route, ...] = (
    Route(WRITE, "/v1/transit/hmac/{name}", "hmac", _hmac, batch=True),
    Route(WRITE, "/v1/transit/hmac/{name}/{algorithm}", "hmac", _hmac, batch=True),
)
