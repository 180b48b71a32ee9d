"""The Sparkplug B edge node alone, on a Mosquitto of its own, over a real engine fed with
samples: seq wraps 0-255 without a gap, the primary host's STATE is honoured (older STATE
ignored, offline ends the session with NDEATH, a new session gets the next bdSeq), and an
absent plant broker is retried without ever raising into the agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import parse_config
from agent.floor import sparkplug_b_pb2 as pb
from agent.floor.live import LiveSource
from agent.floor.sparkplug import SparkplugEdgeNode
from connectors.sample import Sample
from oee.engine import PlantEngine
from tests.conftest import free_port
from tests.faults.harness import Mosquitto, wait_for

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")

CONFIG = """
agent: {{id: edge-sp, site: plant-sp, timezone: UTC, bucket_seconds: 1}}
shifts: [{{name: all-day, start: "00:00", end: "00:00"}}]
plant_mqtt:
  port: {port}
  publish_interval: {interval}
  reconnect_min: 100ms
  reconnect_max: 500ms
  sparkplug: {{group_id: g1, edge_node_id: n1 {host}}}
  publish:
    press-1: [State, Reason, Shift/Produced, Shift/OEE]
equipment:
  - id: press-1
    ideal_cycle_time: 1s
    signals:
      state: {{map: {{0: idle, 1: running, 2: fault}}}}
      total_count: {{}}
      reason: {{map: {{1: jam, 2: no material}}}}
"""


class Recorder:
    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *_: c.subscribe("spBv1.0/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def kinds(self) -> list[str]:
        with self.lock:
            return [t.split("/")[2] for t, _ in self.messages if not t.startswith("spBv1.0/STATE")]

    def decoded(self, kind: str) -> list[Any]:
        out = []
        with self.lock:
            for topic, raw in self.messages:
                if topic.split("/")[2] == kind:
                    payload = pb.Payload()
                    payload.ParseFromString(raw)
                    out.append(payload)
        return out

    def state(self, online: bool, ts: int) -> None:
        body = json.dumps({"online": online, "timestamp": ts}).encode()
        self.client.publish("spBv1.0/STATE/scada", body, qos=1, retain=True).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_node(port: int, *, host: bool = False, interval: str = "20ms") -> SparkplugEdgeNode:
    config = parse_config(
        CONFIG.format(
            port=port, interval=interval, host=", primary_host_id: scada" if host else ""
        ),
        replay=True,
    )
    assert config.plant_mqtt is not None
    engine = PlantEngine(
        config.oee_specs(), config.calendar(), agent_id="edge-sp", site_id="plant-sp"
    )
    engine.start(datetime.now(UTC))
    source = LiveSource(engine, {"press-1": None}, {"press-1": None}, dict, lambda: 0)
    return SparkplugEdgeNode(config.plant_mqtt, source, agent="edge-sp", site="plant-sp")


@contextlib.asynccontextmanager
async def running(node: SparkplugEdgeNode) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(node.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def feed(node: SparkplugEdgeNode, reason: int) -> None:
    """A fault with `reason`, applied at once (the engine applies a scan at the next tick)."""
    now = datetime.now(UTC)
    engine = node.source.engine
    for signal, value in (("state", 2), ("reason", reason)):
        engine.feed(Sample("press-1", signal, value, now))
    engine.tick(now + timedelta(microseconds=1))


async def until(predicate: Callable[[], bool], what: str, limit_s: float = 20) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    plant = Mosquitto(tmp_path / "broker", persistence=False)
    plant.start()
    yield plant
    plant.kill()


async def test_seq_wraps_at_255_without_a_gap(broker: Mosquitto) -> None:
    recorder = Recorder(broker.port)
    node = make_node(broker.port)
    try:
        async with running(node):
            await wait_for(lambda: "DBIRTH" in recorder.kinds(), 20, "births")
            for i in range(300):  # every reason change is a DDATA
                feed(node, 1 + i % 2)
                await until(
                    lambda n=i + 1: recorder.kinds().count("DDATA") >= n,  # type: ignore[misc]
                    f"DDATA {i + 1}",
                )
        # A graceful stop publishes the NDEATH of the session (its will is not sent then).
        await until(lambda: "NDEATH" in recorder.kinds(), "NDEATH on stop")
        assert recorder.decoded("NDEATH")[0].metrics[0].long_value == 0
    finally:
        recorder.close()
    assert [p.seq for p in recorder.decoded("NBIRTH")] == [0]
    births = recorder.decoded("DBIRTH")
    data = recorder.decoded("DDATA")
    ordered = [births[0].seq, *[d.seq for d in data]]
    assert ordered == [(1 + i) % 256 for i in range(len(ordered))]
    assert len(ordered) > 256 and 0 in ordered[1:], "the seq must have wrapped"
    # Only the listed metrics are published, each with its alias.
    assert sorted(m.name for m in births[0].metrics) == sorted(
        ["State", "Reason", "Shift/Produced", "Shift/OEE"]
    )
    aliases = {m.alias for m in births[0].metrics}
    assert len(aliases) == 4
    assert all(m.alias in aliases and not m.name for d in data for m in d.metrics)
    reason = next(m.alias for m in births[0].metrics if m.name == "Reason")
    assert [m.string_value for d in data[1:5] for m in d.metrics if m.alias == reason] == [
        "no material",
        "jam",
        "no material",
        "jam",
    ]


async def test_primary_host_state_is_honoured(broker: Mosquitto) -> None:
    recorder = Recorder(broker.port)
    node = make_node(broker.port, host=True, interval="50ms")
    t0 = int(time.time() * 1000)
    try:
        async with running(node):
            await wait_for(lambda: node.stats.connected, 20, "connected")
            await asyncio.sleep(0.5)
            assert "NBIRTH" not in recorder.kinds(), "born before the primary host was online"
            recorder.state(True, t0)
            await wait_for(lambda: "NBIRTH" in recorder.kinds(), 20, "NBIRTH after STATE online")
            first_bdseq = recorder.decoded("NBIRTH")[0].metrics[0].long_value
            # An offline STATE older than the online one is ignored ...
            recorder.state(False, t0 - 1000)
            await asyncio.sleep(0.5)
            assert "NDEATH" not in recorder.kinds()
            # ... a newer one ends the session with an NDEATH of the session's bdSeq.
            recorder.state(False, t0 + 1000)
            await wait_for(lambda: "NDEATH" in recorder.kinds(), 20, "NDEATH on host offline")
            death = recorder.decoded("NDEATH")[0]
            assert death.metrics[0].name == "bdSeq"
            assert death.metrics[0].long_value == first_bdseq
            await asyncio.sleep(1.0)
            assert recorder.kinds().count("NBIRTH") == 1, "reborn while the host is offline"
            recorder.state(True, t0 + 2000)
            await wait_for(lambda: recorder.kinds().count("NBIRTH") == 2, 20, "second NBIRTH")
            second = recorder.decoded("NBIRTH")[1]
            assert second.seq == 0
            assert second.metrics[0].long_value == (first_bdseq + 1) % 256
    finally:
        recorder.close()


async def test_an_absent_plant_broker_is_retried_and_never_raises() -> None:
    node = make_node(free_port())
    async with running(node) as task:
        start = time.monotonic()
        while time.monotonic() - start < 2:
            await asyncio.sleep(0.1)
            assert not task.done(), task
        assert node.stats.connects == 0
        assert not node.stats.connected


def test_nothing_unlisted_and_no_unknown_metric() -> None:
    from agent.config import ConfigError

    text = CONFIG.format(port=1883, interval="1s", host="")
    with pytest.raises(ConfigError, match=r"plant_mqtt\.publish.*unknown metric"):
        parse_config(text.replace("Shift/OEE]", "Shift/OEE, Shift/Bogus]"), replay=True)
    with pytest.raises(ConfigError, match="no equipment with id 'press-9'"):
        parse_config(text.replace("press-1: [", "press-9: ["), replay=True)
