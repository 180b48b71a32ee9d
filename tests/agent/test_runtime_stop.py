"""The graceful stop of the pipeline when a stage does not end on cancellation: the stop goes
on without it, and what was sampled is still committed with its checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

import agent.runtime as runtime_module
from agent.config import load_config
from agent.engine_store import EngineStore
from agent.runtime import AgentRuntime
from buffer.outbox import Outbox
from connectors.connector import Emit
from sync.keys import AgentKeys, CloudKeyring
from tests.conftest import MQTT_HOST, MQTT_PORT, free_port, make_agent_keys

CONFIG = """
agent: {{id: edge-stop, site: plant-stop, state_dir: {state}, bucket_seconds: 5}}
connections:
  - {{id: plc, type: modbus, host: 127.0.0.1, port: {plc_port}, poll_interval: 200ms}}
mqtt: {{host: {mqtt_host}, port: {mqtt_port}, topic_prefix: "{prefix}"}}
uplink: {{flush_interval: 200ms, drain_timeout: 500ms}}
shifts: [{{name: all-day, start: "00:00", end: "00:00"}}]
equipment:
  - id: press-1
    connection: plc
    unit: 1
    ideal_cycle_time: 1s
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running}}}}
      total_count: {{address: "holding:1", type: uint32}}
"""


async def test_a_stage_that_ignores_cancellation_does_not_hold_up_the_stop(
    tmp_path: Path, cloud_keys: CloudKeyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime_module, "STAGE_STOP_TIMEOUT_S", 0.5)
    state = tmp_path / "state"
    config_path = tmp_path / "agent.yaml"
    config_path.write_text(
        CONFIG.format(
            state=state,
            plc_port=free_port(),  # nothing listens: the hub would only back off
            mqtt_host=MQTT_HOST,
            mqtt_port=MQTT_PORT,
            prefix=f"stop/{tmp_path.name[-12:]}/",
        ),
        encoding="utf-8",
    )
    config = load_config(config_path)
    make_agent_keys(config.keys_dir, cloud_keys)
    runtime = AgentRuntime(config, AgentKeys.load(config.keys_dir))
    released = asyncio.Event()
    cancels = 0

    async def stubborn(emit: Emit) -> None:
        # A driver that loses its cancellation: the loop carries on as if nothing happened.
        nonlocal cancels
        while not released.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                cancels += 1

    runtime.hubs[0].run = stubborn  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.run(stop))
    try:
        while not runtime.tasks:  # noqa: ASYNC110 (the runtime publishes its stages by list)
            await asyncio.sleep(0.02)
        asked = time.monotonic()
        stop.set()
        await asyncio.wait({task}, timeout=30)
        assert task.done(), "the stop waited for the stage that ignores cancellation"
        task.result()
    finally:
        released.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert cancels >= 1
    # The stop's own flush ran after the stage was left behind, and committed the checkpoint.
    assert runtime.last_flush is not None and runtime.last_flush > asked
    outbox = Outbox(config.outbox_path)
    saved, _ = EngineStore(outbox, heartbeat_s=10, snapshot_s=300).load()
    outbox.close()
    assert "press-1" in saved
