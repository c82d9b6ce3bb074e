"""Request fields: parsed and checked once, with messages a caller can act on."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from sidecar.config import parse_duration
from sidecar.errors import InvalidRequest, PayloadTooLarge

_EMPTY = frozenset({b"", b"{}", b"null"})


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``; an empty body or ``null`` is ``{}``."""
    if raw in _EMPTY or not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid JSON.") from None
    except RecursionError:
        raise InvalidRequest("The request body nests too deeply.") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return body


def base64_field(item: Mapping[str, Any], name: str, *, required: bool = False) -> bytes:
    value = item.get(name)
    if value is None or value == "":
        if required:
            raise InvalidRequest(f"Missing required field '{name}'.")
        return b""
    if not isinstance(value, str):
        raise InvalidRequest(f"Field '{name}' must be a base64 string.")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"Field '{name}' is not valid base64.") from None


def string_field(item: Mapping[str, Any], name: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"Missing required field '{name}'.")
    return value


def context_field(item: Mapping[str, Any]) -> dict[str, str] | None:
    value = item.get("encryption_context")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidRequest("Field 'encryption_context' must be an object of strings.")
    return value


def ttl_field(item: Mapping[str, Any]) -> float | None:
    value = item.get("ttl")
    if value is None or value == "" or value == 0:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
        raise InvalidRequest("Field 'ttl' must be positive.")
    try:
        return parse_duration(value)
    except (ValueError, TypeError):
        raise InvalidRequest(
            "Field 'ttl' must be seconds or a duration like '90s' or '5m'."
        ) from None


def bits_field(item: Mapping[str, Any]) -> int:
    value = item.get("bits", 256)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if value not in (128, 256, 512) or isinstance(value, bool):
        raise InvalidRequest("Field 'bits' must be 128, 256 or 512.")
    return int(value)


def plaintext_field(item: Mapping[str, Any], limit: int) -> bytes:
    plaintext = base64_field(item, "plaintext", required=False)
    if "plaintext" not in item or item["plaintext"] is None:
        raise InvalidRequest("Missing required field 'plaintext'.")
    if len(plaintext) > limit:
        raise PayloadTooLarge(f"The plaintext exceeds {limit} bytes; use datakey for larger data.")
    return plaintext


def batch_items(body: Mapping[str, Any], limit: int) -> list[Mapping[str, Any]] | None:
    """The ``batch_input`` items, or ``None`` for a single request."""
    items = body.get("batch_input")
    if items is None:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise InvalidRequest("Field 'batch_input' must be a list of objects.")
    if not items:
        raise InvalidRequest("Field 'batch_input' must not be empty.")
    if len(items) > limit:
        raise PayloadTooLarge(f"Field 'batch_input' holds more than {limit} items.")
    return items


def status_code_field(body: Mapping[str, Any], name: str) -> int | None:
    """An HTTP status the caller asks for (Vault's ``partial_failure_response_code``): an integer
    (or a string of ASCII digits) from 200 to 599, or ``None`` when absent."""
    value = body.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 200 <= value <= 599:
        raise InvalidRequest(f"Field '{name}' must be an HTTP status code from 200 to 599.")
    return value
