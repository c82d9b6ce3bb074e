"""Errors as the caller and the audit log see them: one table of statuses, aiohttp's own errors
mapped to Vault's shape, wrapping refused, a caller gone mid-body, a failing audit write."""

from __future__ import annotations

import asyncio
import importlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar import errors
from sidecar.server import pipeline
from sidecar.server.app import build_app
from sidecar.server.errors import STATUS_BY_CODE, status_for
from tests.unit.server_app import sidecar

DATAKEY = "/v1/transit/datakey/plaintext/payments"


async def _until(condition: Callable[[], object]) -> None:
    """Poll ``condition`` for up to 10 s."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition never held")


def _server_codes() -> set[str]:
    """Every code a server-side error can carry: the tree of ``sidecar.errors`` and each
    subclass the server's layers define (the client SDK's own errors never reach a response)."""
    for module in ("sidecar.backends.vault_auth", "sidecar.server.app", "sidecar.kms"):
        importlib.import_module(module)  # each may define subclasses

    found: set[str] = set()
    pending: list[type[errors.SidecarError]] = [errors.SidecarError]
    while pending:
        cls = pending.pop()
        if not cls.__module__.startswith("sidecar.client"):
            found.add(cls.code)
        pending.extend(cls.__subclasses__())
    return found


def test_every_error_code_has_its_status() -> None:
    codes = _server_codes()
    missing = codes - set(STATUS_BY_CODE)
    assert not missing, f"codes without an HTTP status (they would answer 500): {missing}"
    assert {c for c, s in STATUS_BY_CODE.items() if s == 500} == {"internal"}
    for code in codes:
        assert status_for(errors.error_for_code(code)()) == STATUS_BY_CODE[code]


async def test_unknown_path_wrong_method_and_big_body_are_vault_shaped(tmp_path: Path) -> None:
    async with sidecar(tmp_path, server={"max_body_bytes": 1024}) as s:
        status, body = await s.call("GET", "/v1/no/such/path")
        assert (status, body["code"]) == (404, "unknown_path")
        assert body["errors"] and body["request_id"]
        async with s.client.get("/v1/transit/encrypt/payments") as answer:
            assert answer.status == 405
            assert answer.headers["Allow"] == "POST, PUT"
            assert (await answer.json())["code"] == "method_not_allowed"
        async with s.client.get("/v1/transit/datakey/plaintext/%0A") as answer:  # a newline
            assert answer.status == 405
            assert (await answer.json())["code"] == "method_not_allowed"
        status, body = await s.call("POST", DATAKEY, {"pad": "x" * 2000})
        assert (status, body["code"]) == (413, "payload_too_large")
        assert "1024 bytes" in body["errors"][0]
        records = s.records()
    assert [(r["operation"], r["error_code"]) for r in records] == [
        ("none", "unknown_path"),
        ("none", "method_not_allowed"),
        ("none", "method_not_allowed"),
        ("datakey", "payload_too_large"),
    ]


async def test_a_wrap_request_is_refused_before_the_handler_runs(tmp_path: Path) -> None:
    async with sidecar(tmp_path) as s:
        headers = {"X-Vault-Wrap-TTL": "60s"}
        status, body = await s.call("POST", DATAKEY, None, headers)
        assert (status, body["code"]) == (400, "invalid_request")
        assert "X-Vault-Wrap-TTL" in body["errors"][0]
        assert set(body) == {"errors", "code", "request_id"}, "nothing but the error"
        assert s.backend.calls["generate_kek"] == 0
        (record,) = s.records()
    assert (record["operation"], record["outcome"], record["error_code"]) == (
        "datakey",
        "error",
        "invalid_request",
    )


async def test_a_caller_gone_mid_body_is_a_quiet_client_closed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with sidecar(tmp_path) as s:
        # Served as `kms-sidecar run` serves it: aiohttp's test server cancels the handler of a
        # lost connection, which the daemon's runner does not.
        runner = web.AppRunner(build_app(s.services), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            host, port = runner.addresses[0][:2]
            raw = socket.create_connection((host, port))
            with caplog.at_level(logging.INFO):
                caplog.clear()
                raw.sendall(
                    b"POST /v1/transit/encrypt/payments HTTP/1.1\r\nHost: x\r\n"
                    b'Content-Length: 100\r\n\r\n{"plaint'
                )
                await s.authenticator.called.wait()  # the request is being read
                raw.close()
                await _until(s.records)
        finally:
            await runner.cleanup()
        (record,) = s.records()
        metrics = (await (await s.client.get("/metrics")).read()).decode()
    assert (record["operation"], record["key"], record["outcome"], record["error_code"]) == (
        "encrypt",
        "payments",
        "client_closed",
        None,
    )
    assert 'kms_decisions_total{operation="encrypt",outcome="client_closed"} 1.0' in metrics
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_a_failing_batch_item_does_not_fail_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with sidecar(tmp_path) as s:
        keyring = s.services.keyring
        real = keyring.generate_data_key
        calls = 0

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise RuntimeError("a bug")
            return await real(*args, **kwargs)

        monkeypatch.setattr(keyring, "generate_data_key", flaky)
        status, body = await s.call("POST", DATAKEY, {"batch_input": [{}, {}, {}]})
        records = s.records()
    assert status == 500
    results = body["data"]["batch_results"]
    assert "plaintext" in results[0] and "plaintext" in results[2]
    assert results[1] == {
        "error": "The sidecar failed to handle the request.",
        "code": "internal",
        "reference": "",
    }
    assert [r["outcome"] for r in records] == ["ok", "error", "ok"]
    assert "a bug" not in str(body)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def test_an_unexpected_audit_failure_ends_the_span_and_withholds_the_answer(
    tmp_path: Path,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    attached: list[object] = []
    real_attach, real_detach = pipeline.otel_context.attach, pipeline.otel_context.detach

    def attach(context: Any) -> object:
        token = real_attach(context)
        attached.append(token)
        return token

    def detach(token: Any) -> None:
        attached.remove(token)
        real_detach(token)

    monkeypatch.setattr(pipeline.otel_context, "attach", attach)
    monkeypatch.setattr(pipeline.otel_context, "detach", detach)
    async with sidecar(tmp_path) as s:
        assert s.services.tracing

        async def broken(record: Any) -> None:
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(s.services.audit, "write", broken)
        spans.clear()
        status, body = await s.call(
            "POST", DATAKEY, None, {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
        )
    assert (status, body["code"]) == (500, "internal")
    assert "plaintext" not in str(body), "an unaudited key is never handed out"
    (span,) = [sp for sp in spans.get_finished_spans() if sp.name == "kms datakey"]
    assert span.attributes is not None and span.attributes["kms.outcome"] == "internal"
    assert format(span.context.trace_id, "032x") == "a" * 32
    assert attached == [], "the OTel context was left attached"
    assert "could not be written" in caplog.text


async def test_head_on_health_answers_like_get_without_a_body(tmp_path: Path) -> None:
    async with sidecar(tmp_path) as s:
        async with s.client.get("/v1/sys/health") as got:
            await got.read()
        async with s.client.head("/v1/sys/health") as head:
            assert head.status == got.status  # as Vault's health endpoint: HEAD is served
            assert await head.read() == b""


def test_every_error_code_has_its_grpc_status() -> None:
    """The KMS v2 provider's twin of the HTTP table: a new code can't silently become INTERNAL."""
    from grpclib.const import Status

    from sidecar.kms.provider import GRPC_STATUS_BY_CODE

    http_only = {"unknown_path", "method_not_allowed"}  # routing; a gRPC call never meets them
    missing = _server_codes() - http_only - set(GRPC_STATUS_BY_CODE)
    assert not missing, f"codes without a gRPC status (they would answer INTERNAL): {missing}"
    internal = {c for c, s in GRPC_STATUS_BY_CODE.items() if s is Status.INTERNAL}
    assert internal == {"internal", "upstream_error"}
