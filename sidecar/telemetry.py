"""Traces, metrics and structured logs.

Traces use OpenTelemetry's global API, so every layer (the keyring's upstream calls, the HSM's
owner thread) adds spans to the request's trace without knowing who exports them. The daemon
installs a tracer provider from ``[telemetry]`` — an OTLP/HTTP exporter behind a batch processor
when ``otlp_endpoint`` is set — unless the process already has one (tests install an in-memory
one). Metrics are Prometheus text: request counters and latencies are counted on the request
path; everything else (KEK caches, upstream, audit) is read from its owner at scrape time.
"""

from __future__ import annotations

import bisect
import contextvars
import itertools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from sidecar.config import TelemetryConfig
from sidecar.keys.status import KEY_STATES, KeyringStatus
from sidecar.tracing import tracer as tracer  # re-exported: the server starts spans on it

log = logging.getLogger(__name__)

#: The request id of the request being handled, for log lines.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def install_tracer_provider(config: TelemetryConfig) -> TracerProvider | None:
    """Install a tracer provider exporting to ``otlp_endpoint``; ``None`` if there is none to
    install or the process already has one.

    Without a provider no spans are made (they cost tens of microseconds each); an incoming
    ``traceparent``'s trace id still reaches the audit log.
    """
    if not config.otlp_endpoint or isinstance(trace.get_tracer_provider(), TracerProvider):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = config.otlp_endpoint.rstrip("/")
    if not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: config.service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    log.info("exporting traces to %s", endpoint)
    return provider


def trace_id_hex(span: trace.Span) -> str | None:
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


#: Upper bounds (seconds) of the request latency histogram's buckets.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
)


class Metrics:
    """The sidecar's Prometheus registry. ``sources`` are read at scrape time.

    Requests are counted in plain integers on the event loop (no locks: only the loop writes
    them) and turned into Prometheus families when ``/metrics`` is scraped.
    """

    def __init__(self, sources: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests: dict[tuple[str, str], int] = {}
        #: (operation, outcome) → decisions: a request, or each item of a batch
        self._decisions: dict[tuple[str, str], int] = {}
        #: operation → [count per bucket (last: +Inf)..., sum of seconds]
        self._latency: dict[str, list[float]] = {}
        self.registry.register(_StateCollector(sources))
        self.registry.register(_RequestCollector(self._requests, self._latency, self._decisions))

    def observe(self, operation: str, outcome: str, seconds: float) -> None:
        """Count one request: a dict update and a bucket search, for the hot path."""
        key = (operation, outcome)
        self._requests[key] = self._requests.get(key, 0) + 1
        histogram = self._latency.get(operation)
        if histogram is None:
            histogram = self._latency[operation] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        histogram[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram[-1] += seconds

    def decided(self, operation: str, outcome: str) -> None:
        """Count one decision (``ok``, ``denied``, ``error``, ``client_closed``)."""
        key = (operation, outcome)
        self._decisions[key] = self._decisions.get(key, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RequestCollector(Collector):
    """The request counters and latency histograms, as Prometheus families."""

    def __init__(
        self,
        requests: dict[tuple[str, str], int],
        latency: dict[str, list[float]],
        decisions: dict[tuple[str, str], int],
    ) -> None:
        self._requests = requests
        self._latency = latency
        self._decisions = decisions

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily(
            "kms_requests",
            "Requests handled, by operation and outcome (ok, or the error code).",
            labels=["operation", "outcome"],
        )
        for (operation, outcome), count in sorted(self._requests.items()):
            requests.add_metric([operation, outcome], count)
        latency = HistogramMetricFamily(
            "kms_request_duration_seconds",
            "Time to answer a request, by operation.",
            labels=["operation"],
        )
        for operation, histogram in sorted(self._latency.items()):
            counts = list(itertools.accumulate(histogram[:-1]))
            buckets = [(str(bound), counts[i]) for i, bound in enumerate(LATENCY_BUCKETS)]
            buckets.append(("+Inf", counts[-1]))
            latency.add_metric([operation], buckets, histogram[-1])
        decisions = CounterMetricFamily(
            "kms_decisions",
            "Policy decisions with their audit outcome (ok, denied, error, client_closed), by "
            "operation: one per request, or per item of a batch.",
            labels=["operation", "outcome"],
        )
        for (operation, outcome), count in sorted(self._decisions.items()):
            decisions.add_metric([operation, outcome], count)
        yield from (requests, latency, decisions)


class _StateCollector(Collector):
    """Caches, KEKs, upstream and audit figures, read from their owners at scrape time."""

    def __init__(self, sources: Callable[[], Mapping[str, Any]]) -> None:
        self._sources = sources

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        state = self._sources()
        keyring: KeyringStatus = state["keyring"]
        cache = keyring.kek_cache
        hits = CounterMetricFamily("kms_kek_cache_hits", "KEK cache hits when opening blobs.")
        hits.add_metric([], cache.hits)
        misses = CounterMetricFamily("kms_kek_cache_misses", "KEK cache misses (backend unwraps).")
        misses.add_metric([], cache.misses)
        size = GaugeMetricFamily("kms_kek_cache_size", "Unwrapped KEKs held in memory.")
        size.add_metric([], cache.size)
        rotations = CounterMetricFamily(
            "kms_kek_rotations", "Live KEKs replaced, by key.", labels=["key"]
        )
        uses = GaugeMetricFamily(
            "kms_kek_uses", "Blobs sealed by the live KEK, by key.", labels=["key"]
        )
        key_state = GaugeMetricFamily(
            "kms_key_state",
            "1 for the key's current state (ok, degraded, unavailable, revoked).",
            labels=["key", "state"],
        )
        for name, key in keyring.keys.items():
            rotations.add_metric([name], key.kek_rotations)
            uses.add_metric([name], 0 if key.live_kek is None else key.live_kek.uses)
            for value in KEY_STATES:
                key_state.add_metric([name, value], 1 if key.state == value else 0)
        yield from (hits, misses, size, rotations, uses, key_state)

        backend = state["backend"]
        calls = CounterMetricFamily(
            "kms_upstream_calls", "Calls to the key backend, by operation.", labels=["operation"]
        )
        for operation, count in (backend.get("calls") or {}).items():
            calls.add_metric([operation], count)
        up = GaugeMetricFamily("kms_upstream_up", "1 when the key backend answered its last call.")
        up.add_metric([], 1 if backend.get("state") == "ok" else 0)
        yield from (calls, up)
        auth = backend.get("auth") or {}
        if auth:
            renewals = CounterMetricFamily("kms_upstream_token_renewals", "Token renewals.")
            renewals.add_metric([], auth.get("renewals") or 0)
            logins = CounterMetricFamily("kms_upstream_logins", "Logins to the upstream.")
            logins.add_metric([], auth.get("logins") or 0)
            ttl = GaugeMetricFamily("kms_upstream_token_ttl_seconds", "Upstream token TTL left.")
            ttl.add_metric([], auth.get("token_ttl") or 0)
            auth_ok = GaugeMetricFamily("kms_upstream_auth_ok", "1 while upstream login works.")
            auth_ok.add_metric([], 1 if auth.get("state") == "ok" else 0)
            yield from (renewals, logins, ttl, auth_ok)

        audit = state.get("audit")
        if audit:
            for metric_name, number in _numbers(audit, "kms_audit"):
                figure = GaugeMetricFamily(metric_name, "Audit log figure.")
                figure.add_metric([], number)
                yield figure


def _numbers(values: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, float]]:
    for name, value in values.items():
        if isinstance(value, int | float):  # bools are ints: 1 or 0
            yield f"{prefix}_{name}", float(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def setup_logging(config: TelemetryConfig) -> None:
    """Log to stderr as text or JSON lines, every line carrying the request id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
