"""Request fields: parsed and checked once, with messages a caller can act on.

Every parser here raises ``InvalidRequest`` (or ``PayloadTooLarge``) naming its field, and
nothing else, whatever the caller sent: a batch item that fails is answered as that item's
error. Numbers are strict: JSON integers, or strings of ASCII digits ``0-9`` where Vault accepts
strings; never ``Infinity``, ``NaN``, a float that overflows, or other scripts' digits.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from sidecar.config import parse_duration
from sidecar.errors import InvalidRequest, PayloadTooLarge
from sidecar.keys import envelope
from sidecar.keys.results import check_bits

_EMPTY = frozenset({b"", b"{}", b"null"})
#: An integer written as a string: ASCII digits only, few enough for any field here.
_DIGITS = re.compile(r"[0-9]{1,19}", re.ASCII)


def _refuse_constant(name: str) -> Any:
    raise InvalidRequest(f"The request body holds {name}, which is not a JSON number.")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidRequest("The request body holds a number too large to represent.")
    return value


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``; an empty body or ``null`` is ``{}``.

    ``Infinity``, ``NaN`` and numbers that overflow a float (``1e400``), which Python's ``json``
    would accept, are refused.
    """
    if raw in _EMPTY or not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
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


def context_field(item: Mapping[str, Any]) -> Mapping[str, str] | None:
    """``encryption_context``: an object of strings, each valid Unicode; ``None`` if absent."""
    context = item.get("encryption_context")
    return None if context is None else envelope.check_context(context)


_TTL_FORMAT = "Field 'ttl' must be seconds or a duration like '90s' or '5m'."


def ttl_field(item: Mapping[str, Any]) -> float | None:
    """``ttl`` in seconds (``None`` when absent or 0), within what a blob can carry."""
    value = item.get("ttl")
    if value is None or value == "" or (value == 0 and not isinstance(value, bool | str)):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidRequest(_TTL_FORMAT)
    try:
        seconds = parse_duration(value)
    except ValueError:
        if isinstance(value, str):
            raise InvalidRequest(_TTL_FORMAT) from None
        if value < 0:
            raise InvalidRequest("Field 'ttl' must be positive.") from None
        seconds = math.inf  # an integer too large for a float: out of range
    return envelope.check_ttl(seconds)


def integer_value(value: Any, name: str) -> int | None:
    """``value`` of field ``name`` as an integer: a JSON integer or a string of ASCII digits.

    ``None`` and ``""`` are ``None``. Raises ``InvalidRequest`` for anything else.
    """
    if value is None or value == "":
        return None
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise InvalidRequest(f"Field '{name}' must be a whole number.")


def bits_field(item: Mapping[str, Any]) -> int:
    """``bits``: 128, 256 (the default) or 512."""
    value = item.get("bits")
    if value is None:
        return 256
    try:
        bits = integer_value(value, "bits")
    except InvalidRequest:
        bits = -1  # refused below, in the one wording
    if bits is None:
        return 256
    return check_bits(bits)


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
    message = f"Field '{name}' must be an HTTP status code from 200 to 599."
    try:
        value = integer_value(body.get(name), name)
    except InvalidRequest:
        raise InvalidRequest(message) from None
    if value is not None and not 200 <= value <= 599:
        raise InvalidRequest(message)
    return value
