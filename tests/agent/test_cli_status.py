"""`edge-agent status` and `buffer stats` against a running agent that polls a real pymodbus
press line: a sample rate that is not 0 while samples flow, machines in natural order, a
summary for many machines, no empty header rows, human units, and `--json`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

import httpx

from agent.status import parse_metrics
from connectors.modbus.simulator import Press, PressLine
from sync.keys import CloudKeyring
from tests.conftest import MQTT_HOST, MQTT_PORT, free_port, make_agent_keys

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")
MACHINES = 22  # above the 20 from which `status` summarises
NOT_RUNNING = {3: "fault", 12: "idle", 21: "setup"}
POLL_S = 0.2
SIGNALS_PER_MACHINE = 2

CONFIG = """
agent: {{id: edge-status, site: plant-status, state_dir: {state}}}
connections:
  - {{id: plc, type: modbus, host: 127.0.0.1, port: {plc_port}, poll_interval: 200ms,
     timeout: 1s}}
mqtt: {{host: {mqtt_host}, port: {mqtt_port}, topic_prefix: "{prefix}"}}
health: {{port: {health_port}}}
equipment:
{equipment}
"""
PRESS = """  - id: press-{n}
    connection: plc
    unit: {n}
    ideal_cycle_time: 1s
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running, 2: fault, 3: setup}}}}
      total_count: {{address: "holding:1", type: uint32}}
"""


def metrics(port: int) -> dict[str, object]:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    snap = parse_metrics(text)
    states = {
        lab["equipment"]: lab["state"]
        for lab, v in snap.series.get("edge_agent_equipment_state", [])
        if v == 1
    }
    return {"samples": snap.values.get("edge_agent_samples_total", 0), "states": states}


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGE_AGENT, *args], capture_output=True, text=True, timeout=60, check=False
    )


def start_agent(config: Path, log: BinaryIO) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [EDGE_AGENT, "run", "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@asynccontextmanager
async def running_agent(
    tmp_path: Path, cloud_keys: CloudKeyring, topic_prefix: str
) -> AsyncIterator[tuple[Path, int]]:
    presses = []
    for n in range(1, MACHINES + 1):
        press = Press(seed=n)
        press.frozen = True
        press.set_state(NOT_RUNNING.get(n, "running"))
        presses.append(press)
    line = PressLine(presses, port=free_port())
    await line.start()
    state = tmp_path / "agent"
    make_agent_keys(state / "keys", cloud_keys)
    health_port = free_port()
    config = tmp_path / "agent.yaml"
    equipment = "".join(PRESS.format(n=n) for n in range(1, MACHINES + 1))
    config.write_text(
        CONFIG.format(
            state=state,
            plc_port=line.port,
            mqtt_host=MQTT_HOST,
            mqtt_port=MQTT_PORT,
            prefix=topic_prefix,
            health_port=health_port,
            equipment=equipment,
        ),
        encoding="utf-8",
    )
    log = (tmp_path / "agent.log").open("wb")
    agent = start_agent(config, log)
    try:
        for _ in range(300):  # until every machine's state is known
            got = await asyncio.to_thread(metrics, health_port)
            states = got.get("states") or {}
            if len(states) == MACHINES and "unknown" not in states.values():  # type: ignore[operator]
                break
            assert agent.poll() is None, (tmp_path / "agent.log").read_text()
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the agent did not report every machine's state")
        yield config, health_port
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(agent.wait, 30)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait(10)
            log.close()
            await line.stop()


async def test_status_rates_order_summary_and_json(
    tmp_path: Path, cloud_keys: CloudKeyring, topic_prefix: str
) -> None:
    async with running_agent(tmp_path, cloud_keys, topic_prefix) as (config, _port):
        # Read-only commands: side by side, each with its own one-second rate window.
        table, every, as_json, buffer = await asyncio.gather(
            asyncio.to_thread(edge_agent, "status", "-c", str(config)),
            asyncio.to_thread(edge_agent, "status", "-c", str(config), "--all"),
            asyncio.to_thread(edge_agent, "status", "-c", str(config), "--json"),
            asyncio.to_thread(edge_agent, "buffer", "stats", "-c", str(config)),
        )
    for done in (table, every, as_json, buffer):
        assert done.returncode == 0, done.stdout + done.stderr

    # The rate is measured between two readings: while samples flow it is not 0, and it
    # cannot exceed what the configured polling produces (with room for the window's edges).
    most = MACHINES * SIGNALS_PER_MACHINE / POLL_S
    match = re.search(r"\| samples +\| ([0-9.]+)/s, ([0-9 ]+) total", table.stdout)
    assert match, table.stdout
    assert 0 < float(match.group(1)) < 2 * most, table.stdout
    data = json.loads(as_json.stdout)
    assert 0 < data["samples_per_s"] < 2 * most
    assert data["rate_window_s"] >= 1.0

    # no header row of empty cells in the name/value tables
    assert not re.search(r"^\|( +\|)+$", table.stdout, re.MULTILINE), table.stdout

    # Many machines: a count per state and only those not running, in natural order.
    assert (
        f"Equipment: {MACHINES} machines, 19 running, 1 fault, 1 idle, 1 setup; "
        "the 3 not running (all: --all)"
    ) in table.stdout
    listed = re.findall(r"^\| (press-\d+) +\| (\w+)", table.stdout, re.MULTILINE)
    assert listed == [("press-3", "fault"), ("press-12", "idle"), ("press-21", "setup")]

    everyone = re.findall(r"^\| (press-\d+) ", every.stdout, re.MULTILINE)
    assert everyone == [f"press-{n}" for n in range(1, MACHINES + 1)]
    assert [e["id"] for e in data["equipment"]] == everyone
    assert {e["id"]: e["state"] for e in data["equipment"]}["press-12"] == "idle"

    # Sizes in human units: the quota as status shows it, no raw byte counts, no None.
    assert "2.0 GiB" in buffer.stdout and "2.0 GiB" in table.stdout
    assert "2147483648" not in buffer.stdout and "None" not in buffer.stdout
    assert re.search(r"\| quota +\| 2\.0 GiB +\|", buffer.stdout), buffer.stdout


def test_buffer_stats_before_the_agent_ran(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    state = tmp_path / "never-ran"
    config.write_text(
        CONFIG.format(
            state=state,
            plc_port=502,
            mqtt_host=MQTT_HOST,
            mqtt_port=MQTT_PORT,
            prefix="x/",
            health_port=free_port(),
            equipment=PRESS.format(n=1),
        ),
        encoding="utf-8",
    )
    done = edge_agent("buffer", "stats", "-c", str(config))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"edge-agent: no outbox at {state}/outbox.db yet (the agent has not run with this "
        "configuration)"
    )
    assert not state.exists()  # looking did not create it
    done = edge_agent("status", "-c", str(config))
    assert done.returncode == 1
    assert "is the agent running?" in done.stderr
