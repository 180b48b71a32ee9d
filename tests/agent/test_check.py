"""`edge-agent check` against a real asyncua server: the width each counter is counted at,
and an early end when the connection itself fails."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from connectors.modbus.simulator import Press
from connectors.opcua.simulator import OpcUaPressServer
from tests.conftest import free_port

NS = "nsu=urn:factory-edge-gateway:press-sim;s=Press1"
CONFIG = """
agent: {{id: edge-check, site: plant-check, state_dir: {state}}}
connections:
  - {{id: plc, type: opcua, url: "{url}", timeout: 1s}}
equipment:
  - id: press-1
    connection: plc
    ideal_cycle_time: 1s
    signals:
      state: {{node: "{ns}.State", map: {{0: idle, 1: running}}}}
      total_count: {{node: "{ns}.TotalCount"}}
      scrap_count: {{node: "{ns}.ScrapCount", type: uint16}}
"""


def write_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(CONFIG.format(state=tmp_path / "state", url=url, ns=NS), encoding="utf-8")
    return path


async def test_check_prints_the_width_of_each_counter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    press = Press(seed=1, width=32, start_count=70_000)  # UInt32 nodes
    press.frozen = True
    sim = OpcUaPressServer([press], port=free_port())
    await sim.start()
    try:
        # check runs its own event loop: give it a thread so the server keeps answering
        config = write_config(tmp_path, sim.url)
        code = await asyncio.to_thread(main, ["check", "-c", str(config)])
    finally:
        await sim.stop()
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    total = lines.index(next(line for line in lines if "total_count" in line))
    assert "70000" in lines[total]
    assert "counted as 32-bit unsigned (the PLC declares uint32)" in lines[total + 1]
    scrap = lines.index(next(line for line in lines if "scrap_count" in line))
    assert "counted as 16-bit unsigned (type: uint16)" in lines[scrap + 1]


def test_check_ends_with_the_connection_error_not_at_its_time_limit(tmp_path: Path) -> None:
    url = f"opc.tcp://127.0.0.1:{free_port()}"  # nothing listens there
    config = write_config(tmp_path, url)
    # a limit of an hour: only an early end finishes within the guard below
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check", "-c", str(config), "--timeout", "3600"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"state          FAIL  cannot connect to {url}" in done.stdout
    assert "0 of 3 signal(s) read" in done.stdout
