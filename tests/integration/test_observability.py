"""Audit trail, traces and metrics of a running sidecar, against a real OpenBao.

Spans go to an in-memory exporter installed as the process's tracer provider (the sidecar uses
OpenTelemetry's global API), and once to a real OTLP/HTTP receiver on loopback.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar.audit import verify
from sidecar.cli import dev_policy, main
from sidecar.devserver import DevOpenBao
from tests.conftest import (
    TOKEN_ENV,
    RunningSidecar,
    request,
    sidecar_config,
    sidecar_process,
    vault_sections,
)

HMAC_KEY = secrets.token_hex(32)
DATAKEY = "/v1/transit/datakey/plaintext/payments"


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def audited(
    openbao: DevOpenBao,
    run_sidecar: Any,
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    span_exporter: InMemorySpanExporter,
) -> RunningSidecar:
    monkeypatch.setenv("KMS_AUDIT_HMAC_KEY", HMAC_KEY)
    span_exporter.clear()
    sidecar: RunningSidecar = run_sidecar(
        sidecar_config(
            short_tmp / "o.sock",
            audit={"path": str(short_tmp / "audit" / "audit.log"), "fail_closed": True},
            **vault_sections(openbao),
        )
    )
    return sidecar


def audit_lines(sidecar: RunningSidecar) -> list[dict[str, Any]]:
    path = Path(sidecar.config.audit.path)
    return [json.loads(line) for line in path.read_text().splitlines()]


def requests_of(sidecar: RunningSidecar) -> list[dict[str, Any]]:
    return [r for r in audit_lines(sidecar) if "request_id" in r and r.get("operation")]


def test_a_callers_trace_continues_through_the_sidecar_into_the_upstream_call(
    audited: RunningSidecar, span_exporter: InMemorySpanExporter
) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    audited.request("POST", "/v1/sidecar/cache/flush", raw=b"")
    answer = audited.request(
        "POST", DATAKEY, headers={"traceparent": f"00-{trace_id}-{parent_id}-01"}
    )
    assert answer.status == 200
    spans = [
        s
        for s in span_exporter.get_finished_spans()
        if format(s.context.trace_id, "032x") == trace_id
    ]
    server = next(s for s in spans if s.name == "kms datakey")
    assert format(server.parent.span_id, "016x") == parent_id
    assert server.attributes["kms.key"] == "payments" and server.attributes["kms.outcome"] == "ok"
    assert server.attributes["kms.identity.kind"] == "unix"
    upstream = next(s for s in spans if s.name == "upstream generate_kek")
    assert upstream.parent.span_id == server.context.span_id
    assert [e.name for e in server.events] == ["audit"]
    record = next(r for r in requests_of(audited) if r["request_id"] == answer.json["request_id"])
    assert record["trace_id"] == trace_id


def test_every_request_leaves_a_verifiable_record(audited: RunningSidecar, short_tmp: Path) -> None:
    ok = audited.request("POST", DATAKEY, {"encryption_context": {"tenant": "acme"}})
    denied = audited.request("POST", "/v1/transit/datakey/plaintext/nosuch")
    unauthenticated = audited.request("POST", DATAKEY, headers={"Authorization": "Bearer x.y.z"})
    failed = audited.request(
        "POST", "/v1/transit/decrypt/payments", {"ciphertext": "sidecar:v1:AAAA"}
    )
    records = {r["request_id"]: r for r in requests_of(audited)}
    first = records[ok.json["request_id"]]
    assert (
        first["outcome"] == "ok" and first["operation"] == "datakey" and first["key"] == "payments"
    )
    assert first["rule"] == "dev-user" and first["root_version"] >= 1 and len(first["kek_id"]) == 32
    assert first["identity"]["uid"] == os.getuid()
    assert "acme" not in json.dumps(first), "context values are HMAC'd"
    assert records[denied.json["request_id"]]["outcome"] == "denied"
    assert records[denied.json["request_id"]]["error_code"] == "permission_denied"
    assert records[unauthenticated.json["request_id"]]["error_code"] == "unauthenticated"
    assert records[failed.json["request_id"]]["error_code"] == "decryption_failed"
    head = audited.request("GET", "/v1/sidecar/status").data["audit"]["head"]
    log = audited.config.audit.path
    assert main(["audit", "verify", log, "--head", head]) == 0
    assert verify([log], head).problem is None

    copy = short_tmp / "edited.log"
    lines = Path(log).read_text().splitlines()
    edited = next(i for i, line in enumerate(lines) if ok.json["request_id"] in line)
    assert '"outcome":"ok"' in lines[edited]
    lines[edited] = lines[edited].replace('"outcome":"ok"', '"outcome":"denied"')
    copy.write_text("\n".join(lines) + "\n")
    assert main(["audit", "verify", str(copy)]) == 1
    truncated = short_tmp / "truncated.log"
    # the head was read before the status request's own record: cut that record and one more
    truncated.write_text("\n".join(Path(log).read_text().splitlines()[:-2]) + "\n")
    assert main(["audit", "verify", str(truncated)]) == 0, "a cut tail looks fine on its own..."
    assert main(["audit", "verify", str(truncated), "--head", head]) == 1, (
        "...but not against the head"
    )


def test_known_context_value_can_be_found_in_the_log(
    audited: RunningSidecar, capsys: pytest.CaptureFixture[str]
) -> None:
    audited.request("POST", DATAKEY, {"encryption_context": {"tenant": "acme"}})
    assert main(["audit", "hash", "acme"]) == 0
    hashed = capsys.readouterr().out.strip()
    assert hashed.startswith("hmac-sha256:")
    assert hashed in Path(audited.config.audit.path).read_text()


def test_an_unwritable_audit_log_stops_key_operations(
    audited: RunningSidecar, short_tmp: Path
) -> None:
    assert audited.request("POST", DATAKEY).status == 200
    directory = short_tmp / "audit"
    moved = short_tmp / "audit-moved"
    directory.rename(moved)
    directory.write_text("not a directory")  # as root, permissions would not stop us
    try:
        refused = audited.request("POST", DATAKEY)
        assert refused.status == 503 and refused.code == "audit_unavailable"
        assert "plaintext" not in refused.text
        health = audited.request("GET", "/v1/sys/health")
        assert health.status == 503 and health.json["audit"]["state"] == "unavailable"
    finally:
        directory.unlink()
        moved.rename(directory)
    wait_for_status = [audited.request("POST", DATAKEY).status for _ in range(50)]
    assert 200 in wait_for_status, "the log recovers by itself once the disk is fixed"
    assert audited.request("GET", "/v1/sys/health").status == 200


def test_audit_path_that_cannot_be_opened_stops_start_up(
    short_tmp: Path, openbao: DevOpenBao
) -> None:
    (short_tmp / "blocker").write_text("a file where a directory should be")
    config = short_tmp / "sidecar.toml"
    (short_tmp / "policies").mkdir()
    config.write_text(
        f'[server]\nsocket = "{short_tmp / "x.sock"}"\n[backend.vault]\naddresses = ["{openbao.address}"]\n'
        f'token_env = "{TOKEN_ENV}"\n[keys.payments]\n[audit]\npath = "blocker/audit.log"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "KMS_AUDIT_HMAC_KEY": HMAC_KEY},
    )
    assert done.returncode == 2
    assert "audit" in done.stderr and "blocker/audit.log" in done.stderr
    assert "Traceback" not in done.stderr


def test_metrics_show_the_traffic(audited: RunningSidecar) -> None:
    for _ in range(5):
        assert audited.request("POST", DATAKEY).status == 200
    audited.request("POST", "/v1/transit/datakey/plaintext/nosuch")
    text = audited.request("GET", "/metrics").text
    assert re.search(r'kms_requests_total\{operation="datakey",outcome="ok"\} 5\.0', text), text
    assert re.search(
        r'kms_requests_total\{operation="datakey",outcome="permission_denied"\} 1\.0', text
    )
    assert 'kms_request_duration_seconds_bucket{le="0.005",operation="datakey"}' in text
    assert re.search(r'kms_upstream_calls_total\{operation="datakey"\} 1\.0', text)
    assert "kms_kek_cache_size" in text and "kms_audit_records_written" in text
    assert re.search(r'kms_kek_uses\{key="payments"\} 5\.0', text)


class OtlpReceiver:
    """A real OTLP/HTTP trace receiver on loopback that decodes what it gets."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.raw: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                receiver.raw.append(body)
                receiver.requests.append(message)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        found = []
        for message in self.requests:
            for resource_spans in message.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    found.extend((resource, span) for span in scope.spans)
        return found


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


def test_spans_reach_a_real_otlp_receiver(
    openbao: DevOpenBao, short_tmp: Path, otlp: OtlpReceiver
) -> None:
    (short_tmp / "policies").mkdir()
    (short_tmp / "policies" / "dev.toml").write_text(dev_policy(os.getuid()))
    config = short_tmp / "sidecar.toml"
    sock = short_tmp / "t.sock"
    config.write_text(
        f'[server]\nsocket = "{sock}"\n[backend.vault]\naddresses = ["{openbao.address}"]\n'
        f'token_env = "{TOKEN_ENV}"\n[keys.payments]\n'
        f'[telemetry]\nservice_name = "kms-test"\notlp_endpoint = "{otlp.endpoint}"\n'
    )
    trace_id = secrets.token_hex(16)
    with sidecar_process(config, sock) as proc:
        answer = request(
            str(sock),
            "POST",
            DATAKEY,
            headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        )
        assert answer.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "SIGTERM flushes the batch processor"
    spans = [(r, s) for r, s in otlp.spans() if s.trace_id.hex() == trace_id]
    names = {s.name for _, s in spans}
    assert {"kms datakey", "upstream generate_kek"} <= names, names
    assert all(r["service.name"] == "kms-test" for r, _ in spans)
