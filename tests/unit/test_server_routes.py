"""The route table is the only home of a route's facts, and the runtime reads it.

Each test walks :data:`ROUTES` and checks what a request to each route leaves behind — its audit
record and its counted decision — so a route whose operation the runtime took from anywhere else
would fail here.
"""

from __future__ import annotations

import re
from pathlib import Path

from sidecar.server.app import ROUTES, UNGUARDED, UNMATCHED, build_app
from sidecar.server.routes import Route, Unguarded
from tests.unit.server_app import sidecar

GUARDED = [route for route in ROUTES if isinstance(route, Route)]


def _path(route: Route | Unguarded) -> str:
    values = {"name": "payments", "hash": "sha2-256", "algorithm": "sha2-256"}
    values.update(source="platform", urlbytes="16")
    path = route.path
    for placeholder, value in values.items():
        path = path.replace(f"{{{placeholder}}}", value)
    return path


def _decisions(metrics: str, operation: str) -> int:
    found = re.findall(
        rf'kms_decisions_total{{operation="{operation}",outcome="[^"]+"}} (\S+)', metrics
    )
    return int(sum(float(n) for n in found))


async def test_every_served_path_is_declared_and_only_listed_ones_are_unguarded(
    tmp_path: Path,
) -> None:
    async with sidecar(tmp_path) as s:
        app = build_app(s.services)
    declared = {route.path: route for route in ROUTES}
    *resources, catch_all = app.router.resources()
    # last, or it would take requests meant for routes after it
    assert catch_all.get_info()["pattern"].fullmatch("/any\npath"), UNMATCHED
    for path in (resource.canonical for resource in resources):
        assert path in declared, f"{path} is served but not in ROUTES"
        assert isinstance(declared[path], Route) or path in UNGUARDED, path
    assert {p for p, r in declared.items() if isinstance(r, Unguarded)} == UNGUARDED


async def test_every_guarded_route_is_audited_and_counted_under_its_operation(
    tmp_path: Path,
) -> None:
    async with sidecar(tmp_path) as s:
        for route in GUARDED:
            before = len(s.records())
            await s.call(route.methods[0], _path(route))
            records = s.records()[before:]
            assert records, f"{route.path} left no audit record"
            assert {r["operation"] for r in records} == {route.operation}, route.path
            assert records[-1]["rule"] in ("everything", None), route.path
        metrics = (await (await s.client.get("/metrics")).read()).decode()
    for operation in {route.operation for route in GUARDED}:
        assert _decisions(metrics, operation) >= 1, operation
    assert _decisions(metrics, "none") == 0, "no route may be counted without its operation"


async def test_status_and_flush_are_audited_as_status_and_flush(tmp_path: Path) -> None:
    async with sidecar(tmp_path) as s:
        status, _ = await s.call("GET", "/v1/sidecar/status")
        assert status == 200
        status, body = await s.call("POST", "/v1/sidecar/cache/flush", {"key": "payments"})
        assert (status, body["data"]["flushed"]) == (200, "payments")
        status, _ = await s.call("POST", "/v1/sidecar/cache/flush", {"key": "ghost"})
        assert status == 403
        records = s.records()
    assert [(r["operation"], r["key"], r["outcome"]) for r in records] == [
        ("status", None, "ok"),
        ("flush", "payments", "ok"),
        ("flush", "ghost", "denied"),
    ]
    assert records[0]["rule"] == records[1]["rule"] == "everything"
    assert records[2]["rule"] is None, "an unknown key is refused with no rule named"


async def test_a_stranger_is_refused_on_every_guarded_route_before_the_backend(
    tmp_path: Path,
) -> None:
    async with sidecar(tmp_path, policy="") as s:
        before = sum(s.backend.calls.values())
        for route in GUARDED:
            status, body = await s.call(route.methods[0], _path(route))
            assert (status, body["code"]) == (403, "permission_denied"), route.path
            record = s.records()[-1]
            assert (record["operation"], record["outcome"]) == (route.operation, "denied")
        assert sum(s.backend.calls.values()) == before, "a refused request reached the backend"


async def test_rotation_writes_its_intent_before_it_happens(tmp_path: Path) -> None:
    async with sidecar(tmp_path) as s:
        status, body = await s.call("POST", "/v1/transit/keys/payments/rotate")
        assert (status, body["data"]["latest_version"]) == (200, 2)
        records = s.records()
    assert [(r["operation"], r["outcome"], r["root_version"]) for r in records] == [
        ("rotate", "allowed", None),
        ("rotate", "ok", 2),
    ]
    assert records[0]["request_id"] == records[1]["request_id"]
