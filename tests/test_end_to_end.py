"""End to end with real components: pymodbus press -> edge-agent process -> Mosquitto ->
ingest -> PostgreSQL -> HTTP API, with the agent SIGKILLed in the middle."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from cloud_api.api.app import create_app
from cloud_api.config import CloudSettings, DatabaseSettings
from cloud_api.ingest.worker import IngestWorker
from connectors.modbus.simulator import Press, PressLine
from sync.keys import CloudKeyring
from tests.conftest import MQTT_HOST, MQTT_PORT, bearer, enroll, free_port, make_agent_keys
from tests.invariants import Truth, api_client, check_views, compare_with_truth, wait_counted

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")

CONFIG = """
agent:
  id: edge-e2e
  site: plant-e2e
  timezone: Europe/Berlin
  state_dir: {state}
  bucket_seconds: 5
connections:
  - id: plc
    type: modbus
    host: 127.0.0.1
    port: {port}
    poll_interval: 200ms
    timeout: 1s
mqtt:
  host: {mqtt_host}
  port: {mqtt_port}
  topic_prefix: "{prefix}"
health:
  port: {health_port}
uplink:
  flush_interval: 500ms
  ack_timeout: 5s
  # A graceful stop waits for the backlog's acks (the test reads the outbox after it); a
  # loaded test machine may take longer than the default 5 s.
  drain_timeout: 25s
shifts:
  - name: all-day
    start: "00:00"
    end: "00:00"
equipment:
  - id: press-1
    connection: plc
    unit: 1
    ideal_cycle_time: 250ms
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running, 2: fault, 3: setup}}}}
      total_count: {{address: "holding:1", type: uint32}}
      scrap_count: {{address: "holding:3", type: uint32}}
      reason: {{address: "holding:5", map: {{1: no material, 2: tool change, 3: jam}}}}
"""


async def wait_for(predicate: Callable[[], bool], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [EDGE_AGENT, "run", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def stored_counts(url: str) -> tuple[int, int, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*), COALESCE(sum((body->>'produced')::bigint), 0), "
            "COALESCE(sum((body->>'scrap')::bigint), 0) FROM facts.events WHERE kind = 'count'"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def outbox_depth(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT count(*) FROM batches").fetchone()[0])


async def test_press_to_api_with_agent_killed(
    tmp_path: Path,
    pg_url: str,
    pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    topic_prefix: str,
    ingest: IngestWorker,
) -> None:
    state = tmp_path / "agent"
    public = make_agent_keys(state / "keys", cloud_keys)
    enroll(pg_url, "edge-e2e", "plant-e2e", public)

    press = Press(seed=7, time_scale=0.15, cycle_time=0.25)
    press.frozen = True
    press.set_state("idle")
    port = free_port()
    line = PressLine([press], port=port)
    await line.start()

    config = tmp_path / "agent.yaml"
    config.write_text(
        CONFIG.format(
            state=state,
            port=port,
            mqtt_host=MQTT_HOST,
            mqtt_port=MQTT_PORT,
            prefix=topic_prefix,
            health_port=free_port(),
        ),
        encoding="utf-8",
    )
    log = tmp_path / "agent.log"
    started = datetime.now(UTC)
    agent = start_agent(config, log)
    try:
        # The agent has a counter baseline once its first batches are stored.
        def baseline_stored() -> bool:
            with psycopg.connect(pg_url) as conn:
                row = conn.execute("SELECT count(*) FROM facts.events WHERE kind = 'state'")
                return int(row.fetchone()[0]) > 0  # type: ignore[index]

        await wait_for(baseline_stored, 30, "the agent's first state event in PostgreSQL")
        press.frozen = False
        await asyncio.sleep(5)

        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        killed_at = time.monotonic()
        await asyncio.sleep(2)  # the press keeps producing while the agent is down
        agent = start_agent(config, log)
        await asyncio.sleep(1)
        gap = time.monotonic() - killed_at
        await asyncio.sleep(5)

        press.frozen = True
        press.set_state("idle")  # a frozen press does no work: it must not look like running
        # The agent reads the final counters and closes the bucket that holds them.
        truth = press.truth
        await wait_counted(pg_url, {"press-1": (truth.produced, truth.scrap)}, datetime.now(UTC))
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0, log.read_text()
    finally:
        if agent.poll() is None:
            agent.kill()
        await line.stop()

    truth = press.truth
    assert truth.produced > 10, "the simulated press should have produced parts"
    await wait_for(lambda: outbox_depth(state / "outbox.db") == 0, 20, "every batch acked")
    _, produced, scrap = stored_counts(pg_url)
    assert (produced, scrap) == (truth.produced, truth.scrap), log.read_text()[-3000:]

    keys_dir = tmp_path / "cloud-keys"
    app = create_app(
        CloudSettings(database=DatabaseSettings(url=pg_url), keys_dir=keys_dir), pool=pool
    )
    window_from = (started - timedelta(minutes=1)).replace(second=0, microsecond=0)
    window_to = datetime.now(UTC) + timedelta(minutes=1)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as client:
        response = await client.get(
            "/v1/equipment/press-1/oee",
            params={"from": window_from.isoformat(), "to": window_to.isoformat()},
            headers=bearer(keys_dir, role="viewer", sites=["plant-e2e"]),
        )
    assert response.status_code == 200, response.text
    body = response.json()
    c = body["components"]
    assert (c["produced"], c["scrap"], c["good"]) == (
        truth.produced,
        truth.scrap,
        truth.produced - truth.scrap,
    )
    # Time classes add up to planned busy time; the agent-down gap is unknown time.
    classes = c["production_s"] + c["setup_s"] + c["downtime_s"] + c["unknown_s"]
    assert classes == pytest.approx(c["planned_busy_s"], abs=1e-3)
    assert c["unknown_s"] >= gap - 1.0
    running = truth.seconds["running"]
    # Every second the press ran is production, except what the agent did not see (it was
    # down: the gap, and on a loaded machine the time its restart took to read the PLC again).
    assert running - c["unknown_s"] - 1.5 <= c["production_s"] <= running + 1.0, c
    # Ratios are computed from the sums.
    assert body["availability"] == pytest.approx(c["production_s"] / c["planned_busy_s"])
    assert body["performance"] == pytest.approx(c["ideal_produced_s"] / c["production_s"])
    assert body["quality"] == pytest.approx(c["good"] / c["produced"])
    assert body["oee"] == pytest.approx(c["ideal_good_s"] / c["planned_busy_s"])
    assert c["ideal_produced_s"] == pytest.approx(0.25 * truth.produced)

    # Every view agrees with the others and with the press (the simulator's program sets
    # "jam" with every fault, "no material" with its idle steps, none when frozen idle).
    truths = {
        "press-1": Truth(
            produced=truth.produced,
            scrap=truth.scrap,
            reasons={"fault": frozenset({"jam"}), "idle": frozenset({"no material", None})},
        )
    }
    with api_client(pg_url, tmp_path / "views-keys") as api:
        views = await asyncio.to_thread(check_views, api, pg_url, truths=truths)
    compare_with_truth(views, truths)
