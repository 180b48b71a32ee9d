"""Broken plant-floor outputs never reach the agent's own job: with its plant broker killed
in the middle of the run and its OPC UA server's port taken by another program, the real
`edge-agent run` keeps polling, counting and shipping; every part arrives in the cloud and
the cross-view invariant checker passes."""

from __future__ import annotations

import asyncio
import shutil
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from cloud_api.ingest.worker import IngestWorker
from connectors.modbus.simulator import Press, PressLine
from sync.keys import CloudKeyring
from tests.conformance.harness import finish, new_agent, wait_for_states
from tests.conftest import free_port
from tests.faults.harness import Mosquitto, wait_for
from tests.invariants import Truth

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")

BODY = """
connections:
  - id: plc
    type: modbus
    host: 127.0.0.1
    port: {plc_port}
    poll_interval: 200ms
    timeout: 1s
plant_mqtt:
  port: {plant_port}
  publish_interval: 200ms
  reconnect_min: 200ms
  reconnect_max: 1s
  publish:
    press-1: all
opcua_server:
  endpoint: opc.tcp://127.0.0.1:{opcua_port}
  security: [None]
  anonymous: true
  update_interval: 200ms
equipment:
  - id: press-1
    line: line-1
    connection: plc
    unit: 1
    ideal_cycle_time: 250ms
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running, 2: fault, 3: setup}}}}
      total_count: {{address: "holding:1", type: uint32}}
      scrap_count: {{address: "holding:3", type: uint32}}
      reason: {{address: "holding:5", map: {{1: no material, 2: tool change, 3: jam}}}}
"""


async def test_broken_outputs_do_not_touch_counting_or_shipping(
    tmp_path: Path,
    pg_url: str,
    cloud_keys: CloudKeyring,
    topic_prefix: str,
    ingest: IngestWorker,
) -> None:
    plant = Mosquitto(tmp_path / "plant-broker", persistence=False)
    plant.start()
    opcua_port = free_port()
    squatter = socket.socket()  # another program holds the OPC UA server's port
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", opcua_port))
    squatter.listen()
    press = Press(seed=11, time_scale=0.15, cycle_time=0.25)
    press.frozen = True  # until the agent has its counter baseline
    press.set_state("idle")
    plc_port = free_port()
    line = PressLine([press], port=plc_port)
    await line.start()
    agent = new_agent(
        tmp_path / "agent",
        cloud_keys,
        pg_url,
        topic_prefix,
        BODY.format(
            plc_port=plc_port,
            plant_port=plant.port,
            opcua_port=opcua_port,
        ),
    )
    agent.start()
    try:
        await wait_for(lambda: "born" in agent.log_tail(200_000), 60, "the edge node's births")
        await wait_for_states(pg_url, ["press-1"], "idle")
        press.frozen = False
        await asyncio.sleep(2)
        plant.kill()  # the plant broker dies; the agent keeps running
        await asyncio.sleep(4)
        press.frozen = True
        press.set_state("idle")
        frozen_at = datetime.now(UTC)
        await wait_for(
            lambda: all(
                line in agent.log_tail(200_000)
                for line in ("plant broker lost", "OPC UA server failed; restarting")
            ),
            60,
            "the agent to log both outputs' failures",
        )
        assert agent.running(), agent.log_tail(200_000)[-3000:]
        # The local metrics say so too.
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{agent.health_port}/metrics")).text
        metrics = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line.startswith("edge_agent_plant_")
        }
        assert metrics["edge_agent_plant_broker_connected"] == 0
        assert metrics["edge_agent_plant_messages_published_total"] > 0
        assert metrics["edge_agent_plant_updates_dropped_total"] >= 0
        truth = press.truth
        assert truth.produced > 0
        truths = {
            "press-1": Truth(
                produced=truth.produced,
                scrap=truth.scrap,
                reasons={"fault": frozenset({"jam"}), "idle": frozenset({"no material", None})},
            )
        }
        await finish(
            "broken plant outputs",
            agent,
            pg_url,
            tmp_path,
            truths,
            frozen_at + timedelta(seconds=1),
            tolerance_s=1.0,
        )
    finally:
        squatter.close()
        if agent.running():
            await asyncio.to_thread(agent.stop)
        plant.kill()
        await line.stop()
