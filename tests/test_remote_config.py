"""Remote configuration end to end with real components: a pymodbus press line, the
`edge-agent run` process with `config.source: cloud`, the machine's Mosquitto, ingest,
PostgreSQL, `cloud-api agents config push` and the HTTP API.

One plant, one agent, in order: a pushed version adds a machine (applied, its data arrives),
a broken one is rejected with YAML paths and lines, one with an unreachable PLC is rolled
back (the previous version runs again, no part lost), forged, foreign and replayed messages
are refused and reported, and an agent killed in the middle of applying starts again on its
last good version. Ends with the cross-view invariant checker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from psycopg_pool import ConnectionPool

from cloud_api.api.app import create_app
from cloud_api.config import CloudSettings, DatabaseSettings, MqttSettings
from cloud_api.fleetconfig import store
from cloud_api.fleetconfig.publish import signed_message
from cloud_api.ingest.worker import IngestWorker
from connectors.modbus.simulator import Press, PressLine
from sync.config_message import ConfigBody, config_digest, config_topic, sign_config
from sync.keys import CloudKeyring, ed25519_key_id
from tests.conftest import MQTT_HOST, MQTT_PORT, bearer, enroll, free_port, make_agent_keys
from tests.invariants import Truth, api_client, check_views, compare_with_truth, wait_counted

BIN = Path(sys.executable).parent
# Each test of remote configuration has an agent id of its own (`Plant(agent=...)`): its MQTT
# client id is made of it, and two clients with one id on the shared broker take each other's
# connection, so tests running side by side must not share one.
AGENT, SITE = "edge-rc", "plant-rc"

HEAD = """
agent:
  id: {agent}
  site: {site}
  timezone: {timezone}
  state_dir: {state}
  bucket_seconds: 5
config:
  source: cloud
  # Long enough that a loaded test machine connects the new pipeline to the broker in time.
  settle: 8s
connections:
  - id: plc
    type: modbus
    host: 127.0.0.1
    port: {port}
    poll_interval: 200ms
    timeout: 1s
{extra_connection}mqtt:
  host: {mqtt_host}
  port: {mqtt_port}
  topic_prefix: "{prefix}"
health:
  port: {health_port}
uplink:
  flush_interval: 500ms
  ack_timeout: 5s
  # A graceful stop waits for the backlog's acks: the tests read the cloud after it.
  drain_timeout: 25s
shifts:
  - name: all-day
    start: "00:00"
    end: "00:00"
equipment:
"""
PRESS = """  - id: {id}
    connection: {connection}
    unit: {unit}
    ideal_cycle_time: 250ms
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running, 2: fault, 3: setup}}}}
      total_count: {{address: "holding:1", type: uint32}}
      scrap_count: {{address: "holding:3", type: uint32}}
      reason: {{address: "holding:5", map: {{1: no material, 2: tool change, 3: jam}}}}
"""
REASONS = {"fault": frozenset({"jam"}), "idle": frozenset({"no material", None})}


async def wait_for(predicate: Callable[[], bool], limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def results(url: str) -> list[dict[str, Any]]:
    """The agent's config_result events as stored, oldest first."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT body->'data' FROM facts.events WHERE kind = 'agent' "
            "AND body->>'code' = 'config_result' ORDER BY ts, event_id"
        ).fetchall()
    return [r[0] for r in rows]


def counts_of(url: str, equipment: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT COALESCE(sum((body->>'produced')::bigint), 0), "
            "COALESCE(sum((body->>'scrap')::bigint), 0) FROM facts.events "
            "WHERE kind = 'count' AND equipment_id = %s",
            (equipment,),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def publish_raw(topic: str, payload: bytes) -> None:
    """Publish one message (not retained) as an intruder or a replayer would."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(MQTT_HOST, MQTT_PORT)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


class Plant:
    def __init__(self, tmp_path: Path, prefix: str, agent: str = AGENT) -> None:
        self.tmp = tmp_path
        self.agent = agent
        self.state = tmp_path / "agent"
        self.prefix = prefix
        self.port = free_port()
        self.dead_port = free_port()  # nothing listens there: an unreachable PLC
        self.health_port = free_port()
        self.presses = [Press(seed=11, time_scale=0.15, cycle_time=0.25),
                        Press(seed=12, time_scale=0.15, cycle_time=0.25)]  # fmt: skip
        for press in self.presses:
            press.frozen = True
            press.set_state("idle")
        self.line = PressLine(self.presses, port=self.port)
        self.log = tmp_path / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None

    def config(self, presses: list[tuple[str, str, int]], *, timezone: str = "Europe/Berlin",
               extra_connection: str = "") -> str:  # fmt: skip
        head = HEAD.format(
            agent=self.agent,
            site=SITE,
            timezone=timezone,
            state=self.state,
            port=self.port,
            extra_connection=extra_connection,
            mqtt_host=MQTT_HOST,
            mqtt_port=MQTT_PORT,
            prefix=self.prefix,
            health_port=self.health_port,
        )
        return head + "".join(PRESS.format(id=i, connection=c, unit=u) for i, c, u in presses)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(BIN / "edge-agent"), "run", "-c", str(self.tmp / "agent.yaml")],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "PLANT_TZ": "Europe/Berlin"},
            )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def outbox_empty(self) -> bool:
        """No batch waits for its ack: the running agent's own figure (it holds the outbox
        exclusively, so the file cannot be read beside it), the file once it has stopped."""
        if self.process is not None and self.process.poll() is None:
            try:
                text = httpx.get(f"http://127.0.0.1:{self.health_port}/metrics", timeout=5).text
            except httpx.HTTPError:
                return False
            return "\nedge_agent_outbox_batches 0.0\n" in text
        with sqlite3.connect(f"file:{self.state / 'outbox.db'}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT count(*) FROM batches").fetchone()[0]) == 0

    async def stop_drained(self) -> None:
        """Stop the agent gracefully with its outbox empty. What the stop committed but could
        not ship within its drain time stays in the outbox until the next start (a loaded
        machine may take longer than the drain time): start again and let it ship."""
        assert self.process is not None
        for attempt in range(3):
            self.process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(self.process.wait, 60) == 0, self.tail()
            if await asyncio.to_thread(self.outbox_empty):
                return
            self.start()
            await wait_for(self.outbox_empty, 90, f"the outbox to drain (start {attempt + 2})")
        raise AssertionError("the outbox is not empty after three graceful stops")


async def test_remote_configuration_end_to_end(
    tmp_path: Path,
    pg_url: str,
    pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    topic_prefix: str,
    ingest: IngestWorker,
) -> None:
    plant = Plant(tmp_path, topic_prefix)
    enroll(pg_url, AGENT, SITE, make_agent_keys(plant.state / "keys", cloud_keys))
    keys_dir = tmp_path / "cloud-keys"
    cloud_yaml = tmp_path / "cloud.yaml"
    cloud_yaml.write_text(
        json.dumps(
            {
                "database": {"url": pg_url},
                "mqtt": {"host": MQTT_HOST, "port": MQTT_PORT, "topic_prefix": topic_prefix},
                "keys_dir": str(keys_dir),
            }
        ),
        encoding="utf-8",
    )
    settings = CloudSettings(
        database=DatabaseSettings(url=pg_url),
        mqtt=MqttSettings(host=MQTT_HOST, port=MQTT_PORT, topic_prefix=topic_prefix),
        keys_dir=keys_dir,
    )
    app = create_app(settings, pool=pool)
    engineer = bearer(keys_dir, role="engineer", sites=[SITE])
    one = [("press-1", "plc", 1)]
    two = [("press-1", "plc", 1), ("press-2", "plc", 2)]
    (tmp_path / "agent.yaml").write_text(plant.config(one), encoding="utf-8")
    await plant.line.start()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")
    try:
        plant.start()

        def first_state() -> bool:
            with psycopg.connect(pg_url) as conn:
                row = conn.execute("SELECT count(*) FROM facts.events WHERE kind = 'state'")
                return int(row.fetchone()[0]) > 0  # type: ignore[index]

        await wait_for(first_state, 40, "the agent's first state event")
        plant.presses[0].frozen = False

        # 1. A version that adds press-2, with an ${ENV} reference: pushed by the CLI.
        v1 = plant.config(two, timezone="${PLANT_TZ}")
        (tmp_path / "v1.yaml").write_text(v1, encoding="utf-8")
        push = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "cloud-api"), "--config", str(cloud_yaml), "agents", "config", "push",
             "--agent", AGENT, "--file", str(tmp_path / "v1.yaml"), "--comment", "add press-2",
             "--wait", "90"],
            capture_output=True,
            text=True,
            timeout=120,
        )  # fmt: skip
        assert push.returncode == 0, push.stdout + push.stderr + plant.tail()
        assert "applied after" in push.stdout, push.stdout
        applied = [r for r in results(pg_url) if r["result"] == "applied"]
        assert [(r["version"], r["running_version"]) for r in applied] == [(1, 1)]
        # The reference travelled and is stored as written, on both sides.
        with psycopg.connect(pg_url) as conn:
            stored = conn.execute(
                "SELECT yaml FROM registry.agent_configs WHERE agent_id = %s AND version = 1",
                (AGENT,),
            ).fetchone()
        assert stored is not None and "timezone: ${PLANT_TZ}" in stored[0]
        on_box = plant.state / "remote-config" / "applied.json"
        assert "${PLANT_TZ}" in json.loads(on_box.read_bytes())["config"]["yaml"]
        assert on_box.stat().st_mode & 0o777 == 0o600
        plant.presses[1].frozen = False
        await wait_for(lambda: counts_of(pg_url, "press-2")[0] > 0, 60, "parts of press-2")

        # 2. A broken version: rejected, with the YAML path and line of each problem.
        broken = v1.replace("ideal_cycle_time: 250ms", "ideal_cycle_tme: 250ms", 1)
        broken = broken.replace("poll_interval: 200ms", "poll_interval: soon", 1)
        response = await client.post(
            f"/v1/agents/{AGENT}/config",
            json={"yaml": broken, "comment": "typo"},
            headers=engineer,
        )
        assert response.status_code == 201, response.text
        assert response.json()["version"] == 2 and response.json()["published"] is True

        def has(result: str) -> Callable[[], bool]:
            return lambda: any(r["result"] == result for r in results(pg_url))

        await wait_for(has("rejected"), 60, "the rejection of version 2")
        (rejected,) = [r for r in results(pg_url) if r["result"] == "rejected"]
        assert rejected["version"] == 2 and rejected["running_version"] == 1
        paths = {p["path"]: p["line"] for p in rejected["problems"]}
        assert "equipment[0].ideal_cycle_tme" in paths, rejected
        assert "connections[0].poll_interval" in paths, rejected
        assert (
            paths["connections[0].poll_interval"]
            == broken.splitlines().index("    poll_interval: soon") + 1
        )

        # 3. press-2 moved to a PLC that does not answer: rolled back to version 1.
        before = counts_of(pg_url, "press-2")[0]
        dead = plant.config(
            [("press-1", "plc", 1), ("press-2", "plc-b", 2)],
            extra_connection=(
                f"  - id: plc-b\n    type: modbus\n    host: 127.0.0.1\n"
                f"    port: {plant.dead_port}\n    poll_interval: 200ms\n    timeout: 1s\n"
            ),
        )
        response = await client.post(
            f"/v1/agents/{AGENT}/config", json={"yaml": dead}, headers=engineer
        )
        assert response.status_code == 201 and response.json()["version"] == 3, response.text
        await wait_for(has("rolled_back"), 60, "the roll-back of version 3")
        (rolled,) = [r for r in results(pg_url) if r["result"] == "rolled_back"]
        assert rolled["version"] == 3 and rolled["running_version"] == 1
        assert "plc-b" in rolled["reason"], rolled
        # Version 1 runs again: press-2 is read from its PLC again.
        await wait_for(
            lambda: counts_of(pg_url, "press-2")[0] > before, 60, "press-2 counted again"
        )

        # 4. Forged, foreign and replayed messages: refused and reported.
        topic = config_topic(topic_prefix, SITE, AGENT)
        intruder = Ed25519PrivateKey.generate()
        forged = ConfigBody(agent_id=AGENT, site_id=SITE, version=9, serial=9,
                            digest=config_digest(v1), yaml=v1,
                            key_id=ed25519_key_id(intruder.public_key()))  # fmt: skip
        publish_raw(topic, sign_config(forged, intruder))
        kid, cloud_key = cloud_keys.current_ack
        foreign = ConfigBody(agent_id="edge-other", site_id=SITE, version=9, serial=9,
                             digest=config_digest(v1), yaml=v1, key_id=kid)  # fmt: skip
        publish_raw(topic, sign_config(foreign, cloud_key))
        old = store.Current(AGENT, SITE, 1, 1, False, v1, config_digest(v1), "add press-2")
        publish_raw(topic, signed_message(old, cloud_keys))  # version 1's publication again

        def refused() -> list[str]:
            return [r["reason"] for r in results(pg_url) if r["result"] == "refused"]

        await wait_for(lambda: len(refused()) >= 3, 60, "three refusals reported")
        reasons = " | ".join(refused())
        assert "unknown_key" in reasons and "wrong_agent" in reasons, reasons
        assert "replayed" in reasons, reasons

        # The fleet view: running version 1, desired 3 (rolled back by the agent), last result.
        response = await client.get(f"/v1/agents/{AGENT}", headers=engineer)
        assert response.status_code == 200, response.text
        config = response.json()["config"]
        assert config["running_version"] == 1 and config["desired_version"] == 3, config
        assert config["last_result"]["result"] == "refused"

        # 5. Killed in the middle of applying version 4: starts on version 1, says so.
        attempt = plant.state / "remote-config" / "attempt.json"
        response = await client.post(
            f"/v1/agents/{AGENT}/config",
            json={"yaml": v1 + "# same machines\n", "comment": "no change"},
            headers=engineer,
        )
        assert response.status_code == 201 and response.json()["version"] == 4

        def trying() -> bool:
            try:
                return bool(json.loads(attempt.read_bytes())["result"] == "trying")
            except (OSError, ValueError):
                return False

        await wait_for(trying, 60, "version 4 being applied")
        assert plant.process is not None
        plant.process.send_signal(signal.SIGKILL)
        plant.process.wait(10)
        before = counts_of(pg_url, "press-2")[0]
        plant.start()
        await wait_for(
            lambda: any(r["result"] == "rolled_back" and r.get("version") == 4
                        for r in results(pg_url)),
            60,
            "the interrupted apply reported",
        )  # fmt: skip
        interrupted = [r for r in results(pg_url) if r.get("version") == 4][-1]
        assert (
            interrupted["running_version"] == 1
            and "stopped while applying" in (interrupted["reason"])
        )
        # The stored version 1 runs (the local file has press-1 only): press-2 is counted.
        await wait_for(
            lambda: counts_of(pg_url, "press-2")[0] > before, 60, "press-2 after the restart"
        )
        assert json.loads(attempt.read_bytes())["result"] == "rolled_back"

        for press in plant.presses:
            press.frozen = True
            press.set_state("idle")
        frozen_at = datetime.now(UTC)
        # The agent reads the final counters and closes the bucket that holds them.
        await wait_counted(
            pg_url,
            {
                name: (press.truth.produced, press.truth.scrap)
                for name, press in zip(("press-1", "press-2"), plant.presses, strict=True)
            },
            frozen_at,
        )
        await plant.stop_drained()
    finally:
        await client.aclose()
        if plant.process is not None and plant.process.poll() is None:
            plant.process.kill()
        await plant.line.stop()

    assert plant.outbox_empty(), "every batch acked"
    # No part lost through the pushes, the roll-back and the kill.
    truths = {}
    for name, press in zip(("press-1", "press-2"), plant.presses, strict=True):
        truth = press.truth
        assert counts_of(pg_url, name) == (truth.produced, truth.scrap), plant.tail()
        truths[name] = Truth(produced=truth.produced, scrap=truth.scrap, reasons=REASONS)
    with api_client(pg_url, tmp_path / "views-keys") as api:
        views = await asyncio.to_thread(check_views, api, pg_url, truths=truths)
    compare_with_truth(views, truths)
