"""`edge-agent check` against real PLCs (a pymodbus press line, a PLC that accepts and never
answers): a clean table on stdout (states by name, each failure once, in plain words, no log
line), progress on stderr while a PLC is silent, and `--json` for scripts."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.check import Progress, check_config
from agent.config import parse_config
from connectors.modbus.simulator import Press, PressLine
from tests.conftest import free_port

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")

CONFIG = """
agent: {{id: edge-check, site: plant-check, state_dir: {state}}}
connections:
  - {{id: plc, type: modbus, host: 127.0.0.1, port: {plc_port}, timeout: 1s}}
  - {{id: line-2-plc, type: opcua, url: "opc.tcp://127.0.0.1:{silent_port}", timeout: 4s}}
equipment:
  - id: press-1
    connection: plc
    unit: 1
    ideal_cycle_time: 1s
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running, 2: fault, 3: setup}}}}
      total_count: {{address: "holding:1", type: uint32}}
      reason: {{address: "holding:5", map: {{1: no material, 2: tool change, 3: jam}}}}
  - id: press-9
    connection: plc
    unit: 9
    ideal_cycle_time: 1s
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running}}}}
      total_count: {{address: "holding:1", type: uint32}}
  - id: filler-1
    connection: line-2-plc
    ideal_cycle_time: 1s
    signals:
      state: {{node: "ns=2;s=State", map: {{0: idle, 1: running}}}}
      total_count: {{node: "ns=2;s=Count", type: uint32}}
"""


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A PLC that accepts the connection and never answers."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(1024):
            pass
    writer.close()


@contextlib.asynccontextmanager
async def plant(tmp_path: Path) -> AsyncIterator[Path]:
    press = Press(seed=1, start_count=1234)
    press.frozen = True
    press.set_state("fault", reason=3)
    line = PressLine([press], port=free_port())  # unit 1 only: unit 9 is not served
    await line.start()
    silent = await asyncio.start_server(_silent, "127.0.0.1", 0)
    silent_port = silent.sockets[0].getsockname()[1]
    config = tmp_path / "agent.yaml"
    config.write_text(
        CONFIG.format(state=tmp_path / "state", plc_port=line.port, silent_port=silent_port),
        encoding="utf-8",
    )
    try:
        yield config
    finally:
        silent.close()
        await line.stop()


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    # not a terminal: stdout and stderr are pipes
    return subprocess.run(
        [EDGE_AGENT, "check", *args], capture_output=True, text=True, timeout=120, check=False
    )


async def test_check_prints_a_clean_table_and_progress_on_stderr(tmp_path: Path) -> None:
    async with plant(tmp_path) as config:
        done = await asyncio.to_thread(run_check, "-c", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        f"{config}: configuration ok (3 equipment, 2 connection(s))",
        "press-1 (connection plc, unit 1):",
        "  state          ok    fault (code 2)",
        "  total_count    ok    1234",
        "                       counted as 32-bit unsigned (type: uint32)",
        "  reason         ok    jam (code 3)",
        "press-9 (connection plc, unit 9):",
        "  state          FAIL  unit 9: the device reports a failure (Modbus exception 4; "
        "a gateway says so for a unit id it does not serve)",
        "  total_count    FAIL  (as above)",
        "                       counted as 32-bit unsigned (type: uint32)",
        "filler-1 (connection line-2-plc):",
        "  state          FAIL  no answer from opc.tcp://127.0.0.1:"
        + config.read_text().split("opc.tcp://127.0.0.1:")[1].split('"')[0]
        + " within 4s",
        "  total_count    FAIL  (as above)",
        "                       counted as 32-bit unsigned (type: uint32)",
        "3 of 7 signal(s) read",
    ]
    # While the silent PLC did not answer: one line for it. The PLC that answers does so at
    # once and gets none, unless a loaded machine held its answer past 2 s (then its lines,
    # one every 2 s while it is late, are the same kind of line, and the table above shows
    # it answered).
    lines = done.stderr.splitlines()
    assert "waiting for line-2-plc (no answer after 2 s; gives up after 14 s)" in lines
    late = [line for line in lines if not line.startswith("waiting for line-2-plc ")]
    assert all(line.startswith("waiting for plc (no answer after ") for line in late), lines
    assert len(lines) == 1 + len(late), lines


async def test_check_json_for_scripts(tmp_path: Path) -> None:
    async with plant(tmp_path) as config:
        done = await asyncio.to_thread(run_check, "-c", str(config), "--json")
    assert done.returncode == 1, done.stderr
    data = json.loads(done.stdout)  # stdout is the JSON object and nothing else
    assert data["ok"] is False and data["read"] == 3
    rows = {(r["equipment"], r["signal"]): r for r in data["signals"]}
    assert rows["press-1", "state"]["value"] == 2
    assert rows["press-1", "state"]["text"] == "fault (code 2)"
    assert rows["press-1", "total_count"]["counter"] == {"width": 32, "signed": False}
    assert rows["press-9", "state"]["reason"].startswith("unit 9: the device reports a failure")
    assert not rows["filler-1", "state"]["ok"]


async def test_progress_on_a_terminal_is_one_line_rewritten(tmp_path: Path) -> None:
    async with plant(tmp_path) as path:
        config = parse_config(path.read_text(encoding="utf-8"))
        screen = io.StringIO()
        progress = Progress(screen, tty=True)
        results = await check_config(config, progress=progress.update)
        progress.close()
    assert len(results) == 7
    shown = screen.getvalue()
    assert "\rwaiting for line-2-plc (1 s of 14 s)..." in shown
    assert "\rwaiting for line-2-plc (3 s of 14 s)..." in shown
    # The PLC that answers does so at once and gets no line, unless a loaded machine held
    # its answer past the first second: then its line is the same kind of line.
    others = shown.replace("\rwaiting for line-2-plc (", "").split("\rwaiting for plc (")[1:]
    assert "plc (" not in shown.replace("line-2-plc (", "").replace("waiting for plc (", "")
    assert all(re.match(r"\d+ s of 5 s\)\.\.\.", o) for o in others), shown
    assert shown.endswith("\r")  # the line is cleared before the table is printed
    assert "\n" not in shown


@pytest.mark.parametrize(
    ("reason", "plain"),
    [
        (
            "unit 1: no answer (Modbus Error: [Input/Output] No response received after 1 "
            "retries, continue with next request)",
            "unit 1: no answer within 1.0 s",
        ),
        (
            "unit 3: ILLEGAL_DATA_ADDRESS",
            "unit 3: the device has no such register (Modbus exception 2); check the address "
            "and `addressing:` (0- or 1-based)",
        ),
        (
            "unit 4: GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND",
            "unit 4: the gateway reports that the unit behind it does not answer (Modbus "
            "exception 11)",
        ),
        ("cannot connect to 10.0.0.1:502", "cannot connect to 10.0.0.1:502"),
    ],
)
def test_connector_reasons_in_plain_words(reason: str, plain: str) -> None:
    from agent.check import plain_reason

    assert plain_reason(reason, timeout=1.0) == plain
