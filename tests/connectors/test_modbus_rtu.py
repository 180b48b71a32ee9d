"""Modbus RTU end to end over a pseudo-terminal pair (socat): a pymodbus serial server on one
end, the hub on the other. (A unit that never answers is tested on a shared TCP connection in
test_modbus_hub.py: the same one-request-at-a-time path with backoff that an RTU line uses;
pymodbus' serial server cannot leave one unit silent without stalling the whole line.)"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from common.checks import validated
from connectors.modbus.codec import encode_value
from connectors.modbus.config import ModbusRtuConnection
from connectors.modbus.hub import ModbusHub, ModbusTag
from tests.connectors.harness import running, wait_until

pytestmark = pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")


@pytest.fixture
def line(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    plc, agent = tmp_path / "plc", tmp_path / "agent"
    proc = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={plc}", f"pty,raw,echo=0,link={agent}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(500):
            if plc.exists() and agent.exists():
                break
            if proc.poll() is not None:
                raise AssertionError("socat ended")
            subprocess.run(["sleep", "0.02"], check=True)
        yield plc, agent
    finally:
        proc.terminate()
        proc.wait(10)


async def test_rtu_line_two_units(line: tuple[Path, Path]) -> None:
    plc_port, agent_port = line
    requests = {1: 0, 2: 0}

    def device(unit: int, regs: list[int]) -> SimDevice:
        async def action(
            fc: int, start: int, address: int, count: int, current: list[int], values: Any
        ) -> None:
            requests[unit] += 1
            for i in range(min(len(current), len(regs) - start)):
                current[i] = regs[start + i]

        return SimDevice(
            id=unit,
            simdata=[SimData(0, count=len(regs), datatype=DataType.REGISTERS)],
            action=action,
        )

    regs1 = [1, *encode_value(123456, "uint32"), 0, 0, 0, 0, 0]
    server = ModbusSerialServer(
        [device(1, regs1), device(2, [2] * 8)], port=str(plc_port), baudrate=115200
    )
    serving = asyncio.create_task(server.serve_forever())
    try:
        cfg = validated(
            ModbusRtuConnection,
            id="bus",
            port=str(agent_port),
            baudrate=115200,
            parity="N",
            timeout="1s",
            poll_interval="50ms",
        )
        tags = [
            ModbusTag("m1", "state", 1, "hr:0"),
            ModbusTag("m1", "total_count", 1, "hr:1", "uint32"),
            ModbusTag("m2", "state", 2, "hr:0"),
        ]
        hub = ModbusHub(cfg, tags)
        async with running(hub) as got:
            await wait_until(lambda: got.value("m1", "total_count") == 123456, "unit 1 read")
            await wait_until(lambda: got.value("m2", "state") == 2, "unit 2 read")
            await wait_until(lambda: requests[1] >= 5 and requests[2] >= 5, "steady polling")
            assert hub.connected
        # unit 1's two tags are one coalesced request per poll
        assert len(hub.units[1]) == 1
        assert hub.problems == {}
    finally:
        await asyncio.wait_for(server.shutdown(), 10)  # type: ignore[no-untyped-call]
        serving.cancel()
