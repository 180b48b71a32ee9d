"""A counter without `type:` on an OPC UA node counts at the width of the node's DataType:
the agent against a real asyncua server whose UInt32 counter passes 65535."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent.config import load_config
from agent.runtime import AgentRuntime
from buffer.outbox import Outbox
from connectors.modbus.simulator import Press
from connectors.opcua.simulator import OpcUaPressServer
from oee.events import AgentEvent, CountEvent, Event, load_events
from sync.envelope import open_envelope
from sync.keys import AgentKeys, CloudKeyring
from tests.conftest import MQTT_HOST, MQTT_PORT, free_port, make_agent_keys
from tests.connectors.harness import wait_until

CONFIG = """
agent: {{id: edge-width, site: plant-width, state_dir: {state}}}
connections:
  - {{id: plc, type: opcua, url: "{url}", mode: {mode}, poll_interval: 100ms,
      publishing_interval: 100ms, sampling_interval: 50ms, timeout: 3s}}
mqtt: {{host: {mqtt_host}, port: {mqtt_port}, topic_prefix: "{prefix}"}}
uplink: {{flush_interval: 200ms, drain_timeout: 200ms}}
shifts: [{{name: all-day, start: "00:00", end: "00:00"}}]
equipment:
  - id: press-1
    connection: plc
    ideal_cycle_time: 1s
    signals:
      state: {{node: "nsu=urn:factory-edge-gateway:press-sim;s=Press1.State",
               map: {{0: idle, 1: running}}}}
      total_count: {{node: "nsu=urn:factory-edge-gateway:press-sim;s=Press1.TotalCount"}}
"""


@pytest.fixture
async def plc() -> AsyncIterator[OpcUaPressServer]:
    press = Press(seed=1, width=32, start_count=65_000)  # TotalCount is a UInt32 node
    press.frozen = True
    press.set_state("running")
    server = OpcUaPressServer([press], port=free_port())
    await server.start(tick=0.05)
    yield server
    await server.stop()


def events_in(runtime: AgentRuntime, cloud_keys: CloudKeyring) -> list[Event]:
    signer = runtime.keys.signing_key.public_key()
    outbox = Outbox(runtime.config.outbox_path)
    try:
        batches = outbox.pending(10_000)
    finally:
        outbox.close()
    return [
        event
        for batch in batches
        for event in load_events(
            open_envelope(
                batch.envelope,
                verify_key_for=lambda _agent, _kid: signer,
                decrypt_key_for=cloud_keys.decrypt_key_for,
            ).plaintext
        )
    ]


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_uint32_counter_without_type_counts_past_65535(
    plc: OpcUaPressServer, tmp_path: Path, cloud_keys: CloudKeyring, mode: str
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        CONFIG.format(
            state=tmp_path / "state",
            url=plc.url,
            mode=mode,
            mqtt_host=MQTT_HOST,
            mqtt_port=MQTT_PORT,
            prefix=f"width/{tmp_path.name[-12:]}/",
        ),
        encoding="utf-8",
    )
    config = load_config(path)
    make_agent_keys(config.keys_dir, cloud_keys)
    runtime = AgentRuntime(config, AgentKeys.load(config.keys_dir))
    engine = runtime.engine.engines["press-1"]

    def read(value: int) -> Callable[[], bool]:
        return lambda: engine.seen.get("total_count", (0, []))[1] == [value]

    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    try:
        await wait_until(read(65_000), "the first reading")
        # 65_530 -> 90_000 is one step of 24_470 parts across 65535: at 16 bits the
        # engine would see 65_530 -> 24_464 and count a reset
        for value in (65_530, 90_000, 90_007):
            plc.presses[0].total_raw = value
            await wait_until(read(value), f"the reading {value}")
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
    task.result()
    events = events_in(runtime, cloud_keys)
    assert sum(e.produced for e in events if isinstance(e, CountEvent)) == 90_007 - 65_000
    codes = {e.code for e in events if isinstance(e, AgentEvent)}
    assert not {"counter_reset", "counter_wrap", "counter_quarantined"} & codes
    assert engine.spec.counters["total_count"].width == 32
