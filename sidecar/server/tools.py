"""Random bytes and hashes, Vault's ``transit/random``, ``transit/hash`` and ``sys/tools/…``.

Both are local (``os.urandom``, ``hashlib``): no key, no backend call. They go through the policy
as the keyless operations ``random`` and ``hash`` (a rule with ``keys = ["*"]``), are audited
like any request, and are bounded: at most :data:`MAX_RANDOM_BYTES` random bytes, and a hash
input no larger than ``server.max_plaintext_bytes``.

``random[/:source][/:bytes]``: ``bytes`` (default 32), ``format`` (``base64`` or ``hex``),
``source`` (``platform``, ``seal`` or ``all``, all the platform's here: the sidecar has no seal
to mix in). ``hash[/:algorithm]``: ``input`` (base64), ``algorithm`` (default
``sha2-256``), ``format`` (``hex`` by default, or ``base64``). A path segment wins over the
body's field, as in Vault.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping
from typing import Any

from sidecar.errors import InvalidRequest
from sidecar.policy.authorizer import AccessRequest
from sidecar.server import fields
from sidecar.server.routes import WRITE, Done, HandlerCall, Route

#: The most random bytes one request may ask for (Vault's limit).
MAX_RANDOM_BYTES = 128 * 1024
DEFAULT_RANDOM_BYTES = 32
#: Where random bytes come from. The sidecar has no seal to mix in, so every source is the
#: platform's (as OpenBao does when its seal adds no entropy).
_SOURCES = ("platform", "seal", "all")

#: Vault's hash names → hashlib's.
HASHES = {
    "sha2-224": "sha224",
    "sha2-256": "sha256",
    "sha2-384": "sha384",
    "sha2-512": "sha512",
    "sha3-224": "sha3_224",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
}


def _encode(data: bytes, fmt: Any, default: str) -> str:
    fmt = fmt or default
    if fmt == "base64":
        return base64.b64encode(data).decode()
    if fmt == "hex":
        return data.hex()
    raise InvalidRequest("Field 'format' must be 'base64' or 'hex'.")


def _random_request(call: HandlerCall, body: Mapping[str, Any]) -> tuple[str, int]:
    """The source and byte count of a random request: path segments, then the body."""
    match = call.request.match_info
    source, count = match.get("source"), match.get("urlbytes")
    if source is not None and count is None and source.isdigit():
        source, count = None, source  # /random/32: the one segment is the byte count
    source = source or body.get("source") or "platform"
    if source not in _SOURCES:
        raise InvalidRequest("Field 'source' must be 'platform', 'seal' or 'all'.")
    where = "bytes" if count is None else "the path's byte count"
    number = fields.integer_value(body.get("bytes") if count is None else count, where)
    number = DEFAULT_RANDOM_BYTES if number is None else number
    if not 1 <= number <= MAX_RANDOM_BYTES:
        raise InvalidRequest(f"Field 'bytes' must be between 1 and {MAX_RANDOM_BYTES}.")
    return source, number


async def _random(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    _, count = _random_request(call, body)
    return Done({"random_bytes": _encode(os.urandom(count), body.get("format"), "base64")})


async def _hash(
    call: HandlerCall, access: AccessRequest, item: Mapping[str, Any], body: Mapping[str, Any]
) -> Done:
    name = call.request.match_info.get("algorithm") or body.get("algorithm") or "sha2-256"
    if name not in HASHES:
        raise InvalidRequest(f"Unsupported hash algorithm; use one of {', '.join(HASHES)}.")
    data = fields.base64_field(body, "input", required=True)
    limit = call.services.config.server.max_plaintext_bytes
    if len(data) > limit:
        raise InvalidRequest(f"Field 'input' must be at most {limit} bytes.")
    digest = hashlib.new(HASHES[name], data).digest()
    return Done({"sum": _encode(digest, body.get("format"), "hex")})


def _routes(prefix: str) -> tuple[Route, ...]:
    random = f"{prefix}/random"
    hashed = f"{prefix}/hash"
    return (
        Route(WRITE, random, "random", _random),
        Route(WRITE, f"{random}/{{source}}", "random", _random),
        Route(WRITE, f"{random}/{{source}}/{{urlbytes}}", "random", _random),
        Route(WRITE, hashed, "hash", _hash),
        Route(WRITE, f"{hashed}/{{algorithm}}", "hash", _hash),
    )


#: The random and hash entries of the route table, under transit and sys/tools.
TOOLS_ROUTES: tuple[Route, ...] = (*_routes("/v1/transit"), *_routes("/v1/sys/tools"))
