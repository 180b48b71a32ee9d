"""The dashboard in headless Chromium against a live `cloud-api` HTTP server whose data went
through the real ingest path: the page loads without console errors, the tiles show the
numbers the API returns, the charts hold the API's series, and a screenshot is written to
the test's output folder."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from psycopg_pool import ConnectionPool

from agent.config import parse_config
from cloud_api.api.app import create_app
from cloud_api.config import CloudSettings, DatabaseSettings
from connectors.sample import Sample
from oee.engine import PlantEngine
from oee.events import AgentEvent, Event
from sync.keys import CloudKeyring
from tests.cloud_api.ingestion import enrolled_agent
from tests.conftest import bearer, free_port
from tests.ops.chromium import open_page

SITE = "plant-dash"
AGENT = "edge-dash-01"
PLANT = f"""
agent: {{id: {AGENT}, site: {SITE}, timezone: UTC}}
shifts:
  - {{name: early, start: "06:00", end: "14:00"}}
  - {{name: late, start: "14:00", end: "22:00"}}
  - {{name: night, start: "22:00", end: "06:00"}}
equipment:
""" + "".join(
    f"""
  - id: press-{n}
    line: line-1
    ideal_cycle_time: 20s
    signals:
      state: {{map: {{0: idle, 1: running, 2: fault, 3: setup}}}}
      total_count: {{type: uint32}}
      scrap_count: {{type: uint32}}
      reason: {{map: {{1: no material, 2: tool change, 3: jam, 4: waiting for crane}}}}
"""
    for n in (1, 2, 3)
)


def simulate(start: datetime, end: datetime, seed: int) -> list[Event]:
    """Run the real OEE engine over plausible press signals for [start, end)."""
    config = parse_config(PLANT)
    engine = PlantEngine(
        config.oee_specs(), config.calendar(), agent_id=AGENT, site_id=SITE, bucket_seconds=60
    )
    rng = random.Random(seed)
    events: list[Event] = []
    for n in (1, 2, 3):
        eq = f"press-{n}"
        t = start
        total = scrap = 0
        events += engine.engines[eq].start(t)

        def emit(
            signal: str, value: int, at: datetime, eq: str = eq, out: list[Event] = events
        ) -> None:
            out.extend(engine.feed(Sample(eq, signal, value, at)))

        emit("total_count", 0, t)
        emit("scrap_count", 0, t)
        while t < end:
            roll = rng.random()
            if roll < 0.72:
                state, minutes, reason = 1, rng.uniform(10, 50), 0
            elif roll < 0.92:
                state, minutes, reason = 2, rng.uniform(2, 18), rng.choice([1, 3, 3, 4])
            else:
                state, minutes, reason = 3, rng.uniform(8, 20), 2
            emit("reason", reason, t)
            emit("state", state, t)
            stop = min(end, t + timedelta(minutes=minutes))
            while state == 1 and t < stop:
                t += timedelta(seconds=rng.uniform(21, 26))
                total += 1
                scrap += rng.random() < 0.03 * n
                emit("total_count", total, t)
                emit("scrap_count", scrap, t)
            t = stop
    events += engine.tick(end)
    return events


@pytest.fixture
def live_api(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> Iterator[tuple[str, dict[str, str]]]:
    settings = CloudSettings(database=DatabaseSettings(url=pg_url), keys_dir=tmp_path / "api-keys")
    headers = bearer(settings.keys_dir, role="viewer", sites=[SITE])
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, pool=pool), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = 600
        while not server.started and deadline:
            threading.Event().wait(0.05)
            deadline -= 1
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}", headers
    finally:
        server.should_exit = True
        thread.join(30)


async def test_dashboard_in_chromium(
    tmp_path: Path,
    pg_url: str,
    pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    live_api: tuple[str, dict[str, str]],
) -> None:
    base, headers = live_api
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    start = end - timedelta(hours=20)
    agent = enrolled_agent(
        pg_url, pool, cloud_keys, tmp_path / "agent-keys", agent_id=AGENT, site_id=SITE
    )
    events = simulate(start, end, seed=8)
    events.append(
        AgentEvent(
            agent_id=AGENT,
            site_id=SITE,
            ts=end,
            code="status",
            message="agent status",
            data={"version": "0.1.0", "outbox_depth": 2, "outbox_events": 40, "outbox_bytes": 9000},
        )
    )
    for i in range(0, len(events), 500):
        await asyncio.to_thread(agent.send, events[i : i + 500])

    window = {"from": start.isoformat(), "to": end.isoformat()}
    url = f"{base}/?site={SITE}&interval=shift&from={start.isoformat()}&to={end.isoformat()}"
    url = url.replace("+", "%2B")
    token = headers["Authorization"].removeprefix("Bearer ")
    async with open_page(tmp_path / "chromium") as page:
        # The token as if entered earlier in this browser session.
        await page.call(
            "Page.addScriptToEvaluateOnNewDocument",
            source=f"sessionStorage.setItem('edge-gateway-token', {token!r});",
        )
        await page.call("Page.navigate", url=url)
        await page.wait_for("document.body && document.body.dataset.state === 'ready'")
        tz = await page.evaluate("Intl.DateTimeFormat().resolvedOptions().timeZone")
        tiles: dict[str, dict[str, str]] = await page.evaluate(
            "Object.fromEntries(['oee','availability','performance','quality'].map(n => "
            "[n, {text: document.querySelector(`#tile-${n} .value`).textContent, "
            "value: document.getElementById(`tile-${n}`).dataset.value}]))"
        )
        charts: dict[str, Any] = await page.evaluate(
            "({trend: Chart.getChart('trend').data.datasets[0].data, "
            "pareto: Chart.getChart('pareto').data.labels, "
            "timeline: Chart.getChart('timeline').data.labels, "
            "fleet: [...document.querySelectorAll('#fleet tbody tr')].map(r => r.innerText)})"
        )
        await page.screenshot(tmp_path / "dashboard.png")
        errors = list(page.errors)
    assert errors == [], errors

    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
        oee = (
            await client.get(
                "/v1/oee",
                params={"scope": "site", "id": SITE, **window, "interval": "shift", "tz": tz},
            )
        ).json()
        pareto = (
            await client.get(
                "/v1/downtime/pareto",
                params={"scope": "site", "id": SITE, **window, "by": "reason", "top": 8},
            )
        ).json()
    total = oee["total"]
    for name in ("oee", "availability", "performance", "quality"):
        assert total[name] is not None and 0 < total[name] <= 1.0, (name, total)
        assert float(tiles[name]["value"]) == total[name], (name, tiles[name], total[name])
        assert tiles[name]["text"] == f"{total[name] * 100:.1f} %", (name, tiles[name])
    buckets = oee["groups"][0]["buckets"]
    assert len(buckets) >= 3  # 20 hours cover at least three shifts
    assert charts["trend"] == [b["oee"] * 100 if b["oee"] is not None else None for b in buckets]
    assert charts["pareto"] == [i["reason"] or "(no reason)" for i in pareto["items"]]
    assert "jam" in charts["pareto"]
    assert charts["timeline"] == ["press-1", "press-2", "press-3"]
    assert len(charts["fleet"]) == 1 and AGENT in charts["fleet"][0]
    assert "2 batches" in charts["fleet"][0]
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000


async def test_interactive_api_docs_render_from_the_package(
    tmp_path: Path, live_api: tuple[str, dict[str, str]]
) -> None:
    base, _ = live_api
    async with open_page(tmp_path / "chromium-docs") as page:
        await page.call("Page.navigate", url=f"{base}/docs")
        # Swagger UI lists every operation of the app's own OpenAPI document.
        paths = await page.wait_for(
            "document.querySelectorAll('.opblock-summary-path').length > 10 && "
            "[...document.querySelectorAll('.opblock-summary-path')].map(e => e.textContent)"
        )
        # It opens with how to get a token and how windows and time zones work.
        intro = await page.wait_for(
            "document.querySelector('#intro h2') && "
            "[...document.querySelectorAll('#intro h2')].map(e => e.textContent)"
        )
        await page.screenshot(tmp_path / "docs.png")
        errors = list(page.errors)
    assert errors == [], errors
    assert any("/v1/oee" in p for p in paths), paths
    assert intro == ["Getting a token", "Windows and time zones"]
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        page_response = await client.get("/docs")
    csp = page_response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
