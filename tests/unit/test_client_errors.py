"""The client SDK against a scripted fake sidecar: request shapes, typed errors, unreachable socket.

The fake answers whatever each test scripts, on a real Unix socket, so both the aiohttp client and
the blocking one run their real transports. Blocking calls run in a worker thread because the fake
serves on the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web

import sidecar.client
from sidecar.client import (
    AsyncClient,
    AuditUnavailable,
    Client,
    DecryptionFailed,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    SidecarError,
    SidecarUnreachable,
    Unauthenticated,
    UnexpectedResponse,
    UnknownPath,
    UpstreamError,
    UpstreamUnavailable,
)


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: dict[str, str]
    json: Any


@dataclass
class FakeSidecar:
    """Records each request and answers with ``status``/``body``/``headers`` (``raw`` if set)."""

    socket_path: str
    status: int = 200
    body: Any = field(default_factory=lambda: {"request_id": "r-ok", "data": {}})
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    chunked: bool = False
    hang: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    seen: list[Seen] = field(default_factory=list)
    #: The transport of every connection a request came on (kept, so ids stay unique).
    connections: list[Any] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.UnixSite(self.runner, self.socket_path).start()

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def restart(self) -> None:
        await self.stop()
        self.release = asyncio.Event()
        await self.start()

    def answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or {}

    def error(self, status: int, code: str, message: str, **headers: str) -> None:
        self.answer(status, {"errors": [message], "code": code, "request_id": "r-42"}, headers)

    @property
    def last(self) -> Seen:
        return self.seen[-1]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw_body = await request.read()
        if all(request.transport is not t for t in self.connections):
            self.connections.append(request.transport)
        self.seen.append(
            Seen(
                request.method,
                request.raw_path,
                dict(request.headers),
                json.loads(raw_body) if raw_body else None,
            )
        )
        if self.hang:
            await self.release.wait()
        body = self.raw if self.raw is not None else json.dumps(self.body).encode()
        if self.chunked:
            response = web.StreamResponse(status=self.status, headers=self.headers)
            response.content_type = "application/json"
            response.enable_chunked_encoding()
            await response.prepare(request)
            for at in range(0, len(body), 100_000):
                await response.write(body[at : at + 100_000])
            await response.write_eof()
            return response
        return web.Response(
            status=self.status, body=body, headers=self.headers, content_type="application/json"
        )


@pytest.fixture
async def fake() -> AsyncIterator[FakeSidecar]:
    with tempfile.TemporaryDirectory(prefix="kms-") as directory:
        fake = FakeSidecar(os.path.join(directory, "sidecar.sock"))
        await fake.start()
        try:
            yield fake
        finally:
            await fake.stop()


@pytest.fixture(params=["async", "sync"])
def call(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``await call(socket_path, "method", *args, **kwargs)`` with a fresh client of each kind."""
    kind = request.param

    async def run(socket_path: str, method: str, *args: Any, **kwargs: Any) -> Any:
        options = kwargs.pop("client_options", {})
        if kind == "async":
            async with AsyncClient(socket_path, **options) as client:
                return await getattr(client, method)(*args, **kwargs)

        def blocking() -> Any:
            with Client(socket_path, **options) as client:
                return getattr(client, method)(*args, **kwargs)

        return await asyncio.to_thread(blocking)

    return run


ERRORS = [
    (400, "invalid_request", InvalidRequest),
    (413, "payload_too_large", PayloadTooLarge),
    (400, "decryption_failed", DecryptionFailed),
    (401, "unauthenticated", Unauthenticated),
    (403, "permission_denied", PermissionDenied),
    (404, "unknown_path", UnknownPath),
    (405, "method_not_allowed", MethodNotAllowed),
    (429, "rate_limited", RateLimited),
    (502, "upstream_error", UpstreamError),
    (503, "upstream_unavailable", UpstreamUnavailable),
    (503, "audit_unavailable", AuditUnavailable),
    (500, "internal", InternalError),
]


@pytest.mark.parametrize(("status", "code", "cls"), ERRORS)
async def test_error_code_becomes_the_servers_exception_class(
    fake: FakeSidecar, call: Callable[..., Any], status: int, code: str, cls: type[SidecarError]
) -> None:
    fake.error(status, code, "Something specific happened.")
    with pytest.raises(cls) as caught:
        await call(fake.socket_path, "decrypt", "payments", "sidecar:v1:AAAA")
    exc = caught.value
    assert type(exc) is cls
    assert exc.code == code
    assert str(exc) == "Something specific happened."
    assert exc.status == status  # type: ignore[attr-defined]
    assert exc.request_id == "r-42"  # type: ignore[attr-defined]


async def test_decryption_failed_keeps_the_servers_message_and_hides_any_cause(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    fake.error(400, "decryption_failed", "The ciphertext could not be decrypted.")
    with pytest.raises(DecryptionFailed) as caught:
        await call(fake.socket_path, "decrypt", "payments", "sidecar:v1:AAAA")
    assert str(caught.value) == "The ciphertext could not be decrypted."
    assert caught.value.cause == "reported by the sidecar"


@pytest.mark.parametrize(("header", "expected"), [("7", 7.0), ("0.5", 0.5), (None, 1.0)])
async def test_rate_limited_carries_retry_after(
    fake: FakeSidecar, call: Callable[..., Any], header: str | None, expected: float
) -> None:
    headers = {"Retry-After": header} if header is not None else {}
    fake.error(429, "rate_limited", "Too many requests; retry later.", **headers)
    with pytest.raises(RateLimited) as caught:
        await call(fake.socket_path, "datakey", "payments")
    assert caught.value.retry_after == expected


async def test_retry_after_as_an_http_date(fake: FakeSidecar, call: Callable[..., Any]) -> None:
    fake.error(429, "rate_limited", "Slow down.", **{"Retry-After": formatdate(time.time() + 120)})
    with pytest.raises(RateLimited) as caught:
        await call(fake.socket_path, "datakey", "payments")
    assert 100 < caught.value.retry_after <= 120


async def test_unknown_code_is_a_sidecar_error_that_keeps_the_code(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    fake.error(409, "quota_exceeded", "The key's quota is spent.")
    with pytest.raises(SidecarError) as caught:
        await call(fake.socket_path, "datakey", "payments")
    assert type(caught.value) is SidecarError
    assert caught.value.code == "quota_exceeded"
    assert str(caught.value) == "The key's quota is spent."


async def test_error_without_a_json_body_names_the_status(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    fake.answer(502, None)
    fake.raw = b"<html>Bad Gateway</html>"
    with pytest.raises(SidecarError) as caught:
        await call(fake.socket_path, "status")
    assert "HTTP 502" in str(caught.value)
    assert caught.value.status == 502  # type: ignore[attr-defined]


async def test_success_that_is_not_the_api_is_unexpected_response(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    fake.raw = b"hello"
    with pytest.raises(UnexpectedResponse):
        await call(fake.socket_path, "datakey", "payments")
    fake.raw = None
    fake.answer(200, {"data": {"plaintext": "not base64!", "ciphertext": "x", "key_version": 1}})
    with pytest.raises(UnexpectedResponse, match="plaintext"):
        await call(fake.socket_path, "datakey", "payments")


async def test_failed_batch_item_raises_its_error(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    good = {"plaintext": "AAAA", "ciphertext": "sidecar:v1:AA", "key_version": 1}
    bad = {"error": "Permission denied.", "code": "permission_denied"}
    fake.answer(400, {"request_id": "r-7", "data": {"batch_results": [good, bad]}})
    with pytest.raises(PermissionDenied) as caught:
        await call(fake.socket_path, "datakeys", "payments", 2)
    assert caught.value.request_id == "r-7"  # type: ignore[attr-defined]
    assert caught.value.status is None  # type: ignore[attr-defined]


async def test_batch_answered_400_raises_the_first_failed_items_error(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    # Vault's shape: HTTP 400 when any item failed, each item's own error and reference.
    good = {"plaintext": "AAAA", "reference": "a"}
    bad = {"error": "The ciphertext could not be decrypted.", "code": "decryption_failed"}
    worse = {"error": "Permission denied.", "code": "permission_denied"}
    fake.answer(
        400,
        {"request_id": "r-9", "data": {"batch_results": [good, {**bad, "reference": "b"}, worse]}},
    )
    with pytest.raises(DecryptionFailed) as caught:
        await call(fake.socket_path, "decrypt_batch", "payments", ["x", "y", "z"])
    assert caught.value.request_id == "r-9"  # type: ignore[attr-defined]
    assert str(caught.value) == "The ciphertext could not be decrypted."


async def test_batch_error_envelope_is_still_the_requests_error(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    fake.error(413, "payload_too_large", "Field 'batch_input' holds more than 1000 items.")
    with pytest.raises(PayloadTooLarge):
        await call(fake.socket_path, "datakeys", "payments", 3)


async def test_decrypt_batch_sends_one_item_per_blob_with_its_context(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    fake.answer(200, {"data": {"batch_results": [{"plaintext": "AA=="}, {"plaintext": "AQ=="}]}})
    contexts = [{"t": "1"}, None]
    assert await call(
        fake.socket_path, "decrypt_batch", "payments", ["b1", "b2"], contexts=contexts
    ) == [b"\x00", b"\x01"]
    assert fake.last.raw_path == "/v1/transit/decrypt/payments"
    assert fake.last.json == {
        "batch_input": [
            {"ciphertext": "b1", "encryption_context": {"t": "1"}},
            {"ciphertext": "b2"},
        ]
    }
    await call(fake.socket_path, "decrypt_batch", "payments", ["b1", "b2"], context={"a": "b"})
    assert [item["encryption_context"] for item in fake.last.json["batch_input"]] == [
        {"a": "b"}
    ] * 2


async def test_large_answer_in_many_reads_and_chunked(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    big = {"data": {"blob": "x" * 3_000_000}}
    fake.answer(200, big)
    assert await call(fake.socket_path, "status") == big["data"]
    fake.chunked = True
    assert await call(fake.socket_path, "status") == big["data"]


async def test_answer_that_closes_the_connection_is_read_and_the_next_call_reconnects(
    fake: FakeSidecar,
) -> None:
    fake.answer(200, {"data": {"ok": 1}}, {"Connection": "close"})
    with Client(fake.socket_path) as blocking:
        async with AsyncClient(fake.socket_path) as client:
            for _ in range(3):
                assert await client.status() == {"ok": 1}
                assert await asyncio.to_thread(blocking.status) == {"ok": 1}
    assert len(fake.seen) == 6


async def test_not_http_at_all_is_unreachable_not_a_crash(
    call: Callable[..., Any], tmp_path: Any
) -> None:
    with tempfile.TemporaryDirectory(prefix="kms-") as directory:
        path = os.path.join(directory, "junk.sock")

        done = asyncio.Event()

        async def junk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1000)
            writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
            writer.close()
            await writer.wait_closed()
            done.set()

        server = await asyncio.start_unix_server(junk, path)
        async with server:
            with pytest.raises(SidecarUnreachable, match="broke off the answer"):
                await call(path, "status")
            await asyncio.wait_for(done.wait(), 5)


async def test_many_concurrent_calls_share_a_bounded_set_of_connections(
    fake: FakeSidecar,
) -> None:
    fake.answer(200, {"data": {"ok": 1}})
    async with AsyncClient(fake.socket_path) as client:
        results = await asyncio.gather(*(client.status() for _ in range(200)))
        assert results == [{"ok": 1}] * 200
        assert 1 < len(fake.connections) <= 64  # concurrent, and never more than the bound
        again = await asyncio.gather(*(client.status() for _ in range(50)))
        assert again == [{"ok": 1}] * 50
    assert len(fake.connections) <= 64  # the kept-alive ones were reused


async def test_calls_beyond_max_connections_wait_for_a_free_one(fake: FakeSidecar) -> None:
    fake.answer(200, {"data": {"ok": 1}})
    async with AsyncClient(fake.socket_path, max_connections=2) as client:
        results = await asyncio.gather(*(client.status() for _ in range(30)))
    assert results == [{"ok": 1}] * 30
    assert len(fake.connections) <= 2


async def test_health_not_ready_is_an_answer_with_the_reason(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    body = {"ready": False, "reason": "No key can be issued: the key backend is unavailable."}
    fake.answer(503, body)
    assert await call(fake.socket_path, "health") == body


async def test_health_error_envelope_still_raises(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    fake.error(503, "upstream_unavailable", "The key backend is unavailable; retry later.")
    with pytest.raises(UpstreamUnavailable, match="unavailable"):
        await call(fake.socket_path, "health")
    fake.error(500, "internal", "The sidecar failed to handle the request.")
    with pytest.raises(InternalError):
        await call(fake.socket_path, "health")


async def test_missing_socket_is_unreachable_and_names_the_path(
    call: Callable[..., Any], tmp_path: Any
) -> None:
    path = str(tmp_path / "nothing-here.sock")
    with pytest.raises(SidecarUnreachable) as caught:
        await call(path, "health")
    assert path in str(caught.value)
    assert "No sidecar socket" in str(caught.value)
    assert caught.value.socket_path == path
    assert caught.value.code == "unreachable"


async def test_socket_nobody_listens_on_is_unreachable_and_names_the_path(
    call: Callable[..., Any],
) -> None:
    with tempfile.TemporaryDirectory(prefix="kms-") as directory:
        path = os.path.join(directory, "dead.sock")
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(path)  # the file exists but nothing listens, like a crashed sidecar's leftover
        dead.close()
        with pytest.raises(SidecarUnreachable) as caught:
            await call(path, "datakey", "payments")
    assert path in str(caught.value)
    assert "Nothing is listening" in str(caught.value)


async def test_silent_sidecar_times_out_as_unreachable(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    fake.hang = True
    with pytest.raises(SidecarUnreachable) as caught:
        await call(fake.socket_path, "status", client_options={"timeout": 0.2})
    assert "did not answer within 0.2 s" in str(caught.value)
    assert fake.socket_path in str(caught.value)


async def test_token_is_sent_as_bearer_and_kept_out_of_repr(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    await call(fake.socket_path, "status", client_options={"token": "jwt-abc"})
    assert fake.last.headers["Authorization"] == "Bearer jwt-abc"
    await call(fake.socket_path, "status")
    assert "Authorization" not in fake.last.headers
    assert "jwt-abc" not in repr(AsyncClient(fake.socket_path, token="jwt-abc"))
    assert "jwt-abc" not in repr(Client(fake.socket_path, token="jwt-abc"))


async def test_datakey_request_and_answer(fake: FakeSidecar, call: Callable[..., Any]) -> None:
    fake.answer(
        200,
        {
            "request_id": "r-1",
            "data": {
                "plaintext": "AAECAw==",
                "ciphertext": "sidecar:v3:Zm9v",
                "key_version": 3,
                "expires_at": 1764000000,
            },
        },
    )
    key = await call(
        fake.socket_path, "datakey", "payments", bits=128, context={"tenant": "acme"}, ttl="5m"
    )
    assert (fake.last.method, fake.last.raw_path) == (
        "POST",
        "/v1/transit/datakey/plaintext/payments",
    )
    assert fake.last.json == {"bits": 128, "encryption_context": {"tenant": "acme"}, "ttl": "5m"}
    assert key.plaintext == b"\x00\x01\x02\x03"
    assert (key.ciphertext, key.key_version, key.expires_at) == ("sidecar:v3:Zm9v", 3, 1764000000)
    assert "AAECAw" not in repr(key) and "\\x00" not in repr(key)


async def test_wrapped_datakey_has_no_plaintext(
    fake: FakeSidecar, call: Callable[..., Any]
) -> None:
    fake.answer(
        200, {"data": {"ciphertext": "sidecar:v1:Zm9v", "key_version": 1, "expires_at": None}}
    )
    key = await call(fake.socket_path, "datakey", "payments", wrapped=True)
    assert fake.last.raw_path == "/v1/transit/datakey/wrapped/payments"
    assert fake.last.json == {"bits": 256}
    assert key.plaintext is None and key.expires_at is None


async def test_datakeys_sends_one_batch(fake: FakeSidecar, call: Callable[..., Any]) -> None:
    item = {"plaintext": "AAAA", "ciphertext": "sidecar:v1:AA", "key_version": 1}
    fake.answer(200, {"data": {"batch_results": [item, item, item]}})
    keys = await call(fake.socket_path, "datakeys", "payments", 3, context={"a": "b"})
    assert len(fake.seen) == 1
    assert fake.last.json == {"batch_input": [{"bits": 256, "encryption_context": {"a": "b"}}] * 3}
    assert [k.plaintext for k in keys] == [b"\x00\x00\x00"] * 3


async def test_encrypt_decrypt_rewrap_shapes(fake: FakeSidecar, call: Callable[..., Any]) -> None:
    fake.answer(200, {"data": {"ciphertext": "sidecar:v1:Zm9v", "key_version": 1}})
    blob = await call(fake.socket_path, "encrypt", "payments", b"secret", context={"t": "1"})
    assert blob == "sidecar:v1:Zm9v"
    assert fake.last.raw_path == "/v1/transit/encrypt/payments"
    assert fake.last.json == {"plaintext": "c2VjcmV0", "encryption_context": {"t": "1"}}

    fake.answer(200, {"data": {"plaintext": "c2VjcmV0"}})
    assert await call(fake.socket_path, "decrypt", "payments", blob) == b"secret"
    assert fake.last.json == {"ciphertext": blob}

    fake.answer(200, {"data": {"ciphertext": "sidecar:v2:YmFy", "key_version": 2}})
    assert await call(fake.socket_path, "rewrap", "payments", blob) == "sidecar:v2:YmFy"
    assert fake.last.raw_path == "/v1/transit/rewrap/payments"


async def test_metadata_endpoints(fake: FakeSidecar, call: Callable[..., Any]) -> None:
    fake.answer(200, {"data": {"type": "aes256-gcm96", "latest_version": 2}})
    assert (await call(fake.socket_path, "key_info", "a b"))["latest_version"] == 2
    assert (fake.last.method, fake.last.raw_path) == ("GET", "/v1/transit/keys/a%20b")

    fake.answer(200, {"initialized": True, "sealed": False})  # Vault's top-level health shape
    assert await call(fake.socket_path, "health") == {"initialized": True, "sealed": False}
    assert fake.last.raw_path == "/v1/sys/health"

    fake.answer(200, {"data": {"keks": []}})
    assert await call(fake.socket_path, "status") == {"keks": []}
    assert fake.last.raw_path == "/v1/sidecar/status"

    fake.answer(204, None)
    fake.raw = b""
    assert await call(fake.socket_path, "flush") is None
    assert (fake.last.raw_path, fake.last.json) == ("/v1/sidecar/cache/flush", {})
    await call(fake.socket_path, "flush", "payments")
    assert fake.last.json == {"key": "payments"}


@pytest.mark.parametrize("name", ["", "..", "a/b", "../sys/health", "bad\nname"])
async def test_impossible_key_names_are_refused_before_sending(
    fake: FakeSidecar, call: Callable[..., Any], name: str
) -> None:
    with pytest.raises(InvalidRequest):
        await call(fake.socket_path, "key_info", name)
    assert fake.seen == []


async def test_closed_client_refuses_to_send(fake: FakeSidecar) -> None:
    client = AsyncClient(fake.socket_path)
    await client.status()
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await client.status()
    with Client(fake.socket_path) as blocking:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        blocking.status()
    assert len(fake.seen) == 1


def test_socket_path_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMS_SIDECAR_SOCKET", "/somewhere/else.sock")
    assert AsyncClient().socket_path == "/somewhere/else.sock"
    assert Client().socket_path == "/somewhere/else.sock"
    monkeypatch.delenv("KMS_SIDECAR_SOCKET")
    assert Client().socket_path == "/run/kms-sidecar/sidecar.sock"


async def test_clients_reconnect_after_the_sidecar_restarts(fake: FakeSidecar) -> None:
    fake.answer(200, {"data": {"ok": 1}})
    with Client(fake.socket_path) as blocking:
        async with AsyncClient(fake.socket_path) as client:
            assert await client.status() == {"ok": 1}
            assert await asyncio.to_thread(blocking.status) == {"ok": 1}
            # A restart drops both kept-alive connections; the next calls must not notice.
            await fake.restart()
            assert await client.status() == {"ok": 1}
            assert await asyncio.to_thread(blocking.status) == {"ok": 1}
    assert len(fake.seen) == 4


def test_public_exports_are_pinned() -> None:
    assert set(sidecar.client.__all__) == {
        "DEFAULT_SOCKET_PATH",
        "AsyncClient",
        "AsyncKeyPool",
        "AsyncKeyPools",
        "AuditUnavailable",
        "Client",
        "DataKey",
        "DecryptionFailed",
        "InternalError",
        "InvalidRequest",
        "KeyPool",
        "KeyPools",
        "MethodNotAllowed",
        "PayloadTooLarge",
        "PermissionDenied",
        "PoolStats",
        "RateLimited",
        "SidecarError",
        "SidecarUnreachable",
        "Unauthenticated",
        "UnexpectedResponse",
        "UnknownPath",
        "UpstreamError",
        "UpstreamUnavailable",
    }
    for name in sidecar.client.__all__:
        assert getattr(sidecar.client, name) is not None
