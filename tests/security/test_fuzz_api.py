"""Any body on any route: the answer is a 2xx or 4xx in Vault's shape, and nothing leaks.

A hypothesis property suite over the HTTP API of the real app, in process over the memory
backend (fast: hundreds of requests a second). For every generated request:

- the status is 2xx or 4xx, never 5xx;
- an error body is Vault's ``{"errors": [message], "code", "request_id"}`` with the code's status,
  and its message is short whatever the caller sent;
- no response holds a KEK, and no error holds the caller's token or plaintext;
- nothing is logged at ERROR or with a traceback.

Bodies are built from the API's own field names with hostile values (other scripts' digits,
lone surrogates, huge and non-finite numbers, wrong types, nesting), real blobs mutated, raw
bytes, and ``Infinity``/``NaN`` as Python's ``json`` writes them. The budget is the hypothesis
profile's (``ci`` by default; ``HYPOTHESIS_PROFILE=long`` for a campaign).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.errors import QUOTE_LIMIT
from sidecar.server.app import ROUTES
from sidecar.server.errors import STATUS_BY_CODE
from tests.security.inprocess import KEY_TYPES, InProcessSidecar, Reply, in_process_sidecar

FIELDS = (
    "bits",
    "ttl",
    "encryption_context",
    "associated_data",
    "plaintext",
    "ciphertext",
    "batch_input",
    "reference",
    "key_version",
    "input",
    "signature",
    "hash_algorithm",
    "marshaling_algorithm",
    "prehashed",
    "context",
    "key",
    "partial_failure_response_code",
)
METHODS = ("GET", "POST", "PUT", "HEAD", "DELETE", "PATCH", "OPTIONS")
TOKEN = "hostile-token-" + "k" * 24
PLAINTEXT = base64.b64encode(b"the caller's secret plaintext").decode()
#: Longest error message any input may produce: the wording plus a quoted prefix.
MESSAGE_LIMIT = QUOTE_LIMIT + 240


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessSidecar]:
    yield from in_process_sidecar(tmp_path_factory.mktemp("fuzz-api"))


@pytest.fixture(scope="module")
def blobs(sidecar: InProcessSidecar) -> list[str]:
    """Real blobs, with and without a context and an expiry, to mutate."""
    made = []
    for body in ({}, {"encryption_context": {"tenant": "acme"}}, {"ttl": "1h"}):
        reply = sidecar.request(
            "POST", "/v1/transit/datakey/wrapped/payments", data=json.dumps(body).encode()
        )
        made.append(json.loads(reply.raw)["data"]["ciphertext"])
    return made


# -- strategies ----------------------------------------------------------------------------

hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["²", "٢٥٦", "256", "0", "-1", "1e400", "Infinity", "NaN", "\ud800", "\udfff", "90s", "5m"]
    ),
    st.sampled_from(["99999999999999999999d", "18446744073709551616", "9" * 5000, " 1 s "]),
    st.text(alphabet="0123456789.smhd ", max_size=30),
    st.builds(lambda n: "x" * n, st.integers(0, 20_000)),
)
hostile_number = st.one_of(
    st.integers(),
    st.integers(min_value=2**63, max_value=2**70),
    st.sampled_from([0, 1, 128, 256, 512, -1, 2**32, 2**64, 10**300]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalar = st.one_of(st.none(), st.booleans(), hostile_number, hostile_text)
json_value = st.recursive(
    scalar,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), hostile_text), children, max_size=4),
    ),
    max_leaves=12,
)


def _mutated(blob: str, data: st.DataObject) -> str:
    how = data.draw(st.sampled_from(["flip", "cut", "version", "prefix", "b64", "keep"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(blob) - 1))
        return blob[:i] + data.draw(st.characters()) + blob[i + 1 :]
    if how == "cut":
        return blob[: data.draw(st.integers(0, len(blob)))]
    if how == "version":
        head, _, rest = blob.partition(":v")
        return f"{head}:v{data.draw(hostile_text)}:{rest.partition(':')[2]}"
    if how == "prefix":
        return data.draw(st.sampled_from(["vault:", "sidecar:", "", "SIDECAR:"])) + blob[8:]
    if how == "b64":
        raw = bytearray(base64.b64decode(blob.split(":", 2)[2]))
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
        return blob.rsplit(":", 1)[0] + ":" + base64.b64encode(bytes(raw)).decode()
    return blob


@st.composite
def item(draw: st.DrawFn, blobs: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = draw(st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=5))
    if draw(st.booleans()):
        body["ciphertext"] = _mutated(draw(st.sampled_from(blobs)), draw(st.data()))
    if draw(st.booleans()):
        body["plaintext"] = PLAINTEXT
    return body


@st.composite
def request_body(draw: st.DrawFn, blobs: list[str]) -> bytes:
    kind = draw(st.sampled_from(["json", "json", "batch", "raw", "empty"]))
    if kind == "raw":
        return draw(st.binary(max_size=300))
    if kind == "empty":
        return draw(st.sampled_from([b"", b"null", b"{}", b"[]", b" ", b'"x"', b"1"]))
    if kind == "batch":
        items = draw(st.lists(item(blobs), min_size=0, max_size=6))
        body: Any = {"batch_input": items, **draw(item(blobs))}
    else:
        body = draw(st.one_of(item(blobs), json_value))
    # allow_nan writes Infinity and NaN, which Python's json reads back; a caller can send them.
    return json.dumps(body, allow_nan=True).encode()


def path_for(template: str, draw: st.DrawFn) -> str:
    name = draw(st.one_of(st.sampled_from([*KEY_TYPES, "unknown"]), st.text(min_size=1)))
    hash_ = draw(st.one_of(st.sampled_from(["sha2-256", "sha3-512", "md5"]), st.text(min_size=1)))
    path = template.replace("{name}", name).replace("{hash}", hash_)
    # What a client would put on the wire: percent-encode all but the separators.
    from urllib.parse import quote

    return quote(path, safe="/", errors="surrogatepass")


@st.composite
def api_request(draw: st.DrawFn, blobs: list[str]) -> tuple[str, str, bytes, dict[str, str]]:
    templates = [route.path for route in ROUTES]
    template = draw(st.one_of(st.sampled_from(templates), st.just("/v1/{name}")))
    method = draw(st.sampled_from(METHODS))
    headers: dict[str, str] = {}
    token = draw(st.sampled_from([None, "bearer", "vault", "scheme"]))
    if token == "bearer":
        headers["Authorization"] = f"Bearer {TOKEN}"
    elif token == "vault":
        headers["X-Vault-Token"] = TOKEN
    elif token == "scheme":
        headers["Authorization"] = f"Basic {TOKEN}"
    if draw(st.booleans()):
        headers["traceparent"] = draw(
            st.one_of(
                st.just("00-" + "a" * 32 + "-" + "b" * 16 + "-01"),
                st.text(alphabet="0123456789abcdefxyz-", max_size=60),
            )
        )
    return method, path_for(template, draw), draw(request_body(blobs)), headers


# -- properties ----------------------------------------------------------------------------


#: Routes whose 2xx body is not Vault's envelope: health and Vault's own bare sys answers (as
#: OpenBao gives them), and the JWKS.
BARE_BODIES = ("/v1/sys/health", "/v1/sys/seal-status", "/v1/sys/leader", "/v1/sidecar/jwks/")


def check_reply(sidecar: InProcessSidecar, method: str, path: str, reply: Reply) -> None:
    if reply.status >= 500 and b'"batch_results"' in reply.raw:
        return  # the status the caller chose with partial_failure_response_code, as in Vault
    assert reply.status < 500, (method, path, reply.status, reply.raw[:300])
    assert reply.status >= 200
    for kek in sidecar.keks():
        for form in (base64.b64encode(kek), kek.hex().encode()):
            assert form not in reply.raw
    if method == "HEAD" or (path == "/metrics" and reply.status == 200):
        return
    body = json.loads(reply.raw)
    if reply.status >= 400 and "batch_results" in body.get("data", {}):
        # Vault's answer when an item failed: 400, each item's result or error in order.
        for result in body["data"]["batch_results"]:
            if "error" in result:
                assert STATUS_BY_CODE[result["code"]] < 500, result
                assert 0 < len(result["error"]) <= MESSAGE_LIMIT, result["error"][:300]
        assert TOKEN not in reply.raw.decode(errors="replace")
    elif reply.status >= 400:
        assert set(body) >= {"errors", "code", "request_id"}, body
        assert STATUS_BY_CODE[body["code"]] == reply.status
        (message,) = body["errors"]
        assert isinstance(message, str) and 0 < len(message) <= MESSAGE_LIMIT, message[:300]
        assert TOKEN not in reply.raw.decode(errors="replace")
        assert PLAINTEXT not in reply.raw.decode(errors="replace")
    elif not path.startswith(BARE_BODIES):
        assert set(body) >= {"request_id", "data"}, body


def test_any_request_is_answered_with_a_2xx_or_4xx(
    sidecar: InProcessSidecar, blobs: list[str]
) -> None:
    before = len(sidecar.records.errors())

    @given(api_request(blobs))
    def run(request: tuple[str, str, bytes, dict[str, str]]) -> None:
        method, path, data, headers = request
        reply = sidecar.request(method, path, data=data, headers=headers)
        check_reply(sidecar, method, path, reply)
        assert sidecar.records.errors()[before:] == []

    run()


def test_any_batch_item_fails_alone(sidecar: InProcessSidecar, blobs: list[str]) -> None:
    """A good item keeps its result whatever the items around it hold."""

    @given(st.lists(item(blobs), max_size=5), st.integers(0, 5))
    def run(items: list[dict[str, Any]], at: int) -> None:
        batch = [*items[:at], {"bits": 128}, *items[at:]]
        body = json.dumps({"batch_input": batch}, allow_nan=True)
        reply = sidecar.request("POST", "/v1/transit/datakey/wrapped/payments", data=body.encode())
        check_reply(sidecar, "POST", "/v1/transit/datakey/wrapped/payments", reply)
        try:
            json.dumps(batch, allow_nan=False)
        except ValueError:  # Infinity or NaN is not JSON: the whole body is refused at parse
            assert reply.status == 400
            return
        results = json.loads(reply.raw)["data"]["batch_results"]
        assert len(results) == len(batch)
        assert "ciphertext" in results[min(at, len(items))]

    run()
