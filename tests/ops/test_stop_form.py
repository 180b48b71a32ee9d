"""Classifying a stop from the dashboard, in headless Chromium against a live `cloud-api`: a
click on a fault bar of the state timeline opens the form (the equipment's reason list), a
reason saved there moves the stop's seconds in the Pareto chart, and taking it back restores
the PLC's reason. Data: PLC samples -> the agent's engine and sealed outbox -> the real ingest
-> PostgreSQL (tests/cloud_api/test_stop_annotations.py), then the cross-view checker."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from psycopg_pool import ConnectionPool

from sync.keys import CloudKeyring
from tests.cloud_api.test_stop_annotations import (
    EQ,
    FAULT_START,
    HI,
    LO,
    SCOPE,
    SITE,
    TRUTH,
    settle,
)
from tests.conftest import bearer
from tests.invariants import api_client, check_views
from tests.ops.chromium import Page, open_page
from tests.ops.test_live_dashboard import serve

PARETO = (
    "document.body.dataset.panels === 'ready' && Chart.getChart('pareto') && "
    "({labels: Chart.getChart('pareto').data.labels, "
    "unit: Chart.getChart('pareto').options.scales.y.title.text, "
    "values: Chart.getChart('pareto').data.datasets[0].data})"
)
START = FAULT_START.isoformat()


def bar_where(key: str, value: str) -> str:
    """JS: the timeline bar whose interval has `key` == `value`: its centre in page pixels and
    the interval it carries (null while there is none)."""
    return f"""(() => {{
  const chart = Chart.getChart('timeline');
  for (const [d, set] of chart.data.datasets.entries()) {{
    const i = set.data.findIndex((p) => p.interval && p.interval[{key!r}] === {value!r});
    if (i < 0) continue;
    const c = chart.getDatasetMeta(d).data[i].getCenterPoint();
    const r = chart.canvas.getBoundingClientRect();
    return {{x: r.left + c.x, y: r.top + c.y, interval: set.data[i].interval}};
  }}
  return null;
}})()"""


# The stop's bar in the timeline.
FAULT_BAR = bar_where("start", START)


async def click_fault(page: Page, locate: str = FAULT_BAR) -> dict[str, Any]:
    """Click the stop's bar found by `locate` (JS of bar_where); the form is open then."""
    bar: dict[str, Any] = await page.wait_for(locate)
    await page.call("Runtime.evaluate", expression="window.scrollTo(0, 0)")
    bar = await page.wait_for(locate)
    for kind in ("mousePressed", "mouseReleased"):
        await page.call(
            "Input.dispatchMouseEvent",
            type=kind,
            x=bar["x"],
            y=bar["y"],
            button="left",
            buttons=1 if kind == "mousePressed" else 0,
            clickCount=1,
        )
    await page.wait_for(
        "document.getElementById('stop-form').open && "
        "document.getElementById('stop-form').dataset.ready === 'true'"
    )
    return bar


async def save_no_material(page: Page) -> dict[str, Any]:
    """Save "no material" (note "coil ran out") in the open form; the Pareto chart once it
    leads with that reason."""
    await page.evaluate(
        "(() => { document.getElementById('stop-form-reason').value = 'no material'; "
        "document.getElementById('stop-form-note').value = 'coil ran out'; "
        "document.getElementById('stop-form-save').click(); })()"
    )
    await page.wait_for("(document.body.dataset.stopNote || '').startsWith('classified')")
    await page.wait_for(PARETO + " && Chart.getChart('pareto').data.labels[0] === 'no material'")
    shown: dict[str, Any] = await page.wait_for(PARETO)
    return shown


def dashboard_path(lo: datetime, hi: datetime) -> str:
    """The dashboard of press-1 over [lo, hi)."""
    iso = {k: t.isoformat().replace("+", "%2B") for k, t in (("from", lo), ("to", hi))}
    return f"/?site={SITE}&equipment={EQ}&from={iso['from']}&to={iso['to']}"


async def show(page: Page, base: str, token: str, path: str) -> None:
    """Sign the tab in with `token` (kept for later navigations) and open `path`."""
    await page.call(
        "Page.addScriptToEvaluateOnNewDocument",
        source=f"sessionStorage.setItem('edge-gateway-token', {token!r});",
    )
    await page.call("Page.navigate", url=base + path)
    await page.wait_for("document.body && document.body.dataset.state === 'ready'")


async def api_pareto(client: httpx.AsyncClient) -> list[tuple[str, float]]:
    r = await client.get("/v1/downtime/pareto", params={**SCOPE, "by": "reason", "top": 8})
    assert r.status_code == 200, r.text
    return [(i["reason"], i["seconds"]) for i in r.json()["items"]]


async def test_a_stop_classified_in_the_timeline_moves_in_the_pareto(
    tmp_path: Path, pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring
) -> None:
    await asyncio.to_thread(settle, pg_url, pool, cloud_keys, tmp_path)
    keys_dir = tmp_path / "api-keys"
    headers = bearer(keys_dir, role="engineer", sites=[SITE])
    token = headers["Authorization"].removeprefix("Bearer ")
    with serve(pg_url, pool, keys_dir) as base:
        client = httpx.AsyncClient(base_url=base, headers=headers, timeout=30)
        async with open_page(tmp_path / "chromium", width=1400, height=1900) as page:
            await show(page, base, token, dashboard_path(LO, HI))
            before = await page.wait_for(PARETO)

            bar = await click_fault(page)
            form: dict[str, Any] = await page.evaluate(
                "({options: [...document.getElementById('stop-form-reason').options]"
                ".map((o) => o.value), what: document.getElementById('stop-form-what')"
                ".textContent, plc: document.getElementById('stop-form-plc').textContent, "
                "remove: document.getElementById('stop-form-remove').hidden})"
            )
            after = await save_no_material(page)
            reclassified = (await page.wait_for(FAULT_BAR))["interval"]
            api_after = await api_pareto(client)

            # Again: the form offers to go back to the PLC's reason.
            await click_fault(page)
            remove_shown = await page.evaluate(
                "!document.getElementById('stop-form-remove').hidden"
            )
            await page.evaluate("document.getElementById('stop-form-remove').click()")
            await page.wait_for("(document.body.dataset.stopNote || '').startsWith('removed')")
            restored = await page.wait_for(
                PARETO + " && Chart.getChart('pareto').data.labels[0] === 'unspecified' && "
                "Chart.getChart('pareto').data.labels"
            )
            restored_bar = (await page.wait_for(FAULT_BAR))["interval"]
            errors = list(page.errors)
        api_restored = await api_pareto(client)
        await client.aclose()
    assert errors == [], errors

    # Before: the 20 min fault without a reason is most of "unspecified" (30 min in all).
    assert before["labels"] == ["unspecified", "jam"]
    assert bar["interval"]["plc_reason"] is None and bar["interval"]["annotation"] is None
    assert form["options"] == ["jam", "no material"]
    assert EQ in form["what"] and form["plc"] == "no reason" and form["remove"] is True
    # After saving: the Pareto chart has the API's new bars, the timeline the new reason.
    assert api_after == [("no material", 1200.0), ("unspecified", 600.0), ("jam", 300.0)]
    assert after["labels"] == [reason for reason, _ in api_after]
    assert after["unit"] == "minutes" and after["values"] == [20, 10, 5]
    assert reclassified["reason"] == "no material" and reclassified["plc_reason"] is None
    assert reclassified["annotation"]["note"] == "coil ran out"
    # Taken back: the PLC's reason again, everywhere.
    assert remove_shown is True
    assert api_restored == [("unspecified", 1800.0), ("jam", 300.0)]
    assert restored == ["unspecified", "jam"]
    assert restored_bar["reason"] is None and restored_bar["annotation"] is None

    with api_client(pg_url, tmp_path / "views-keys") as api:
        check_views(api, pg_url, truths=TRUTH)
