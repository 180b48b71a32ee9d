"""The dashboard's agent list shows each agent's configuration: the version it runs, the one
the cloud wants it to run and its last result, marked when they differ or the last result is
a rejection. Headless Chromium against a live `cloud-api` HTTP server; the versions are pushed
through `POST /v1/agents/{id}/config` (stored, signed, retained on the machine's Mosquitto),
the agents' `RemoteConfig` takes the retained messages and its `config_result` events reach
the cloud through the real ingest path."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from psycopg_pool import ConnectionPool

from agent.config import parse_config
from agent.remote_config import RemoteConfig
from agent.service import check_config
from cloud_api.api.app import create_app
from cloud_api.config import CloudSettings, DatabaseSettings, MqttSettings
from oee.events import Event
from sync.config_message import config_topic
from sync.keys import CloudKeyring
from tests.cloud_api.ingestion import Agent, enrolled_agent
from tests.cloud_api.test_fleetconfig import retained
from tests.conftest import MQTT_HOST, MQTT_PORT, bearer, free_port
from tests.ops.chromium import open_page

SITE = "plant-fleet"
CONFIG = """agent:
  id: {agent}
  site: {site}
  timezone: UTC
  state_dir: {state}
config:
  source: cloud
connections:
  - id: plc
    type: modbus
    host: 127.0.0.1
    port: 5020
equipment:
  - id: press-1
    connection: plc
    unit: 1
    ideal_cycle_time: 2s
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running}}}}
      total_count: {{address: "holding:1", type: uint32}}
"""


@dataclass
class Pipeline:
    """What RemoteConfig hands its reports to: the events a running pipeline would commit."""

    pending: list[Event] = field(default_factory=list)


@dataclass
class Box:
    """One edge box: its local file, its RemoteConfig and its way to the cloud's ingest."""

    agent: Agent
    local: str
    remote: RemoteConfig
    pipeline: Pipeline

    def take(self, topic_prefix: str) -> None:
        """The retained configuration message arrives; a valid one is applied as the service
        does once its settle check passed. Its report goes to the cloud."""
        payload = retained(config_topic(topic_prefix, self.agent.site_id, self.agent.agent_id))
        self.remote.receive(payload)
        candidate = self.remote.take()
        if candidate is not None:
            self.remote.begin(candidate)
            self.remote.applied(candidate)
        assert self.pipeline.pending, "no config_result reported"
        self.agent.send(self.pipeline.pending)
        self.pipeline.pending.clear()


def box(
    tmp_path: Path, pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, agent_id: str
) -> Box:
    state = tmp_path / agent_id
    agent = enrolled_agent(
        pg_url, pool, cloud_keys, state / "keys", agent_id=agent_id, site_id=SITE
    )
    local = CONFIG.format(agent=agent_id, site=SITE, state=state)
    config = parse_config(local)
    remote = RemoteConfig(config, agent.keys, check=check_config)
    assert remote.startup() is None  # nothing pushed yet: the local file runs
    pipeline = Pipeline()
    remote.attach(pipeline)
    return Box(agent, local, remote, pipeline)


@pytest.fixture
def live_api(
    pg_url: str, pool: ConnectionPool, tmp_path: Path, topic_prefix: str
) -> Iterator[tuple[str, Path]]:
    settings = CloudSettings(
        database=DatabaseSettings(url=pg_url),
        mqtt=MqttSettings(host=MQTT_HOST, port=MQTT_PORT, topic_prefix=topic_prefix),
        keys_dir=tmp_path / "cloud-keys",
    )
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
        yield f"http://127.0.0.1:{port}", settings.keys_dir
    finally:
        server.should_exit = True
        thread.join(30)


async def test_agent_list_shows_running_and_desired_versions_and_last_result(
    tmp_path: Path,
    pg_url: str,
    pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    topic_prefix: str,
    live_api: tuple[str, Path],
) -> None:
    base, keys_dir = live_api
    engineer = bearer(keys_dir, role="engineer", sites=[SITE])
    steady = box(tmp_path, pg_url, pool, cloud_keys, "edge-fleet-1")
    failing = box(tmp_path, pg_url, pool, cloud_keys, "edge-fleet-2")
    local_only = box(tmp_path, pg_url, pool, cloud_keys, "edge-fleet-3")

    async with httpx.AsyncClient(base_url=base, headers=engineer, timeout=30) as client:

        async def push(b: Box, yaml: str, comment: str) -> int:
            response = await client.post(
                f"/v1/agents/{b.agent.agent_id}/config", json={"yaml": yaml, "comment": comment}
            )
            assert response.status_code == 201, response.text
            assert response.json()["published"] is True
            await asyncio.to_thread(b.take, topic_prefix)
            return int(response.json()["version"])

        # edge-fleet-1 runs what the cloud wants; edge-fleet-2 refuses a version with a typo.
        for b in (steady, failing):
            assert await push(b, b.local + "# pushed\n", "first") == 1
        broken = failing.local.replace("ideal_cycle_time: 2s", "ideal_cycle_tme: 2s")
        assert await push(failing, broken, "typo") == 2
        fleet = {
            a["agent_id"]: a["config"]
            for a in (await client.get("/v1/agents", params={"site": SITE})).json()["agents"]
        }
    assert (fleet["edge-fleet-1"]["running_version"], fleet["edge-fleet-1"]["desired_version"]) == (
        1,
        1,
    )
    assert (fleet["edge-fleet-2"]["running_version"], fleet["edge-fleet-2"]["desired_version"]) == (
        1,
        2,
    )
    assert fleet["edge-fleet-2"]["last_result"]["result"] == "rejected"
    problem = fleet["edge-fleet-2"]["last_result"]["problems"][0]
    assert problem["path"] == "equipment[0].ideal_cycle_tme"
    assert local_only.agent.agent_id in fleet  # enrolled, never pushed to

    token = engineer["Authorization"].removeprefix("Bearer ")
    async with open_page(tmp_path / "chromium") as page:
        await page.call(
            "Page.addScriptToEvaluateOnNewDocument",
            source=f"sessionStorage.setItem('edge-gateway-token', {token!r});",
        )
        await page.call("Page.navigate", url=f"{base}/?site={SITE}")
        await page.wait_for("document.body && document.body.dataset.state === 'ready'")
        rows: dict[str, dict[str, Any]] = await page.wait_for(
            "document.querySelectorAll('#fleet tbody tr').length === 3 && "
            "Object.fromEntries([...document.querySelectorAll('#fleet tbody tr')].map(r => "
            "[r.dataset.agent, {config: r.cells[r.cells.length - 1].innerText, "
            "header: document.querySelector('#fleet thead tr').lastElementChild.textContent, "
            "marks: r.dataset.config, "
            "badge: (r.cells[r.cells.length - 1].querySelector('.badge') || {}).className || '', "
            "why: (r.cells[r.cells.length - 1].querySelector('.badge') || {}).title || '', "
            "highlighted: !!r.cells[r.cells.length - 1].querySelector('.config-mark')}]))"
        )
        await page.screenshot(tmp_path / "fleet.png")
        errors = list(page.errors)
    assert errors == [], errors

    ok, bad, untouched = rows["edge-fleet-1"], rows["edge-fleet-2"], rows["edge-fleet-3"]
    assert ok["header"] == "Configuration"
    assert ok["config"] == "runs v1, desired v1 applied v1", ok
    assert (ok["marks"], ok["highlighted"], ok["badge"]) == ("", False, "badge ok"), ok
    assert bad["config"] == "runs v1, desired v2 rejected v2", bad
    assert bad["marks"] == "behind rejected" and bad["highlighted"], bad
    assert bad["badge"] == "badge lost", bad
    line = broken.splitlines().index("    ideal_cycle_tme: 2s") + 1
    assert f"equipment[0].ideal_cycle_tme (line {line})" in bad["why"], bad
    assert (untouched["config"], untouched["marks"]) == ("\u2013", ""), untouched
