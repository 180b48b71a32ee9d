"""`edge-agent simulate`: help for every option, the agent's limits on the command line (unit
ids 1..247, ports, durations), and a simulator serving the highest unit id."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pymodbus.client import ModbusTcpClient

from agent.cli import build_parser
from tests.conftest import free_port

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")


def options_without_help(parser: argparse.ArgumentParser, path: str = "") -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += options_without_help(sub, f"{path} {name}".strip())
        elif not action.help and not isinstance(action, argparse._HelpAction):
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_of_every_command_has_help() -> None:
    assert options_without_help(build_parser()) == []


MACHINES = "argument --machines: the number of machines must be"
PORT = "argument --port: a TCP port must be 1..65535"
CYCLE = "argument --cycle-time: a cycle time must be more than 0 s and at most 86400 s"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["modbus", "--machines", "248"], f"{MACHINES} 1..247, got 248"),
        (["modbus", "--machines", "0"], f"{MACHINES} 1..247, got 0"),
        (["modbus", "--port", "70000"], f"{PORT}, got 70000"),
        (["modbus", "--port", "0"], f"{PORT}, got 0"),
        (["modbus", "--cycle-time", "0s"], f"{CYCLE}, got 0s"),
        (["modbus", "--cycle-time", "25h"], f"{CYCLE}, got 25h"),
        (["modbus", "--cycle-time", "fast"], "argument --cycle-time: invalid duration 'fast'"),
        (
            ["modbus", "--time-scale", "-1"],
            "argument --time-scale: the time scale must be more than 0 and at most 1000, got -1",
        ),
        (["opcua", "--port", "65536"], f"{PORT}, got 65536"),
        (["opcua", "--machines", "0"], f"{MACHINES} 1..10000, got 0"),
        (
            ["opcua", "--restart-every", "0s"],
            "argument --restart-every: the restart interval must be more than 0 s",
        ),
        (["opcua", "--counter-width", "24"], "argument --counter-width: invalid choice: 24"),
    ],
)
def test_simulate_refuses_what_the_agent_refuses(args: list[str], message: str) -> None:
    done = subprocess.run(
        [EDGE_AGENT, "simulate", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_simulate_modbus_serves_units_up_to_247(tmp_path: Path) -> None:
    port = free_port()
    truth = tmp_path / "truth.json"
    command = [EDGE_AGENT, "simulate", "modbus", "--machines", "247", "--port", str(port),
               "--cycle-time", "500ms", "--time-scale", "0.5", "--truth", str(truth)]  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as sim:
        try:
            assert sim.stdout is not None
            first = sim.stdout.readline().strip()
            assert first == f"simulating 247 press(es) on modbus://127.0.0.1:{port} (units 1..247)"
            client = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
            assert client.connect()
            try:
                for unit in (1, 247):
                    answer = client.read_holding_registers(0, count=6, device_id=unit)
                    assert not answer.isError(), (unit, answer)
                    assert answer.registers[0] in (0, 1, 2, 3)  # a state code
            finally:
                client.close()
        finally:
            sim.send_signal(signal.SIGTERM)
            _, err = sim.communicate(timeout=30)
    assert sim.returncode == 0, err
    record = json.loads(truth.read_text(encoding="utf-8"))
    assert [r["unit"] for r in record] == list(range(1, 248))
