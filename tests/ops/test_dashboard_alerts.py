"""The dashboard's alerts panel in headless Chromium against a live `cloud-api`: an agent
reports its outbox once (its own status event, through the real ingest) and goes silent with
its batches unacked; the outbox_age rule, evaluated as a worker does, opens an alert as the
outbox ages, and the panel lists it as open; once the batches are stored and acked and the
agent says so, the alert is resolved and the panel shows it resolved. The cross-view checker
last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from cloud_api.alerts import store
from cloud_api.alerts.rules import RuleSpec
from sync.keys import CloudKeyring
from tests.cloud_api.alerting import wait_for
from tests.cloud_api.test_alerts import run_rules, ship_all, undrained_agent
from tests.conftest import bearer
from tests.invariants import api_client, check_views
from tests.ops.chromium import Page, open_page
from tests.ops.test_live_dashboard import serve
from tests.ops.test_stop_form import show

ROWS = (
    "[...document.querySelectorAll('#alerts tbody tr')]"
    ".map((r) => [...r.cells].map((c) => c.textContent))"
)
NONE = "\u2013"  # alerts.js shows a missing time as an en dash


async def rows_when(page: Page, state: str) -> list[list[str]]:
    """The panel's rows once its first row is in `state` (OPEN or resolved)."""
    found: list[list[str]] = await page.wait_for(
        f"(() => {{ const rows = {ROWS}; "
        f"return rows.length && rows[0][0] === {state!r} && rows; }})()"
    )
    return found


async def test_the_alerts_panel_shows_an_outbox_alert_open_then_resolved(
    tmp_path: Path, pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring
) -> None:
    # The agent's outbox (SQLite) stays in this thread: no asyncio.to_thread around it.
    runtime, batches, status = undrained_agent(pg_url, pool, cloud_keys, tmp_path)
    site, agent_id = runtime.config.agent.site, runtime.config.agent.id
    rule = {"name": "outbox", "kind": "outbox_age", "oldest_over": "1s", "receivers": ["x"]}
    with psycopg.connect(pg_url) as conn:
        store.sync_file_rules(conn, [RuleSpec.model_validate(rule)], "test")
    keys_dir = tmp_path / "api-keys"
    token = bearer(keys_dir, role="viewer", sites=[site])["Authorization"].removeprefix("Bearer ")
    opened: list[list[str]] = []
    resolved: list[list[str]] = []
    errors: list[str] = []
    try:
        # The agent's last report: its outbox holds batches only just made, under 1 s old.
        assert status.send([runtime.status_event()]) == "stored"

        def alerted() -> bool:
            return run_rules(pg_url) == {"outbox": {agent_id}}

        wait_for(alerted, "the outbox alert of the silent agent")
        with serve(pg_url, pool, keys_dir) as base:
            async with open_page(tmp_path / "chromium", width=1400, height=1900) as page:
                await show(page, base, token, "/")
                opened = await rows_when(page, "OPEN")
                ship_all(runtime, batches)
                assert status.send([runtime.status_event()]) == "stored"
                assert run_rules(pg_url) == {}
                await show(page, base, token, "/")
                resolved = await rows_when(page, "resolved")
                errors = list(page.errors)
    finally:
        runtime.outbox.close()
    assert errors == [], errors

    def only(rows: list[list[str]]) -> list[Any]:
        assert len(rows) == 1, rows
        state, rule_id, what, opened_at, resolved_at = rows[0]
        return [state, rule_id, what, opened_at != NONE, resolved_at != NONE]

    state, rule_id, what, has_opened, has_resolved = only(opened)
    assert (state, rule_id, has_opened, has_resolved) == ("OPEN", "outbox", True, False)
    assert f"outbox of agent {agent_id} at {site}: oldest unacked batch" in what
    assert only(resolved)[:2] == ["resolved", "outbox"] and only(resolved)[3:] == [True, True]
    with api_client(pg_url, tmp_path / "views-keys") as api:
        check_views(api, pg_url)
