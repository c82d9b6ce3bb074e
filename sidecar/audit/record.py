"""Audit records: the facts one decision leaves in the audit log, and nothing secret.

A record is built only by :func:`audit_record`, which takes a fixed set of facts: there is no
field for key bytes, plaintext, ciphertext, tokens or free text from a caller. Two kinds of value
are identifying without being needed in clear, so they are HMAC-SHA256'd with the audit key, as
Vault's audit devices do (``hmac-sha256:<hex>``): encryption-context **values** (the keys stay
clear) and subjects (the JWT ``sub`` and the mTLS certificate subject). Anyone holding the key can
check a known value against the log with :func:`hash_value`; no one can read the value back.

Outcomes, one per record:

``ok``
    The caller was allowed and the operation completed.
``denied``
    Refused before the operation: authentication, policy or rate limit. ``error_code`` says which.
``error``
    Allowed, but the operation failed (``decryption_failed``, ``upstream_unavailable``, ...).
``client_closed``
    The caller went away before the request was read whole (it disconnected mid-body); nothing
    was done and nothing answered.
``allowed``
    An intent record: allowed by policy, written *before* an operation with an effect outside the
    sidecar (such as rotating a root key), so the effect can never happen unaudited. The record
    that follows with the same ``request_id`` says how it ended.

Each item of a ``batch_input`` is a decision of its own and gets its own record, sharing the
request's ``request_id`` and carrying ``batch_index`` (0-based, in request order) and
``batch_size``; a request that fails before its items are read (bad JSON, a refused token) leaves
one record without them.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from json.encoder import encode_basestring as _esc
from typing import Final, TextIO

from sidecar.errors import ConfigError
from sidecar.identity import Identity

log = logging.getLogger(__name__)

OUTCOMES: Final = frozenset({"ok", "denied", "error", "allowed", "client_closed"})
#: Outcomes that must carry an ``error_code``.
FAILED_OUTCOMES: Final = frozenset({"denied", "error"})

HMAC_PREFIX: Final = "hmac-sha256:"
#: The shortest audit HMAC key accepted from the environment, in bytes.
MIN_HMAC_KEY_BYTES: Final = 32
#: Bounds on what one record keeps of an encryption context (see ``context_omitted``).
MAX_CONTEXT_ENTRIES: Final = 64
MAX_CONTEXT_KEY_CHARS: Final = 128
MAX_CAUSE_CHARS: Final = 200

_KEY_ID_LABEL: Final = b"kms-sidecar audit hmac key id"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One request's audit facts, not yet chained. Make it with :func:`audit_record`.

    ``fields`` holds only JSON strings, integers, null and objects of those (the chain hashes a
    canonical JSON form, and floats have none); it is what the log will hold apart from the
    chain fields, for telemetry that mirrors audit records. ``canonical`` is the same, already
    rendered as canonical JSON in three parts, around where ``prev`` and ``seq`` go.
    """

    fields: Mapping[str, object]
    canonical: tuple[str, str, str] | None = None


def hash_value(hmac_key: bytes, value: str) -> str:
    """``hmac-sha256:<hex>`` of ``value``'s UTF-8 bytes under ``hmac_key``, as in the audit log.

    Equivalent to ``printf %s VALUE | openssl dgst -sha256 -hmac "$KMS_AUDIT_HMAC_KEY"``.
    """
    mac = _keyed(hmac_key).copy()  # the key schedule is computed once per key
    mac.update(value.encode("utf-8", "surrogatepass"))
    return HMAC_PREFIX + mac.hexdigest()


@functools.lru_cache(maxsize=4)
def _keyed(hmac_key: bytes) -> hmac.HMAC:
    return hmac.new(hmac_key, digestmod=hashlib.sha256)


def hmac_key_id(hmac_key: bytes) -> str:
    """A short public fingerprint of the audit HMAC key (16 hex digits), written in ``start``
    records so an auditor can tell which key hashed which records. It reveals nothing of the key.
    """
    return hmac.digest(hmac_key, _KEY_ID_LABEL, "sha256")[:8].hex()


def load_hmac_key(env_name: str, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The audit HMAC key from the environment variable ``env_name``: its value's UTF-8 bytes.

    Returns ``None`` when the variable is unset (the caller then uses a random per-process key).
    Raises ``ConfigError`` naming ``audit.hmac_key_env`` when it is set but shorter than
    :data:`MIN_HMAC_KEY_BYTES` (including empty, usually a failed substitution): a short key lets
    anyone with the log guess low-entropy values such as tenant ids.
    """
    env = os.environ if environ is None else environ
    value = env.get(env_name)
    if value is None:
        return None
    key = value.encode("utf-8", "surrogateescape")
    if len(key) < MIN_HMAC_KEY_BYTES:
        raise ConfigError(
            f"audit.hmac_key_env: ${env_name} holds {len(key)} bytes; use at least "
            f"{MIN_HMAC_KEY_BYTES}, for example the output of `openssl rand -hex 32`"
        )
    return key


def format_time(unix_seconds: float) -> str:
    """RFC 3339 UTC with microseconds: ``2025-01-31T12:00:00.000000Z``."""
    whole = math.floor(unix_seconds)
    micros = round((unix_seconds - whole) * 1_000_000)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    return f"{_seconds_text(whole)}.{micros:06d}Z"


@functools.lru_cache(maxsize=2)
def _seconds_text(whole: int) -> str:
    return datetime.fromtimestamp(whole, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def audit_record(
    *,
    time: float,
    request_id: str,
    trace_id: str | None,
    identity: Identity | None,
    rule: str | None,
    operation: str,
    key: str | None,
    root_version: int | None,
    kek_id: str | None,
    outcome: str,
    error_code: str | None,
    context: Mapping[str, str] | None,
    hmac_key: bytes,
    cause: str | None = None,
    batch_index: int | None = None,
    batch_size: int | None = None,
) -> AuditRecord:
    """The audit record of one decision: a request, or one item of a batch.

    ``time`` is Unix seconds (``time.time()``); ``kek_id`` is hex; ``rule`` is the policy rule that
    allowed or denied (``None`` when nothing matched, or before the policy check). ``outcome`` is
    one of :data:`OUTCOMES`; ``denied`` and ``error`` need an ``error_code``, ``ok`` and
    ``allowed`` must not have one. ``cause`` is the reason the caller is not told, such as
    ``DecryptionFailed.cause``: a phrase chosen by the sidecar's code, never text from the caller
    or a policy ``reason`` (those quote JWT subjects and claims in clear). ``hmac_key`` hashes the
    context values and subjects. ``batch_index`` (0-based) and ``batch_size`` are given together,
    for an item of a ``batch_input``. Raises ``ValueError``/``TypeError`` for a misuse.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, got {outcome!r}")
    if (outcome in FAILED_OUTCOMES) != (error_code is not None):
        raise ValueError(
            f"outcome {outcome!r} {'needs' if error_code is None else 'takes no'} error_code"
        )
    if cause is not None and outcome not in FAILED_OUTCOMES:
        raise ValueError(f"outcome {outcome!r} takes no cause")
    if not hmac_key:
        raise ValueError("hmac_key must not be empty")
    if (batch_index is None) != (batch_size is None) or (
        batch_index is not None and batch_size is not None and not 0 <= batch_index < batch_size
    ):
        raise ValueError("batch_index and batch_size go together, 0 <= batch_index < batch_size")
    if root_version is not None and (isinstance(root_version, bool) or root_version < 0):
        raise ValueError("root_version must be a non-negative integer")
    identity_facts = _identity_facts(identity, hmac_key)
    kept, omitted = (None, 0) if context is None else _hashed_context(context, hmac_key)
    fields: dict[str, object] = {
        "cause": None if cause is None else _text(cause)[:MAX_CAUSE_CHARS],
        "context": kept,
        "error_code": _opt_text(error_code),
        "event": "request",
        "identity": identity_facts,
        "kek_id": _opt_text(kek_id),
        "key": _opt_text(key),
        "operation": _text(operation),
        "outcome": outcome,
        "request_id": _text(request_id),
        "root_version": root_version,
        "rule": _opt_text(rule),
        "time": format_time(time),
        "trace_id": _opt_text(trace_id),
    }
    if omitted:
        fields["context_omitted"] = omitted
    if batch_index is not None:
        fields["batch_index"] = batch_index
        fields["batch_size"] = batch_size
    return AuditRecord(fields, _render(fields, identity_facts, kept, omitted))


def _render(
    fields: Mapping[str, object],
    identity: Mapping[str, object],
    context: Mapping[str, str] | None,
    omitted: int,
) -> tuple[str, str, str]:
    """The canonical JSON of a request record without its chain fields, split where ``prev``
    and ``seq`` go (keys sorted: batch_index < batch_size < cause < context < ... < outcome <
    prev < request_id < ... < rule < seq < time < trace_id < v). Equal, byte for byte, to
    ``chain.canonical_json``: a unit test holds the two together. It is done by hand because it
    is three times faster.
    """
    j = _json_value
    ctx = (
        "null"
        if context is None
        else "{" + ",".join([f"{_esc(k)}:{_esc(v)}" for k, v in context.items()]) + "}"
    )
    ident = (
        f'{{"exe":{j(identity["exe"])},"gid":{j(identity["gid"])},'
        f'"jwt_iss":{j(identity["jwt_iss"])},"jwt_sub":{j(identity["jwt_sub"])},'
        f'"kind":{j(identity["kind"])},"pid":{j(identity["pid"])},'
        f'"spiffe_id":{j(identity["spiffe_id"])},"tls_subject":{j(identity["tls_subject"])},'
        f'"uid":{j(identity["uid"])}}}'
    )
    omitted_part = f'"context_omitted":{omitted},' if omitted else ""
    batch = (
        f'"batch_index":{j(fields["batch_index"])},"batch_size":{j(fields["batch_size"])},'
        if "batch_index" in fields
        else ""
    )
    before_prev = (
        f'{{{batch}"cause":{j(fields["cause"])},"context":{ctx},{omitted_part}'
        f'"error_code":{j(fields["error_code"])},"event":"request","identity":{ident},'
        f'"kek_id":{j(fields["kek_id"])},"key":{j(fields["key"])},'
        f'"operation":{j(fields["operation"])},"outcome":{j(fields["outcome"])},'
    )
    before_seq = (
        f'"request_id":{j(fields["request_id"])},"root_version":{j(fields["root_version"])},'
        f'"rule":{j(fields["rule"])},'
    )
    after_seq = f'"time":{j(fields["time"])},"trace_id":{j(fields["trace_id"])}'
    return before_prev, before_seq, after_seq


def _json_value(value: object) -> str:
    if value is None:
        return "null"
    if type(value) is str:
        return _esc(value)
    if type(value) is int:
        return int.__repr__(value)
    raise TypeError(f"unexpected {type(value).__name__} in an audit record")


def _identity_facts(identity: Identity | None, hmac_key: bytes) -> dict[str, object]:
    identity = identity or Identity()
    peer, jwt, tls = identity.peer, identity.jwt, identity.tls
    return {
        "exe": _opt_text(peer.exe) if peer else None,
        "gid": peer.gid if peer else None,
        "jwt_iss": _text(jwt.issuer) if jwt else None,
        "jwt_sub": hash_value(hmac_key, jwt.subject) if jwt else None,
        "kind": identity.kind,
        "pid": peer.pid if peer else None,
        "spiffe_id": _opt_text(tls.spiffe_id) if tls else None,
        "tls_subject": hash_value(hmac_key, tls.subject) if tls else None,
        "uid": peer.uid if peer else None,
    }


def _hashed_context(context: Mapping[str, str], hmac_key: bytes) -> tuple[dict[str, str], int]:
    """Context keys in clear with hashed values, the first entries by key; and how many were left
    out (more than :data:`MAX_CONTEXT_ENTRIES`, or a key longer than
    :data:`MAX_CONTEXT_KEY_CHARS`), so one request cannot make a megabyte record.
    """
    kept: dict[str, str] = {}
    omitted = 0
    reorder = False
    for name in sorted(context):
        value = context[name]
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError("encryption context keys and values must be strings")
        clean = _text(name)
        if len(kept) >= MAX_CONTEXT_ENTRIES or len(name) > MAX_CONTEXT_KEY_CHARS or clean in kept:
            omitted += 1
            continue
        if clean != name:
            reorder = True
        kept[clean] = hash_value(hmac_key, value)
    if reorder:  # an escaped key may sort elsewhere; the rendering needs sorted keys
        kept = dict(sorted(kept.items()))
    return kept, omitted


def _text(value: str) -> str:
    """``value`` as text that encodes to UTF-8: undecodable bytes (an executable path read with
    ``surrogateescape``) and lone surrogates become visible ``\\xNN``/``\\udNNN`` escapes.
    """
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape") if _only_escapes(value) else None
        if raw is not None:
            return raw.decode("utf-8", "backslashreplace")
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _only_escapes(value: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in value)


def _opt_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


def hash_command(
    values: Sequence[str],
    *,
    key_env: str = "KMS_AUDIT_HMAC_KEY",
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print ``hmac-sha256:<hex>`` of each value, one per line, with the key in ``$key_env``.

    For ``kms-sidecar audit hash VALUE...``: ``grep -F`` the output in the log to find records
    about a known tenant or subject. The key's id goes to ``err``; compare it with
    ``hmac_key_id`` in the log's ``start`` records. Returns 0, or 2 when the key is missing.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        key = load_hmac_key(key_env, environ)
    except ConfigError as exc:
        print(f"error: {exc}", file=err)
        return 2
    if key is None:
        print(
            f"error: ${key_env} is not set; export the audit HMAC key the sidecar runs with",
            file=err,
        )
        return 2
    print(f"hmac key id {hmac_key_id(key)}", file=err)
    for value in values:
        print(hash_value(key, value), file=out)
    return 0


def ephemeral_hmac_key(env_name: str) -> bytes:
    """A random key for this process, with the warning that its hashes are not comparable."""
    log.warning(
        "$%s is not set: audit values are hashed with a random key for this process only, so "
        "they cannot be compared across restarts or checked with `kms-sidecar audit hash`",
        env_name,
    )
    return os.urandom(MIN_HMAC_KEY_BYTES)
