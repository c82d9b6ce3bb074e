"""What each API call sends and how its answer is read, with no I/O (both clients share it)."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar
from urllib.parse import quote

from sidecar.client._errors import UnexpectedResponse, error_from_answer
from sidecar.errors import InvalidRequest

T = TypeVar("T")

#: One compact encoder, made once (``json.dumps`` with options builds a new one per call).
_to_json = json.JSONEncoder(separators=(",", ":")).encode

#: A ``ttl`` as the API takes it: ``"90s"``, ``"5m"`` or whole seconds.
Ttl = str | int


class DataKey(NamedTuple):
    """A data key (DEK) from the sidecar; immutable.

    ``plaintext`` is the key itself (``None`` for ``wrapped=True``) and never appears in ``repr``.
    ``ciphertext`` is the blob (``sidecar:vN:…``) to store beside the data and hand to ``decrypt``.
    ``expires_at`` is a Unix time after which the blob cannot be opened, or ``None``.
    (A named tuple: cheap to make, as a key pool hands out hundreds of thousands a second.)
    """

    plaintext: bytes | None
    ciphertext: str
    key_version: int
    expires_at: int | None

    def __repr__(self) -> str:
        return (
            f"DataKey(ciphertext={self.ciphertext!r}, key_version={self.key_version!r},"
            f" expires_at={self.expires_at!r})"
        )


#: ``DataKey`` without the Python-level ``__new__`` of named tuples: for the pools' hot path.
def new_data_key(
    plaintext: bytes | None, ciphertext: str, key_version: int, expires_at: int | None
) -> DataKey:
    return _tuple_new(DataKey, (plaintext, ciphertext, key_version, expires_at))


_tuple_new = tuple.__new__


@dataclass(slots=True)  # not frozen: one is made per call, and frozen costs ~2 µs; never changed
class Call(Generic[T]):
    """One request and the parser for its successful JSON answer.

    ``also_ok`` lists non-2xx statuses whose body is an answer rather than an error, unless
    it is shaped as an error (has ``errors``). A ``batch`` call's answer is read whatever its
    status when it holds ``batch_results``: the sidecar answers 400 when any item failed (as
    Vault does), and the first failed item's own error is the one to raise.
    """

    method: str
    path: str
    body: Mapping[str, Any] | None
    parse: Callable[[Mapping[str, Any]], T]
    also_ok: frozenset[int] = frozenset()
    batch: bool = False
    #: ``body`` already encoded, for bodies that are the same on every call.
    encoded: bytes | None = None

    def encoded_body(self) -> bytes | None:
        if self.encoded is not None:
            return self.encoded
        if self.body is None:
            return None
        return _to_json(self.body).encode()


def read_answer(call: Call[T], *, status: int, retry_after: str | None, raw: bytes) -> T:
    """The result of ``call`` from a raw answer, or the typed error the answer reports."""
    body = _json_object(raw)
    answered = 200 <= status < 300 or (
        body is not None
        and (
            (status in call.also_ok and "errors" not in body)
            or (call.batch and _holds_batch_results(body))
        )
    )
    if not answered:
        body = body or {}
        errors = body.get("errors")
        message = errors[0] if isinstance(errors, list) and errors else None
        raise error_from_answer(
            status=status,
            code=body.get("code"),
            message=message,
            request_id=body.get("request_id"),
            retry_after=retry_after,
        )
    if body is None:
        if raw.strip() and status != 204:
            raise UnexpectedResponse(
                f"The sidecar answered {call.path} with a body that is not JSON."
            )
        body = {}
    return call.parse(body)


def datakey(
    key: str, *, bits: int, context: Mapping[str, str] | None, ttl: Ttl | None, wrapped: bool
) -> Call[DataKey]:
    def parse(body: Mapping[str, Any]) -> DataKey:
        return _data_key(_data(body), wrapped=wrapped)

    fields = _datakey_fields(bits, context, ttl)
    encoded = _PLAIN_DATAKEY_BODIES.get(bits) if not context and ttl is None else None
    return Call("POST", _datakey_path(key, wrapped), fields, parse, encoded=encoded)


#: The body of a datakey call with neither context nor ttl, by ``bits``: most calls send one.
_PLAIN_DATAKEY_BODIES = {bits: b'{"bits":%d}' % bits for bits in (128, 256, 512)}


def datakeys(
    key: str,
    n: int,
    *,
    bits: int,
    context: Mapping[str, str] | None,
    ttl: Ttl | None,
    wrapped: bool,
) -> Call[list[DataKey]]:
    if n < 1:
        raise ValueError("n must be at least 1")
    item = _datakey_fields(bits, context, ttl)

    def parse(body: Mapping[str, Any]) -> list[DataKey]:
        return _data_keys(_batch_results(body, n), wrapped=wrapped)

    # A batch with a failed item is a 400 (or the failure's 5xx) holding every item's result,
    # as Vault answers it: read like a 200, so the first item's error is the one raised.
    return Call("POST", _datakey_path(key, wrapped), {"batch_input": [item] * n}, parse, batch=True)


def decrypt_batch(
    key: str, ciphertexts: Sequence[str], contexts: Sequence[Mapping[str, str] | None]
) -> Call[list[bytes]]:
    if not ciphertexts:
        raise ValueError("ciphertexts must not be empty")
    if len(contexts) != len(ciphertexts):
        raise ValueError("contexts must hold one context per ciphertext")
    items = []
    for ciphertext, context in zip(ciphertexts, contexts, strict=True):
        item: dict[str, Any] = {"ciphertext": ciphertext}
        _add_context(item, context)
        items.append(item)
    n = len(items)

    def parse(body: Mapping[str, Any]) -> list[bytes]:
        return [_b64(result, "plaintext") for result in _batch_results(body, n)]

    return Call(
        "POST", f"/v1/transit/decrypt/{key_segment(key)}", {"batch_input": items}, parse, batch=True
    )


def decrypt(key: str, ciphertext: str, *, context: Mapping[str, str] | None) -> Call[bytes]:
    def parse(body: Mapping[str, Any]) -> bytes:
        return _b64(_data(body), "plaintext")

    fields: dict[str, Any] = {"ciphertext": ciphertext}
    _add_context(fields, context)
    return Call("POST", f"/v1/transit/decrypt/{key_segment(key)}", fields, parse)


def encrypt(
    key: str, plaintext: bytes, *, context: Mapping[str, str] | None, ttl: Ttl | None
) -> Call[str]:
    fields: dict[str, Any] = {"plaintext": base64.b64encode(plaintext).decode("ascii")}
    _add_context(fields, context)
    if ttl is not None:
        fields["ttl"] = ttl
    return Call("POST", f"/v1/transit/encrypt/{key_segment(key)}", fields, _ciphertext)


def rewrap(key: str, ciphertext: str, *, context: Mapping[str, str] | None) -> Call[str]:
    fields: dict[str, Any] = {"ciphertext": ciphertext}
    _add_context(fields, context)
    return Call("POST", f"/v1/transit/rewrap/{key_segment(key)}", fields, _ciphertext)


def sign(key: str, message: bytes, *, hash_algorithm: str, marshaling: str) -> Call[str]:
    fields = {
        "input": base64.b64encode(message).decode(),
        "hash_algorithm": hash_algorithm,
        "marshaling_algorithm": marshaling,
    }
    return Call(
        "POST",
        f"/v1/transit/sign/{key_segment(key)}",
        fields,
        lambda b: _str(_data(b), "signature"),
    )


def verify(
    key: str, message: bytes, signature: str, *, hash_algorithm: str, marshaling: str
) -> Call[bool]:
    fields = {
        "input": base64.b64encode(message).decode(),
        "signature": signature,
        "hash_algorithm": hash_algorithm,
        "marshaling_algorithm": marshaling,
    }

    def parse(body: Mapping[str, Any]) -> bool:
        valid = _data(body).get("valid")
        if not isinstance(valid, bool):
            raise UnexpectedResponse("The sidecar's verify answer has no boolean 'valid'.")
        return valid

    return Call("POST", f"/v1/transit/verify/{key_segment(key)}", fields, parse)


def jwks(key: str) -> Call[dict[str, Any]]:
    return Call("GET", f"/v1/sidecar/jwks/{key_segment(key)}", None, dict)


def key_info(key: str) -> Call[dict[str, Any]]:
    return Call("GET", f"/v1/transit/keys/{key_segment(key)}", None, lambda body: dict(_data(body)))


def health() -> Call[dict[str, Any]]:
    def parse(body: Mapping[str, Any]) -> dict[str, Any]:
        # Vault puts health at the top level; accept both that and the usual envelope.
        data = body.get("data")
        return dict(data) if isinstance(data, dict) else dict(body)

    # Not ready is a 503 whose body says why: an answer, not an error.
    return Call("GET", "/v1/sys/health", None, parse, also_ok=frozenset({503}))


def status() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/sidecar/status", None, lambda body: dict(_data(body)))


def flush(key: str | None) -> Call[None]:
    body: dict[str, Any] = {}
    if key is not None:
        key_segment(key)  # the same rule as in paths, so a bad name fails here, not on the server
        body["key"] = key
    return Call("POST", "/v1/sidecar/cache/flush", body, lambda body: None)


@functools.lru_cache(maxsize=1024)
def _datakey_path(key: str, wrapped: bool) -> str:
    return f"/v1/transit/datakey/{'wrapped' if wrapped else 'plaintext'}/{key_segment(key)}"


def _datakey_fields(
    bits: int, context: Mapping[str, str] | None, ttl: Ttl | None
) -> dict[str, Any]:
    fields: dict[str, Any] = {"bits": bits}
    _add_context(fields, context)
    if ttl is not None:
        fields["ttl"] = ttl
    return fields


def _add_context(fields: dict[str, Any], context: Mapping[str, str] | None) -> None:
    # An empty context and no context are the same to the sidecar; send neither.
    if context:
        fields["encryption_context"] = dict(context)


@functools.lru_cache(maxsize=1024)  # an application names few keys; quote() is slow
def key_segment(key: str) -> str:
    """``key`` made safe for a URL path segment; ``InvalidRequest`` for names no key can have."""
    if not key or key in (".", "..") or "/" in key or not key.isprintable():
        raise InvalidRequest(f"{key!r} is not a valid key name.")
    return quote(key, safe="")


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw.decode())  # a str skips json's detection of the encoding
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _holds_batch_results(body: Mapping[str, Any]) -> bool:
    data = body.get("data")
    return isinstance(data, dict) and isinstance(data.get("batch_results"), list)


def _data(body: Mapping[str, Any]) -> Mapping[str, Any]:
    data = body.get("data")
    if not isinstance(data, dict):
        raise UnexpectedResponse("The sidecar's answer has no 'data' object.")
    return data


def _batch_results(body: Mapping[str, Any], n: int) -> list[Mapping[str, Any]]:
    """The ``n`` batch results, raising the first item's error if any item failed."""
    results = _data(body).get("batch_results")
    if not isinstance(results, list) or len(results) != n:
        raise UnexpectedResponse(f"The sidecar's answer does not hold {n} batch results.")
    for result in results:
        if not isinstance(result, dict):
            raise UnexpectedResponse(
                "The sidecar's answer holds a batch result that is not an object."
            )
        if result.get("error"):  # Vault may send an empty "error" on items that succeeded
            raise error_from_answer(
                status=None,
                code=result.get("code"),
                message=result.get("error"),
                request_id=body.get("request_id"),
            )
    return results


def _data_key(data: Mapping[str, Any], *, wrapped: bool) -> DataKey:
    expires_at = data.get("expires_at")
    if expires_at is not None and not _is_int(expires_at):
        raise UnexpectedResponse("The sidecar's answer has an invalid 'expires_at'.")
    return new_data_key(
        None if wrapped else _b64(data, "plaintext"),
        _str(data, "ciphertext"),
        _int(data, "key_version"),
        expires_at,
    )


def _data_keys(results: list[Mapping[str, Any]], *, wrapped: bool) -> list[DataKey]:
    """``_data_key`` of every batch result, in one tight loop (a pool reads 1,000 at a time)."""
    keys: list[DataKey] = []
    append = keys.append
    for result in results:
        try:
            ciphertext = result["ciphertext"]
            key_version = result["key_version"]
            expires_at = result.get("expires_at")
            plaintext = None if wrapped else _strict_b64decode(result["plaintext"])
        except (KeyError, TypeError, ValueError, binascii.Error):
            return [_data_key(result, wrapped=wrapped) for result in results]  # names the field
        if (
            type(ciphertext) is not str
            or not ciphertext
            or type(key_version) is not int
            or (expires_at is not None and type(expires_at) is not int)
        ):
            return [_data_key(result, wrapped=wrapped) for result in results]
        append(_tuple_new(DataKey, (plaintext, ciphertext, key_version, expires_at)))
    return keys


def _ciphertext(body: Mapping[str, Any]) -> str:
    return _str(_data(body), "ciphertext")


def _str(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise UnexpectedResponse(f"The sidecar's answer has no valid '{name}'.")
    return value


def _int(data: Mapping[str, Any], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UnexpectedResponse(f"The sidecar's answer has no valid '{name}'.")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _b64(data: Mapping[str, Any], name: str) -> bytes:
    value = data.get(name)
    if not isinstance(value, str):
        raise UnexpectedResponse(f"The sidecar's answer has no valid '{name}'.")
    try:
        return _strict_b64decode(value)
    except (binascii.Error, ValueError):
        raise UnexpectedResponse(f"The sidecar's answer has no valid '{name}'.") from None


def _strict_b64decode(value: str) -> bytes:
    """Standard base64, refusing any character outside the alphabet (a pool decodes ~1,000 of
    these per refill: ``binascii`` strict mode where there is one, no regex)."""
    if sys.version_info >= (3, 11):
        return binascii.a2b_base64(value, strict_mode=True)
    return base64.b64decode(value, validate=True)
