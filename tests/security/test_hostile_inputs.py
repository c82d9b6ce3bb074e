"""The inputs that once reached a 500 or echoed without bound: each is now a 400 naming its field.

Driven through the real app in process (over the memory backend), so each case goes through the
same middleware, field parsers, policy and keyring a caller's request does.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.errors import QUOTE_LIMIT
from tests.security.inprocess import InProcessSidecar, Reply, in_process_sidecar


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessSidecar]:
    yield from in_process_sidecar(tmp_path_factory.mktemp("hostile"))


def post(
    sidecar: InProcessSidecar, path: str, body: Any = None, *, raw: bytes | None = None
) -> Any:
    data = raw if raw is not None else json.dumps(body).encode()
    reply = sidecar.request("POST", path, data=data)
    return reply, json.loads(reply.raw)


def error_of(reply: Reply, body: Any) -> tuple[int, str, str]:
    return reply.status, body.get("code"), body["errors"][0]


@pytest.fixture(autouse=True)
def _nothing_logged_at_error(sidecar: InProcessSidecar) -> Iterator[None]:
    before = len(sidecar.records.errors())
    yield
    assert sidecar.records.errors()[before:] == []


DATAKEY = "/v1/transit/datakey/plaintext/payments"


@pytest.mark.parametrize(
    ("field", "value", "wording"),
    [
        ("bits", "²", "Field 'bits' must be 128, 256 or 512."),
        ("bits", "٢٥٦", "Field 'bits' must be 128, 256 or 512."),
        ("bits", 256.5, "Field 'bits' must be 128, 256 or 512."),
        ("bits", True, "Field 'bits' must be 128, 256 or 512."),
        ("ttl", 1e300, "Field 'ttl' must be more than 0 and at most"),
        ("ttl", 18446744073709551616, "Field 'ttl' must be more than 0 and at most"),
        ("ttl", 10**400, "Field 'ttl' must be more than 0 and at most"),
        ("ttl", "99999999999999999999d", "Field 'ttl' must be more than 0 and at most"),
        ("ttl", "1" * 5000, "Field 'ttl' must be seconds or a duration"),
        ("ttl", "\u0669\u0660s", "Field 'ttl' must be seconds or a duration"),
        ("ttl", "0s", "Field 'ttl' must be more than 0 and at most"),
        ("ttl", -5, "Field 'ttl' must be positive."),
        ("ttl", [], "Field 'ttl' must be seconds or a duration"),
        ("encryption_context", {"a": "\ud800"}, "Field 'encryption_context' must be an object"),
        ("encryption_context", {"\udfff": "v"}, "Field 'encryption_context' must be an object"),
        ("encryption_context", {"a": 1}, "Field 'encryption_context' must be an object"),
        ("encryption_context", ["a"], "Field 'encryption_context' must be an object"),
    ],
)
def test_a_bad_datakey_field_is_a_400_naming_it(
    sidecar: InProcessSidecar, field: str, value: Any, wording: str
) -> None:
    # json.dumps escapes a lone surrogate as \\ud800, which Python's json reads back as one.
    reply, body = post(sidecar, DATAKEY, {field: value})
    status, code, message = error_of(reply, body)
    assert (status, code) == (400, "invalid_request")
    assert message.startswith(wording)


@pytest.mark.parametrize("constant", [b"Infinity", b"-Infinity", b"NaN", b"1e400", b"-1e999"])
def test_json_that_is_not_a_number_is_refused_at_parse(
    sidecar: InProcessSidecar, constant: bytes
) -> None:
    reply, body = post(sidecar, DATAKEY, raw=b'{"ttl": ' + constant + b"}")
    assert (reply.status, body["code"]) == (400, "invalid_request")
    assert "request body holds" in body["errors"][0]


def test_one_hostile_batch_item_fails_alone(sidecar: InProcessSidecar) -> None:
    items = [{"bits": 128}, {"bits": "²"}, {"ttl": "Infinity"}, {"ttl": 1e300}, {}]
    items.append({"encryption_context": {"k": "\ud800"}})
    reply, body = post(sidecar, DATAKEY, {"batch_input": items})
    assert reply.status < 500
    results = body["data"]["batch_results"]
    assert len(results) == len(items)
    assert "ciphertext" in results[0] and "ciphertext" in results[4]
    assert [r.get("code") for r in results[1:4] + results[5:]] == ["invalid_request"] * 4


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/transit/datakey/plaintext/signer", {}),
        ("/v1/transit/datakey/wrapped/signer", {}),
        ("/v1/transit/encrypt/signer", {"plaintext": base64.b64encode(b"x").decode()}),
    ],
)
def test_sealing_with_a_signing_key_is_refused_without_an_upstream_call(
    sidecar: InProcessSidecar, path: str, body: dict[str, Any]
) -> None:
    calls = sum(sidecar.backend.calls.values())
    reply, answer = post(sidecar, path, body)
    assert (reply.status, answer["code"]) == (400, "invalid_request")
    assert "ecdsa-p256 key" in answer["errors"][0]
    assert sum(sidecar.backend.calls.values()) == calls


@pytest.mark.parametrize("version", ["²", "\u0661", 2**64, -1, 1.5, "4294967296"])
def test_a_bad_sign_key_version_is_a_400(sidecar: InProcessSidecar, version: Any) -> None:
    reply, body = post(
        sidecar, "/v1/transit/sign/signer", {"input": "aGk=", "key_version": version}
    )
    assert (reply.status, body["code"]) == (400, "invalid_request")
    assert body["errors"][0] == "Field 'key_version' must be a positive version number."


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/transit/sign/signer", {"input": "aGk=", "hash_algorithm": "x" * 900_000}),
        ("/v1/transit/sign/signer", {"input": "aGk=", "marshaling_algorithm": "m" * 900_000}),
        ("/v1/transit/sign/signer/" + "h" * 4000, {"input": "aGk="}),
        ("/v1/transit/datakey/plaintext/" + "k" * 4000, {}),
        ("/v1/transit/datakey/plaintext/payments", {"ttl": "9" * 900_000 + "q"}),
    ],
)
def test_an_error_quotes_at_most_a_short_prefix(
    sidecar: InProcessSidecar, path: str, body: dict[str, Any]
) -> None:
    reply, answer = post(sidecar, path, body)
    assert 400 <= reply.status < 500
    assert len(answer["errors"][0]) < QUOTE_LIMIT + 200
    assert len(reply.raw) < 1000


@pytest.mark.parametrize(
    "blob",
    [
        "sidecar:v²:AAAA",
        "sidecar:v" + "9" * 5000 + ":AAAA",
        "vault:v²:AAAA",
        "vault:v" + "9" * 5000 + ":AAAA",
        "sidecar:v1:\ud800",
    ],
)
def test_a_malformed_version_in_a_ciphertext_is_not_a_crash(
    sidecar: InProcessSidecar, blob: str
) -> None:
    reply, body = post(sidecar, "/v1/transit/decrypt/payments", {"ciphertext": blob})
    assert 400 <= reply.status < 500, body


@pytest.mark.parametrize("code", ["9" * 5000, "²", 2.5e2, "Infinity", True, 199, 600])
def test_a_bad_partial_failure_response_code_is_a_400(sidecar: InProcessSidecar, code: Any) -> None:
    reply, body = post(
        sidecar, DATAKEY, {"batch_input": [{}], "partial_failure_response_code": code}
    )
    assert (reply.status, body["code"]) == (400, "invalid_request")
    assert body["errors"][0].startswith("Field 'partial_failure_response_code' must be")


def test_head_on_health_answers_the_status_without_a_body(sidecar: InProcessSidecar) -> None:
    """As docs/api.md says (and Vault's health endpoint does), for probes that read the status."""
    reply = sidecar.request("HEAD", "/v1/sys/health")
    assert (reply.status, reply.raw) == (200, b"")
