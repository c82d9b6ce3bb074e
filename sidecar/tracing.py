"""The tracer every layer starts its spans on: OpenTelemetry's API only, never its SDK.

Importing this costs nothing; :mod:`sidecar.telemetry` installs the SDK provider that exports.
Without a provider the spans are no-ops.
"""

from __future__ import annotations

from opentelemetry import trace

tracer = trace.get_tracer("kms-sidecar")
