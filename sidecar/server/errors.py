"""Errors as HTTP: the one table from error code to status, and Vault's error body."""

from __future__ import annotations

import json

from aiohttp import web

from sidecar.errors import RateLimited, SidecarError

#: The only map from error code to HTTP status.
STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 400,
    "decryption_failed": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "unknown_path": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "rate_limited": 429,
    "internal": 500,
    "upstream_error": 502,
    "upstream_unavailable": 503,
    "audit_unavailable": 503,
}


def status_for(error: SidecarError) -> int:
    return STATUS_BY_CODE.get(error.code, 500)


def error_body(error: SidecarError, request_id: str) -> dict[str, object]:
    """Vault's ``{"errors": [...]}`` plus our stable ``code`` and the ``request_id``."""
    return {"errors": [error.message], "code": error.code, "request_id": request_id}


def error_response(error: SidecarError, request_id: str) -> web.Response:
    headers = {"X-Request-Id": request_id}
    if isinstance(error, RateLimited):
        headers["Retry-After"] = str(max(1, round(error.retry_after + 0.5)))
    return web.Response(
        body=json.dumps(error_body(error, request_id)).encode(),
        status=status_for(error),
        content_type="application/json",
        headers=headers,
    )
