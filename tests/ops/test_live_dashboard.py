"""The live plant view in headless Chromium against a live `cloud-api` HTTP server, on data
that went through the agent and the real ingest path: a simulated plant's PLC samples
(agent/plant_history.py) -> the agent's engine and sealed outbox (`AgentRuntime.record`) ->
BatchWriter.process -> PostgreSQL.

It checks the machine tiles against `/v1/plant/live` and `/v1/oee`, the polling with ETags
(304s), the plant's time zone, the target line and colours, OEE ranked by machine, units that
fit the magnitude, zooming the timeline, agent staleness from the agent's own status
interval, a hundred machines (natural sort, every label, a count of what is shown), and kiosk
mode surviving a browser restart. It writes the README's screenshots (docs/screenshots/)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from psycopg_pool import ConnectionPool

from agent.config import AgentConfig, parse_config
from agent.plant_history import plant_history
from agent.runtime import AgentRuntime
from buffer.outbox import Outbox
from cloud_api.api.app import create_app
from cloud_api.config import CloudSettings, DatabaseSettings
from cloud_api.ingest.worker import BatchWriter
from sync.keys import AgentKeys, CloudKeyring
from sync.uplink import batch_topic
from tests.conftest import bearer, enroll, free_port, make_agent_keys
from tests.invariants import api_client, check_views
from tests.ops.chromium import Page, open_page

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
DEMO = ROOT / "configs" / "demo-agent.yaml"
TARGET = 0.85


def plant_config(folder: Path, text: str, status_interval: str) -> AgentConfig:
    """The demo plant with its breaks (the simulated machines idle through them: off plan in
    OEE, the Pareto and /v1/downtime/events alike), its state in `folder`."""
    text = text.replace("var/demo/agent", str(folder))
    text = text.replace("status_interval: 10s", f"status_interval: {status_interval}")
    return parse_config(text, "plant.yaml", env={})


def seed(
    pg_url: str,
    pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    config: AgentConfig,
    start: datetime,
    end: datetime,
    status_at: datetime,
) -> None:
    """The plant's history through the agent's engine and sealed outbox, with one status
    report of the agent at `status_at`, stored by the real ingest."""
    enroll(pg_url, config.agent.id, config.agent.site, make_agent_keys(config.keys_dir, cloud_keys))
    samples, _ = plant_history(config, start, end)
    runtime = AgentRuntime(config, AgentKeys.load(config.keys_dir), clock=lambda: status_at)
    runtime.pending.append(runtime.status_event())
    assert runtime.record(samples, end, flush_every_s=900) > 0
    store = BatchWriter(pool, cloud_keys, topic_prefix="test/")
    topic = batch_topic("test/", config.agent.site, config.agent.id)
    outbox = Outbox(config.outbox_path)
    try:
        for batch in outbox.pending(100_000):
            outcome = store.process(topic, batch.envelope)
            assert outcome.status == "stored", outcome.reason
    finally:
        outbox.close()


@contextmanager
def serve(pg_url: str, pool: ConnectionPool, keys_dir: Path) -> Iterator[str]:
    settings = CloudSettings(database=DatabaseSettings(url=pg_url), keys_dir=keys_dir)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, pool=pool), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started and thread.is_alive():
            threading.Event().wait(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def grade(value: float | None) -> str:
    if value is None:
        return "none"
    return "good" if value >= TARGET else "fair" if value >= TARGET * 0.85 else "poor"


async def drag(page: Page, selector: str, x0: float, x1: float) -> None:
    """A mouse drag across the element at fractions x0 -> x1 of its width (mid height)."""
    box = await page.evaluate(
        f"(() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect(); "
        "return [r.left, r.top, r.width, r.height]; })()"
    )
    left, top, width, height = box
    y = top + height / 2
    for kind, x in (
        ("mousePressed", x0),
        ("mouseMoved", (x0 + x1) / 2),
        ("mouseMoved", x1),
        ("mouseReleased", x1),
    ):
        await page.call(
            "Input.dispatchMouseEvent",
            type=kind,
            x=left + width * x,
            y=y,
            button="left",
            buttons=0 if kind == "mouseReleased" else 1,
            clickCount=1,
        )


def natural_key(name: str) -> tuple[str, int]:
    stem, _, number = name.rpartition("-")
    return stem, int(number)


async def test_live_plant_view_zoom_and_kiosk_in_chromium(
    tmp_path: Path, pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring
) -> None:
    # Ten hours of the demo plant (six machines, two lines, Berlin shifts) up to now; the
    # agent reports its status every two minutes, the last time just now.
    config = plant_config(tmp_path / "agent", DEMO.read_text(encoding="utf-8"), "2m")
    end = datetime.now(UTC).replace(microsecond=0)
    status_at = end
    history_start = end - timedelta(hours=10)
    await asyncio.to_thread(seed, pg_url, pool, cloud_keys, config, history_start, end, status_at)
    site = config.agent.site
    keys_dir = tmp_path / "api-keys"
    headers = bearer(keys_dir, role="viewer", sites=[site])
    token = headers["Authorization"].removeprefix("Bearer ")

    with serve(pg_url, pool, keys_dir) as base:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
            first = await client.get("/v1/plant/live", params={"site": site})
            assert first.status_code == 200, first.text
            again = await client.get(
                "/v1/plant/live",
                params={"site": site},
                headers={"If-None-Match": first.headers["ETag"]},
            )
            assert again.status_code == 304
            live = first.json()
            # A second into the history every machine is in the state it was first read in,
            # not in the `unknown` its engine announced at the same instant.
            states = await client.get(
                "/v1/plant/states",
                params={
                    "site": site,
                    "from": (history_start + timedelta(seconds=1)).isoformat(),
                    "to": (history_start + timedelta(minutes=1)).isoformat(),
                },
            )
            assert states.status_code == 200, states.text
            opening = {i["equipment_id"]: i["state"] for i in reversed(states.json()["intervals"])}
            assert len(opening) == len(config.equipment)
            assert "unknown" not in opening.values(), opening
            ranked = (
                await client.get(
                    "/v1/oee",
                    params={
                        "scope": "site",
                        "id": site,
                        "from": live["equipment"][0]["shift"]["start"],
                        "to": (datetime.now(UTC) + timedelta(minutes=1)).isoformat(),
                        "interval": "shift",
                        "group_by": "equipment",
                    },
                )
            ).json()
        assert live["timezone"] == "Europe/Berlin"
        machines = {m["equipment_id"]: m for m in live["equipment"]}
        assert set(machines) == {e.id for e in config.equipment}
        # The shift OEE of each tile is /v1/oee's over the shift so far.
        by_equipment = {g["equipment"]: g["total"] for g in ranked["groups"]}
        for eq, m in machines.items():
            assert m["state"] in {"running", "idle", "fault", "setup", "planned_stop"}, m
            assert m["since"] is not None and m["shift"]["name"] in {"early", "late", "night"}
            # The shift comes from the calendar the agent reported (it knows the shift's end).
            shift_end = datetime.fromisoformat(m["shift"]["end"])
            assert shift_end - datetime.fromisoformat(m["shift"]["start"]) == timedelta(hours=8)
            assert m["shift"]["oee"] == by_equipment[eq]["oee"], (eq, m, by_equipment[eq])
            if m["shift"]["planned_busy_s"]:
                cycle = next(e.ideal_cycle_time for e in config.equipment if e.id == eq)
                assert m["shift"]["ideal_count"] == int(m["shift"]["planned_busy_s"] / cycle)
        [agent] = live["agents"]
        assert agent["status_interval_s"] == 120.0 and agent["status_interval_source"] == "reported"
        late_at = datetime.fromisoformat(agent["late_at"])
        assert late_at == status_at + timedelta(seconds=2.5 * 120 + 5)

        async with open_page(tmp_path / "chromium", width=1400, height=1900) as page:
            await page.call(
                "Page.addScriptToEvaluateOnNewDocument",
                source=f"sessionStorage.setItem('edge-gateway-token', {token!r});"
                "localStorage.removeItem('edge-gateway-tz');",
            )
            await page.call("Page.navigate", url=f"{base}/?site={site}&range=8h&refresh=2")
            await page.wait_for("document.body && document.body.dataset.state === 'ready'")
            # The page polls with If-None-Match and gets 304 while nothing changed.
            await page.wait_for("Number(document.body.dataset.live304 || 0) >= 1")
            shown: dict[str, Any] = await page.evaluate(
                "({tiles: [...document.querySelectorAll('#machines .machine')].map(t => ({"
                "id: t.dataset.equipment, state: t.dataset.state, "
                "oee: t.querySelector('.oee').dataset.value, "
                "grade: t.querySelector('.oee').className, "
                "since: t.querySelector('.since').textContent, "
                "stale: t.classList.contains('stale')})), "
                "count: document.getElementById('live-count').textContent, "
                "tz: document.getElementById('tz').textContent, "
                "target: Chart.getChart('trend').options.plugins.targetLine.value, "
                "trendColors: Chart.getChart('trend').data.datasets[0].backgroundColor, "
                "ranked: Chart.getChart('ranked').data.labels, "
                "paretoUnit: Chart.getChart('pareto').options.scales.y.title.text, "
                "paretoMax: Math.max(...Chart.getChart('pareto').data.datasets[0].data), "
                "details: [...document.querySelectorAll('#tiles .detail')].map(d => d.textContent),"
                "timeline: Chart.getChart('timeline').data.labels, "
                "timelineTicks: Chart.getChart('timeline').scales.y.ticks.length, "
                "fleet: [...document.querySelectorAll('#fleet tbody tr')].map(r => r.innerText)})"
            )
            await page.screenshot(SCREENSHOTS / "plant.png")

            # Drag across the middle fifth of the timeline: every panel shows that stretch.
            before = await page.evaluate("document.getElementById('scope-label').textContent")
            await drag(page, "#timeline-chart", 0.5, 0.7)
            await page.wait_for(
                f"document.getElementById('scope-label').textContent !== {before!r} && "
                "!document.getElementById('zoom-reset').hidden"
            )
            zoomed: dict[str, Any] = await page.wait_for(
                "document.body.dataset.panels === 'ready' && "
                "({x: [Chart.getChart('timeline').scales.x.min, "
                "Chart.getChart('timeline').scales.x.max], "
                "interval: document.getElementById('trend-interval').textContent, "
                "note: document.getElementById('timeline-note').textContent})"
            )
            errors = list(page.errors)
        assert errors == [], errors

        names = sorted(machines, key=natural_key)
        assert [t["id"] for t in shown["tiles"]] == names
        for tile in shown["tiles"]:
            m = machines[tile["id"]]
            assert tile["state"] == m["state"]
            # Null at the start of a shift that opens with a break (nothing planned yet).
            expected = m["shift"]["oee"]
            assert (None if tile["oee"] == "" else float(tile["oee"])) == expected, (tile, m)
            assert tile["grade"] == f"oee {grade(m['shift']['oee'])}"
            assert tile["since"] and not tile["stale"], tile
        assert shown["count"] == f"showing {len(names)} of {len(names)} machines"
        assert shown["tz"] == "Europe/Berlin"
        assert shown["target"] == TARGET * 100
        assert len(set(shown["trendColors"])) >= 2, "OEE bars are coloured by the target"
        assert shown["timeline"] == names and shown["timelineTicks"] == len(names)
        assert sorted(shown["ranked"]) == sorted(names)
        # Units fit the magnitude: the largest Pareto bar reads between 2 and 180 of its unit.
        assert shown["paretoUnit"] in {"seconds", "minutes", "hours"}
        assert 1 <= shown["paretoMax"] < 180, shown
        assert not any("0.0 h" in d or "0.1 h" in d for d in shown["details"]), shown["details"]
        assert "reporting" in shown["fleet"][0] and "2 min" in shown["fleet"][0], shown["fleet"]
        span = zoomed["x"][1] - zoomed["x"][0]
        assert 60_000 <= span <= 3 * 3600_000, zoomed
        assert zoomed["interval"] in {"per minute", "per 15 minutes"}, zoomed
        assert "zoomed to" in zoomed["note"]

        # Kiosk: a read-only token from the address's fragment, no controls, refreshing.
        profile = tmp_path / "kiosk-profile"
        kiosk_url = f"{base}/?site={site}&kiosk=1&refresh=2"
        async with open_page(profile, width=1600, height=900) as page:
            await page.call("Page.navigate", url=f"{kiosk_url}#token={token}")
            await page.wait_for("document.body && document.body.dataset.state === 'ready'")
            await page.wait_for("Number(document.body.dataset.live304 || 0) >= 1")
            kiosk: dict[str, Any] = await page.evaluate(
                "({controls: getComputedStyle(document.getElementById('controls')).display, "
                "form: getComputedStyle(document.getElementById('token-form')).display, "
                "tiles: document.querySelectorAll('#machines .machine').length, "
                "kept: localStorage.getItem('edge-gateway-token') !== null, "
                "message: document.getElementById('message').hidden})"
            )
            await page.screenshot(SCREENSHOTS / "kiosk.png")
            errors = list(page.errors)
            # The screen is switched off: the browser closes (and writes its storage).
            with contextlib.suppress(Exception):
                await asyncio.wait_for(page.call("Browser.close"), 20)
            for _ in range(200):
                if not await asyncio.to_thread(os.path.lexists, profile / "SingletonLock"):
                    break
                await asyncio.sleep(0.1)
        assert errors == [], errors
        assert kiosk == {
            "controls": "none",
            "form": "none",
            "tiles": len(names),
            "kept": True,
            "message": True,
        }
        # The screen restarts (a new browser on the same profile) on the address without the
        # token: it signs in with the token it kept.
        async with open_page(profile, width=1600, height=900) as page:
            await page.call("Page.navigate", url=kiosk_url)
            await page.wait_for("document.body && document.body.dataset.state === 'ready'")
            after: int = await page.wait_for(
                "document.querySelectorAll('#machines .machine').length"
            )
            errors = list(page.errors)
        assert errors == [], errors
        assert after == len(names)
    for shot in ("plant.png", "kiosk.png"):
        assert (SCREENSHOTS / shot).stat().st_size > 20_000

    with api_client(pg_url, tmp_path / "views-keys") as api:
        await asyncio.to_thread(check_views, api, pg_url)


HUNDRED = """
agent: {id: edge-big-01, site: big-plant, timezone: UTC, state_dir: STATE,
        status_interval: 10s}
connections: [{id: plc-1, type: modbus, host: 127.0.0.1, port: 5020}]
mqtt: {host: 127.0.0.1, port: 1883}
shifts:
  - {name: early, start: "06:00", end: "14:00"}
  - {name: late, start: "14:00", end: "22:00"}
  - {name: night, start: "22:00", end: "06:00"}
equipment:
"""


async def test_a_hundred_machines_and_a_late_agent(
    tmp_path: Path, pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring
) -> None:
    text = HUNDRED.replace("STATE", str(tmp_path / "agent")) + "".join(
        f"  - {{id: press-{n}, line: line-{1 + n % 5}, connection: plc-1, unit: 1, "
        "ideal_cycle_time: 2s, signals: {state: {address: 'holding:0', type: uint16, "
        "map: {0: idle, 1: running, 2: fault, 3: setup}}, "
        "total_count: {address: 'holding:1', type: uint32}, "
        "reason: {address: 'holding:5', type: uint16, map: {1: no material, 2: tool change, "
        "3: jam, 4: hydraulics, 5: quality check}}}}\n"
        for n in range(1, 101)
    )
    config = parse_config(text, "big.yaml", env={})
    end = datetime.now(UTC).replace(microsecond=0)
    # The agent reports every 10 s and its last report is a minute old: late (a fixed
    # five-minute rule would still call it fine).
    status_at = end - timedelta(minutes=1)
    await asyncio.to_thread(
        seed, pg_url, pool, cloud_keys, config, end - timedelta(minutes=40), end, status_at
    )
    site = config.agent.site
    keys_dir = tmp_path / "api-keys"
    token = bearer(keys_dir, role="viewer", sites=[site])["Authorization"].split()[1]
    names = [f"press-{n}" for n in range(1, 101)]

    with serve(pg_url, pool, keys_dir) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            live = (
                await client.get(
                    "/v1/plant/live",
                    params={"site": site},
                    headers={"Authorization": f"Bearer {token}"},
                )
            ).json()
            # The same scoping as every /v1 route: another site's token sees nothing, no
            # token gets 401.
            other = bearer(keys_dir, role="viewer", sites=["elsewhere"])
            for path, extra in (
                ("/v1/plant/live", {}),
                (
                    "/v1/plant/states",
                    {"from": end.isoformat(), "to": datetime.now(UTC).isoformat()},
                ),
            ):
                params = {"site": site, **extra}
                assert (await client.get(path, params=params, headers=other)).status_code == 404
                assert (await client.get(path, params=params)).status_code == 401
        [agent] = live["agents"]
        assert agent["status_interval_s"] == 10.0
        assert datetime.fromisoformat(agent["late_at"]) == status_at + timedelta(seconds=30)
        async with open_page(tmp_path / "chromium", width=1400, height=1200) as page:
            await page.call(
                "Page.addScriptToEvaluateOnNewDocument",
                source=f"sessionStorage.setItem('edge-gateway-token', {token!r});",
            )
            await page.call("Page.navigate", url=f"{base}/?site={site}&range=1h")
            await page.wait_for("document.body && document.body.dataset.state === 'ready'")
            shown: dict[str, Any] = await page.evaluate(
                "({tiles: [...document.querySelectorAll('#machines .machine')]"
                ".map(t => t.dataset.equipment), "
                "stale: document.querySelectorAll('#machines .machine.stale').length, "
                "count: document.getElementById('live-count').textContent, "
                "scrolls: document.getElementById('machines').scrollHeight > "
                "document.getElementById('machines').clientHeight, "
                "timeline: Chart.getChart('timeline').data.labels, "
                "ticks: Chart.getChart('timeline').scales.y.ticks.map(t => t.label), "
                "note: document.getElementById('timeline-note').textContent, "
                "fleet: document.querySelector('#fleet tbody tr').innerText, "
                "chips: [...document.querySelectorAll('#live-filter .chip')]"
                ".map(c => c.dataset.state)})"
            )
            # One state chip filters the tiles, and the count says so.
            state = shown["chips"][0]
            await page.evaluate(f"document.querySelector('.chip[data-state={state}]').click()")
            filtered: dict[str, Any] = await page.evaluate(
                "({n: document.querySelectorAll('#machines .machine').length, "
                "count: document.getElementById('live-count').textContent})"
            )
            await page.screenshot(tmp_path / "hundred.png")
            errors = list(page.errors)
        assert errors == [], errors
    in_state = sum(1 for m in live["equipment"] if (m["state"] or "unknown") == state)
    assert shown["tiles"] == names
    assert shown["count"] == "showing 100 of 100 machines"
    assert shown["scrolls"]
    assert shown["timeline"] == names and shown["ticks"] == names
    assert shown["note"].startswith("showing 100 of 100 machines")
    # The agent's tiles and its fleet row say it is not reporting, from its own interval.
    assert shown["stale"] == 100
    assert ("late" in shown["fleet"] or "silent" in shown["fleet"]) and "10 s" in shown["fleet"]
    assert filtered == {"n": in_state, "count": f"showing {in_state} of 100 machines"}

    with api_client(pg_url, tmp_path / "views-keys") as api:
        await asyncio.to_thread(check_views, api, pg_url)


async def test_a_plant_that_just_started_time_zones_and_a_custom_period(
    tmp_path: Path, pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring
) -> None:
    # Three minutes of data: the page must not look broken (one giant bar, a one-pixel
    # timeline, "running 0.0 h of 0.1 h").
    text = HUNDRED.replace("STATE", str(tmp_path / "agent")).replace(
        "id: edge-big-01, site: big-plant, timezone: UTC",
        "id: edge-new-01, site: new-plant, timezone: America/New_York",
    ) + "".join(
        f"  - {{id: press-{n}, line: line-1, connection: plc-1, unit: 1, "
        "ideal_cycle_time: 2s, signals: {state: {address: 'holding:0', type: uint16, "
        "map: {0: idle, 1: running, 2: fault, 3: setup}}, "
        "total_count: {address: 'holding:1', type: uint32}}}\n"
        for n in (1, 2, 10)
    )
    config = parse_config(text, "new.yaml", env={})
    end = datetime.now(UTC).replace(second=0, microsecond=0)
    start = end - timedelta(minutes=3)
    await asyncio.to_thread(seed, pg_url, pool, cloud_keys, config, start, end, end)
    site = config.agent.site
    keys_dir = tmp_path / "api-keys"
    token = bearer(keys_dir, role="viewer", sites=[site])["Authorization"].split()[1]
    ready = "document.body && document.body.dataset.state === 'ready'"
    read = (
        "({interval: document.getElementById('trend-interval').textContent, "
        "bars: Chart.getChart('trend').data.labels.length, "
        "details: [...document.querySelectorAll('#tiles .detail')].map(d => d.textContent), "
        "timeline: Chart.getChart('timeline').data.labels, "
        "x: [Chart.getChart('timeline').scales.x.min, Chart.getChart('timeline').scales.x.max], "
        "note: document.getElementById('timeline-note').textContent, "
        "tz: document.getElementById('tz').textContent, "
        "pick: document.getElementById('tz-pick').value, "
        "scope: document.getElementById('scope-label').textContent, "
        "address: location.search})"
    )

    with serve(pg_url, pool, keys_dir) as base:
        async with open_page(tmp_path / "chromium", width=1400, height=1600) as page:
            await page.call(
                "Page.addScriptToEvaluateOnNewDocument",
                source=f"sessionStorage.setItem('edge-gateway-token', {token!r});",
            )
            await page.call("Page.navigate", url=f"{base}/?site={site}")
            await page.wait_for(ready)
            fresh: dict[str, Any] = await page.evaluate(read)
            await page.screenshot(tmp_path / "fresh.png")
            # Another time zone, kept for the next visit.
            await page.evaluate(
                "(() => { const s = document.getElementById('tz-pick'); s.value = 'UTC'; "
                "s.dispatchEvent(new Event('change')); })()"
            )
            await page.wait_for(f"{ready} && document.getElementById('tz').textContent === 'UTC'")
            await page.call("Page.navigate", url=f"{base}/?site={site}")
            await page.wait_for(ready)
            again: dict[str, Any] = await page.evaluate(read)
            # A custom period, typed as wall-clock times of the shown zone (UTC now).
            lo = (start - timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M")
            hi = (end + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M")
            await page.evaluate(
                "(() => { const r = document.getElementById('range'); r.value = 'custom'; "
                "r.dispatchEvent(new Event('change')); "
                f"document.getElementById('from').value = {lo!r}; "
                f"document.getElementById('to').value = {hi!r}; "
                "document.getElementById('apply-range').click(); })()"
            )
            await page.wait_for(f"{ready} && location.search.includes('from=')")
            custom: dict[str, Any] = await page.evaluate(read)
            errors = list(page.errors)
        assert errors == [], errors

    first_state = min(
        s.ts for s in plant_history(config, start, end)[0] if s.signal == "state"
    ).timestamp()
    assert fresh["tz"] == "America/New_York" and fresh["pick"] == "plant"
    assert fresh["interval"] == "per minute" and 1 <= fresh["bars"] <= 3, fresh
    assert fresh["timeline"] == ["press-1", "press-2", "press-10"]
    # The timeline's axis starts with the data, not hours before it.
    assert abs(fresh["x"][0] / 1000 - first_state) < 1, (fresh["x"], first_state)
    assert "data from" in fresh["note"]
    availability = fresh["details"][1]
    assert re.fullmatch(
        r"running \d+(\.\d)? (s|min) of \d+(\.\d)? (s|min) planned .*", availability
    )
    assert again["tz"] == "UTC" and again["pick"] == "UTC"
    wanted = (start - timedelta(minutes=2), end + timedelta(minutes=1))
    for name, at in zip(("from", "to"), wanted, strict=True):
        assert f"{name}={at.strftime('%Y-%m-%dT%H%%3A%M%%3A00.000Z')}" in custom["address"]
    assert custom["interval"] == "per minute"
    assert custom["x"][0] == wanted[0].timestamp() * 1000
    assert custom["x"][1] <= wanted[1].timestamp() * 1000

    with api_client(pg_url, tmp_path / "views-keys") as api:
        await asyncio.to_thread(check_views, api, pg_url)
