"""The demo's seeded history through real components: simulated PLC samples -> the agent's
engine and sealed outbox (`AgentRuntime.record`) -> uplink -> Mosquitto -> ingest ->
PostgreSQL -> HTTP API, which must answer with exactly what the simulated machines did."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
from psycopg_pool import ConnectionPool

from agent.config import parse_config
from agent.plant_history import plant_history
from agent.runtime import AgentRuntime
from buffer.outbox import Outbox
from cloud_api.api.app import create_app
from cloud_api.config import CloudSettings, DatabaseSettings
from cloud_api.ingest.worker import IngestWorker
from sync.keys import AgentKeys, CloudKeyring
from sync.uplink import BrokerSettings, Uplink
from tests.conftest import MQTT_HOST, MQTT_PORT, bearer, enroll, make_agent_keys

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo-agent.yaml"
# A Wednesday, 10:00 to 18:00 in Berlin (UTC+1): the end of the early shift with its meal
# break, the change to the late shift, and the late shift's first break.
START = datetime(2026, 11, 18, 9, 0, tzinfo=UTC)
END = datetime(2026, 11, 18, 17, 0, tzinfo=UTC)
BREAKS_S = 30 * 60 + 15 * 60


async def wait_for(predicate: Callable[[], bool], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def depth(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM batches").fetchone()[0])


async def test_the_seeded_history_reaches_the_api_as_the_machines_made_it(
    tmp_path: Path,
    pg_url: str,
    pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    topic_prefix: str,
    ingest: IngestWorker,
) -> None:
    text = DEMO.read_text(encoding="utf-8").replace("var/demo/agent", str(tmp_path / "agent"))
    text = text.replace(
        "  port: 1883\n", f'  port: {MQTT_PORT}\n  topic_prefix: "{topic_prefix}"\n'
    )
    config = parse_config(text, "demo-agent.yaml", env={})
    enroll(pg_url, config.agent.id, config.agent.site, make_agent_keys(config.keys_dir, cloud_keys))

    samples, counters = plant_history(config, START, END)
    first: dict[tuple[str, str], int] = {}
    for s in samples:
        assert isinstance(s.value, int)
        first.setdefault((s.equipment_id, s.signal), s.value)
    press3 = [s.value for s in samples if s.equipment_id == "press-3" and s.signal == "total_count"]
    assert press3 != sorted(press3), "the 16-bit counter of press-3 should wrap in this window"

    runtime = AgentRuntime(config, AgentKeys.load(config.keys_dir))
    assert runtime.record(samples, END, flush_every_s=900) > 0

    outbox = Outbox(config.outbox_path)
    uplink = Uplink(
        outbox,
        BrokerSettings(host=MQTT_HOST, port=MQTT_PORT),
        site=config.agent.site,
        agent=config.agent.id,
        ack_keys=cloud_keys.ack_verify_keys(),
        topic_prefix=topic_prefix,
    )
    task = asyncio.create_task(uplink.run())
    try:
        await wait_for(lambda: depth(config.outbox_path) == 0, 120, "every batch acked")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        outbox.close()

    keys_dir = tmp_path / "cloud-keys"
    app = create_app(
        CloudSettings(database=DatabaseSettings(url=pg_url), keys_dir=keys_dir), pool=pool
    )
    window = {"from": START.isoformat(), "to": END.isoformat()}
    headers = bearer(keys_dir, role="viewer", sites=[config.agent.site])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as client:
        for eq in config.equipment:
            response = await client.get(
                f"/v1/equipment/{eq.id}/oee", params=window, headers=headers
            )
            assert response.status_code == 200, response.text
            c = response.json()["components"]
            produced = counters[eq.id].total - first[(eq.id, "total_count")]
            scrap = counters[eq.id].scrap - first[(eq.id, "scrap_count")]
            assert produced > 0
            assert (c["produced"], c["scrap"], c["good"]) == (produced, scrap, produced - scrap)
            # Shifts and breaks in Berlin time decide the planned busy time.
            assert c["planned_busy_s"] == (END - START).total_seconds() - BREAKS_S
            classes = c["production_s"] + c["setup_s"] + c["downtime_s"] + c["unknown_s"]
            assert abs(classes - c["planned_busy_s"]) < 1e-6
            assert c["downtime_s"] > 0 and c["unknown_s"] == 0
        pareto = await client.get(
            "/v1/downtime/pareto",
            params={**window, "scope": "site", "id": config.agent.site, "top": 100},
            headers=headers,
        )
    assert pareto.status_code == 200, pareto.text
    reasons = {item["reason"] for item in pareto.json()["items"]}
    configured = set((config.equipment[0].signals["reason"].map or {}).values())
    assert {"jam", "no material"} <= reasons <= configured | {"unspecified"}
