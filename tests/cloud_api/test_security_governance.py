"""Personal data, audit, monitoring and tracing through the real app and database."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from psycopg_pool import ConnectionPool

from cloud_api.access.pii import PiiKeyring, generate_pii_key
from tests.cloud_api.securitykit import WINDOW, SecuredApi, secured_api, seed_two_sites

# A quality annotation: a downtime one must name a stop, and these sites have no state events.
NOTE = {"site": "site-a", "ts": "2026-01-05T06:10:00Z", "kind": "quality", "reason": "jam"}
ANNOTATIONS = "/v1/equipment/press-a/annotations"


@pytest.fixture
def api(pg_url: str, pool: ConnectionPool, tmp_path: Path) -> SecuredApi:
    seed_two_sites(pg_url)
    return secured_api(pg_url, pool, tmp_path)


async def test_operator_identity_sealed_and_shown_only_to_allowed_roles(
    api: SecuredApi, pg_url: str
) -> None:
    async with api.client() as client:
        r = await client.post(
            ANNOTATIONS,
            json={**NOTE, "operator": "Jane Doe (badge 4711)"},
            headers=api.headers("engineer", ["site-a"]),
        )
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["operator"] == "Jane Doe (badge 4711)"
        assert created["operator_status"] == "clear"
        trace_id = r.headers["X-Trace-Id"]
        assert created["trace_id"] == trace_id

        async def listing(role: str, sites: list[str]) -> list[dict[str, Any]]:
            r = await client.get(ANNOTATIONS, params=WINDOW, headers=api.headers(role, sites))
            assert r.status_code == 200, r.text
            body: list[dict[str, Any]] = r.json()
            return body

        for role in ("engineer", "admin"):
            (seen,) = await listing(role, ["site-a"])
            assert (seen["operator"], seen["operator_status"]) == ("Jane Doe (badge 4711)", "clear")
        for role in ("viewer", "service"):
            (seen,) = await listing(role, ["site-a"])
            assert (seen["operator"], seen["operator_status"]) == (None, "redacted")
            assert seen["reason"] == "jam"
        assert await listing("engineer", ["site-b"]) == []
        # Another site's engineer cannot annotate site-a's equipment (reads as unknown).
        r = await client.post(ANNOTATIONS, json=NOTE, headers=api.headers("engineer", ["site-b"]))
        assert r.status_code == 404
        # Unknown equipment of a visible site.
        r = await client.post(
            "/v1/equipment/press-z/annotations", json=NOTE, headers=api.headers("engineer")
        )
        assert r.status_code == 404

    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT operator_key_id, operator_sealed, site_id, equipment_id, annotation_id "
            "FROM facts.annotations"
        ).fetchone()
        assert row is not None
        key_id, sealed, site, equipment, annotation_id = row
        assert b"Jane" not in bytes(sealed) and len(bytes(sealed)) == 12 + 21 + 16
        audit = conn.execute(
            "SELECT actor, actor_kind, action, target, site_id, detail, trace_id FROM audit.records"
        ).fetchall()
    # The stored value opens with the key file and its key id, bound to its row.
    ring = PiiKeyring.load(api.keys_dir)
    aad = f"annotation\x1f{site}\x1f{equipment}\x1f{annotation_id}".encode()
    assert ring.open(key_id, bytes(sealed), aad) == "Jane Doe (badge 4711)"
    assert len(audit) == 1
    actor, kind, action, target, audit_site, detail, audit_trace = audit[0]
    assert (actor, kind, action, audit_site) == (
        "user-engineer",
        "token:engineer",
        "annotation.create",
        "site-a",
    )
    assert target.endswith(str(annotation_id)) and audit_trace == trace_id
    assert "Jane" not in str(detail)


async def test_pii_key_rotation_keeps_old_values_readable(api: SecuredApi) -> None:
    headers = api.headers("engineer", ["site-a"])
    async with api.client() as client:
        r1 = await client.post(ANNOTATIONS, json={**NOTE, "operator": "A"}, headers=headers)
        generate_pii_key(api.keys_dir)
        api.app.state.security._pii = None  # the running app reads the key directory again
        r2 = await client.post(ANNOTATIONS, json={**NOTE, "operator": "B"}, headers=headers)
        assert r1.status_code == r2.status_code == 201
        r = await client.get(ANNOTATIONS, params=WINDOW, headers=headers)
    assert sorted(a["operator"] for a in r.json()) == ["A", "B"]


async def test_performance_statistics_for_admins(api: SecuredApi) -> None:
    viewer = api.headers("viewer", ["site-a"])
    async with api.client() as client:
        for _ in range(5):
            assert (await client.get("/v1/equipment/press-a/oee", params=WINDOW,
                                     headers=viewer)).status_code == 200  # fmt: skip
        assert (await client.get("/v1/equipment/press-b/oee", params=WINDOW,
                                 headers=viewer)).status_code == 404  # fmt: skip
        r = await client.get("/v1/ops/performance", headers=api.headers("admin", ["*"]))
        assert r.status_code == 200, r.text
        stats = r.json()
    by_route = {(s["route"], s["method"]): s for s in stats["routes"]}
    oee = by_route[("/v1/equipment/{equipment_id}/oee", "GET")]
    assert oee["requests"] == 6
    assert oee["client_error_rate"] == pytest.approx(1 / 6)
    assert oee["error_rate"] == 0
    assert 0 < oee["p50_ms"] <= oee["p95_ms"] <= oee["p99_ms"]
    assert oee["cache_hit_ratio"] == 0
    assert stats["total"]["requests"] >= 6
    # Collected counts are in the monitoring schema, added per minute.
    r2 = await _performance(api)
    again = {(s["route"], s["method"]): s for s in r2["routes"]}
    assert again[("/v1/equipment/{equipment_id}/oee", "GET")]["requests"] == 6
    assert again[("/v1/ops/performance", "GET")]["requests"] >= 1


async def _performance(api: SecuredApi) -> dict[str, Any]:
    async with api.client() as client:
        r = await client.get("/v1/ops/performance", headers=api.headers("admin", ["*"]))
    body: dict[str, Any] = r.json()
    return body


class _Capture(SimpleSpanProcessor):
    """Exports to memory while active. The global provider cannot drop a processor, and a
    shut-down one left attached warns on every span of the later tests."""

    active = True

    def on_end(self, span: ReadableSpan) -> None:
        if self.active:
            super().on_end(span)


async def test_request_spans_continue_the_callers_trace(api: SecuredApi) -> None:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    processor = _Capture(exporter)
    provider.add_span_processor(processor)
    try:
        trace_id = secrets.token_hex(16)
        parent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
        async with api.client() as client:
            r = await client.get(
                "/v1/equipment/press-a/oee",
                params=WINDOW,
                headers={**api.headers(), "traceparent": parent},
            )
        assert r.status_code == 200 and r.headers["X-Trace-Id"] == trace_id
        spans = [s for s in exporter.get_finished_spans() if s.context is not None]
        names = {s.name for s in spans if format(s.context.trace_id, "032x") == trace_id}
        assert "GET /v1/equipment/press-a/oee" in names
        assert "db.session" in names  # database work is a child of the request span
    finally:
        processor.active = False
