"""A simulated press behind a real pymodbus TCP server, for demos and tests.

Register layout per unit (holding registers, 0-based, big-endian words):
0 state (0 idle, 1 running, 2 fault, 3 setup), 1-2 total count (uint32),
3-4 scrap count (uint32), 5 reason code (1 no material, 2 tool change, 3 jam; 0 none).
The press keeps an exact tally of what it did (`truth`), so a test can compare.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from connectors.modbus.codec import encode_value

STATE_CODES = {"idle": 0, "running": 1, "fault": 2, "setup": 3}
# (state, min seconds, max seconds, reason code)
PROGRAM: tuple[tuple[str, float, float, int], ...] = (
    ("running", 20.0, 40.0, 0),
    ("idle", 3.0, 8.0, 1),
    ("running", 15.0, 30.0, 0),
    ("fault", 4.0, 10.0, 3),
    ("running", 20.0, 35.0, 0),
    ("setup", 3.0, 6.0, 2),
)


@dataclass
class PressTruth:
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATE_CODES, 0.0))
    produced: int = 0
    scrap: int = 0


class Press:
    """One machine: a state program, a part counter and a scrap counter (all in registers)."""

    def __init__(
        self,
        *,
        cycle_time: float = 1.0,
        speed: float = 0.9,
        scrap_rate: float = 0.03,
        seed: int = 1,
        time_scale: float = 1.0,
        start_count: int = 0,
        start_scrap: int = 0,
        width: int = 32,
    ) -> None:
        self.rng = random.Random(seed)
        self.cycle_time = cycle_time
        self.speed = speed
        self.scrap_rate = scrap_rate
        self.time_scale = time_scale
        self.width = width
        self.registers = [0] * 16
        self.requests = 0
        self.truth = PressTruth()
        self.total_raw = start_count
        self.scrap_raw = start_scrap
        self.step_index = -1
        self.state = "idle"
        self.remaining = 0.0
        self.part_progress = 0.0
        self.frozen = False
        self._next_step()
        self._write()

    def _next_step(self) -> None:
        self.step_index = (self.step_index + 1) % len(PROGRAM)
        state, lo, hi, reason = PROGRAM[self.step_index]
        self.state = state
        self.reason = reason
        self.remaining = self.rng.uniform(lo, hi) * self.time_scale

    def _write(self) -> None:
        mask = (1 << self.width) - 1
        regs = [STATE_CODES[self.state]]
        regs += encode_value(self.total_raw & mask, "uint32")
        regs += encode_value(self.scrap_raw & mask, "uint32")
        regs += [self.reason]
        self.registers[: len(regs)] = regs

    async def on_access(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> None:
        """pymodbus calls this on every request: serve the press's current registers."""
        self.requests += 1
        for i, value in enumerate(self.registers):
            j = i - start_address
            if 0 <= j < len(current):
                current[j] = value

    def device(self, unit: int) -> SimDevice:
        return SimDevice(
            id=unit,
            simdata=[SimData(0, count=len(self.registers), datatype=DataType.REGISTERS)],
            action=self.on_access,
        )

    def set_state(self, state: str, reason: int = 0) -> None:
        """Force a state (tests); the program resumes after the usual duration."""
        self.state = state
        self.reason = reason
        self._write()

    def advance(self, dt: float) -> None:
        """Move the machine on by dt seconds of its own time."""
        if self.frozen:
            return
        while dt > 0:
            step = min(dt, self.remaining)
            self.truth.seconds[self.state] += step
            if self.state == "running":
                self.part_progress += step * self.speed / self.cycle_time
                while self.part_progress >= 1.0:
                    self.part_progress -= 1.0
                    self.total_raw += 1
                    self.truth.produced += 1
                    if self.rng.random() < self.scrap_rate:
                        self.scrap_raw += 1
                        self.truth.scrap += 1
            self.remaining -= step
            dt -= step
            if self.remaining <= 0:
                self._next_step()
        self._write()


class PressLine:
    """N presses as units 1..N of one Modbus TCP server."""

    def __init__(self, presses: list[Press], host: str = "127.0.0.1", port: int = 5020) -> None:
        self.presses = presses
        self.host = host
        self.port = port
        devices = [p.device(i + 1) for i, p in enumerate(presses)]
        self.server = ModbusTcpServer(devices, address=(host, port))
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, tick: float = 0.1) -> None:
        self._tasks.append(asyncio.create_task(self.server.serve_forever()))
        self._tasks.append(asyncio.create_task(self._run(tick)))
        for _ in range(100):  # wait until the socket listens
            if self.server.is_active():
                break
            await asyncio.sleep(0.02)

    async def _run(self, tick: float) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for press in self.presses:
                press.advance(now - last)
            last = now

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.server.shutdown()  # type: ignore[no-untyped-call]
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
