"""The Modbus hub against real pymodbus servers started in the test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from agent.config import ConfigError, parse_config
from common.checks import validate
from connectors.modbus.codec import ORDERS, encode_value, register_count
from connectors.modbus.config import ModbusConnection, ModbusRtuConnection
from connectors.modbus.hub import ModbusHub, ModbusTag
from tests.conftest import free_port
from tests.connectors.harness import running, wait_until

Action = Callable[[int, int, int], ExcCodes | None]  # (unit, address, count) -> exception


class Plc:
    """A pymodbus TCP server with units whose registers a test sets; counts requests per unit.

    Units in `silent` never answer (their requests are left hanging), like a dead slave
    behind a gateway."""

    def __init__(
        self,
        registers: dict[int, list[int]],
        port: int,
        fail: Action | None = None,
        silent: frozenset[int] = frozenset(),
    ) -> None:
        self.registers = registers
        self.silent = silent
        self.never = asyncio.Event()
        self.requests: dict[int, int] = dict.fromkeys(registers, 0)
        self.fail = fail
        self.port = port
        devices = [self._device(unit) for unit in registers]
        self.server = ModbusTcpServer(
            devices, address=("127.0.0.1", port), ignore_missing_devices=True
        )
        self.task: asyncio.Task[None] | None = None

    def _device(self, unit: int) -> SimDevice:
        regs = self.registers[unit]

        async def action(
            function_code: int,
            start_address: int,
            address: int,
            count: int,
            current: list[int],
            set_values: Any,
        ) -> ExcCodes | None:
            self.requests[unit] += 1
            if unit in self.silent:
                await self.never.wait()
            if self.fail is not None and (code := self.fail(unit, address, count)):
                return code
            # `current` is the device's whole register block, starting at start_address
            for i in range(min(len(current), len(regs) - start_address)):
                current[i] = regs[start_address + i]
            return None

        return SimDevice(
            id=unit,
            simdata=[SimData(0, count=len(regs), datatype=DataType.REGISTERS)],
            action=action,
        )

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve_forever())
        await wait_until(self.server.is_active, "the server listens")

    async def stop(self) -> None:
        await self.server.shutdown()  # type: ignore[no-untyped-call]
        if self.task is not None:
            self.task.cancel()


@pytest.fixture
async def plc_factory() -> AsyncIterator[Callable[..., Plc]]:
    made: list[Plc] = []

    def make(
        registers: dict[int, list[int]],
        fail: Action | None = None,
        port: int = 0,
        silent: frozenset[int] = frozenset(),
    ) -> Plc:
        plc = Plc(registers, port or free_port(), fail, silent)
        made.append(plc)
        return plc

    yield make
    for plc in made:
        if plc.task is not None:
            await plc.stop()


def conn(port: int, **kw: Any) -> ModbusConnection:
    data: dict[str, Any] = {
        "id": "line",
        "type": "modbus",
        "host": "127.0.0.1",
        "port": port,
        "poll_interval": "50ms",
        "timeout": "500ms",
        "retries": 0,
        "reconnect_max": "1s",
        "unit_backoff_max": "2s",
    }
    data.update(kw)
    return validate(ModbusConnection, data)


VALUES = {
    "int16": -1234,
    "uint16": 54321,
    "int32": -123456789,
    "uint32": 3_000_000_000,
    "int64": -(2**62) + 7,
    "uint64": 2**63 + 11,
    "float32": 1.5,
    "float64": -2.25e100,
}


async def test_each_data_type_and_word_order_through_the_hub(
    plc_factory: Callable[..., Plc],
) -> None:
    regs = [0] * 200
    tags = []
    address = 0
    for data_type, value in VALUES.items():
        for order in ORDERS:
            words = encode_value(value, data_type, order)
            regs[address : address + len(words)] = words
            tags.append(
                ModbusTag("m", f"{data_type}-{order}", 1, f"hr:{address}", data_type, order)
            )
            address += register_count(data_type)
    words = encode_value("PRESS-7", "string", length=4)
    regs[address : address + 4] = words
    tags.append(ModbusTag("m", "name", 1, f"hr:{address}", "string", length=4))
    regs[address + 4] = 0b1000
    tags.append(ModbusTag("m", "bit3", 1, f"hr:{address + 4}", "bool", bit=3))
    regs[address + 5] = 250
    tags.append(ModbusTag("m", "scaled", 1, f"ir:{address + 5}", "uint16", scale=0.1, offset=-5))
    plc = plc_factory({1: regs})
    await plc.start()
    hub = ModbusHub(conn(plc.port), tags)
    async with hub:
        samples = await hub.poll_unit_once(1)
    got = {s.signal: s.value for s in samples}
    for data_type, value in VALUES.items():
        for order in ORDERS:
            assert got[f"{data_type}-{order}"] == pytest.approx(value), (data_type, order)
    assert got["name"] == "PRESS-7"
    assert got["bit3"] is True
    assert got["scaled"] == pytest.approx(20.0)
    assert all(s.quality == "good" for s in samples)
    # 85 holding registers in one read, the input register in another
    assert plc.requests[1] == hub.requests == 2


async def test_coalescing_counted_on_the_server(plc_factory: Callable[..., Plc]) -> None:
    regs = list(range(1000))
    # 100 tags, one every 3 registers (gap 2 <= max_gap): 300 registers -> 3 reads, not 100
    tags = [ModbusTag("m", f"t{i}", 1, f"hr:{i * 3}") for i in range(100)]
    plc = plc_factory({1: regs})
    await plc.start()
    hub = ModbusHub(conn(plc.port), tags)
    async with hub:
        samples = await hub.poll_unit_once(1)
        assert plc.requests[1] == 3
        single = ModbusHub(conn(plc.port, coalesce=False), tags)
        async with single:
            await single.poll_unit_once(1)
    assert plc.requests[1] == 3 + 100
    assert [s.value for s in samples] == [i * 3 for i in range(100)]


@pytest.mark.parametrize("per_unit", [True, False])
async def test_unit_that_never_answers_does_not_hold_up_the_others(
    plc_factory: Callable[..., Plc], per_unit: bool
) -> None:
    plc = plc_factory({1: [11] * 10, 2: [22] * 10, 3: [33] * 10}, silent=frozenset({3}))
    await plc.start()
    tags = [ModbusTag(f"m{u}", "state", u, "hr:0") for u in (1, 2, 3)]
    hub = ModbusHub(conn(plc.port, connection_per_unit=per_unit, timeout="300ms"), tags)
    async with running(hub) as got:
        await wait_until(lambda: plc.requests[3] >= 3, "several attempts at unit 3")
        await wait_until(lambda: got.quality("m3", "state") == "bad", "unit 3 reported bad")
        start1, start3 = plc.requests[1], plc.requests[3]
        await wait_until(lambda: plc.requests[3] >= start3 + 2, "two more attempts")
        served1 = plc.requests[1] - start1
        attempts3 = plc.requests[3] - start3
    assert not hub.unit_available[3]
    assert "no answer" in hub.problems["m3/state"]
    # Each silent attempt costs a 300 ms timeout; units 1 and 2 poll every 50 ms meanwhile.
    # Held up behind unit 3 they would get about one request per attempt; free, many.
    assert served1 >= 4 * attempts3, (served1, attempts3)
    assert got.value("m1", "state") == 11 and got.value("m2", "state") == 22
    assert plc.requests[2] > 0


async def test_exception_responses_are_named_and_rejected_blocks_split(
    plc_factory: Callable[..., Plc],
) -> None:
    def fail(unit: int, address: int, count: int) -> ExcCodes | None:
        if unit == 2:
            return ExcCodes.DEVICE_FAILURE
        if address <= 5 < address + count:  # register 5 does not exist on unit 1
            return ExcCodes.ILLEGAL_ADDRESS
        return None

    plc = plc_factory({1: list(range(100, 120)), 2: [0] * 10}, fail=fail)
    await plc.start()
    tags = [ModbusTag("m1", f"r{a}", 1, f"hr:{a}") for a in (0, 3, 5, 8)]
    tags.append(ModbusTag("m2", "state", 2, "hr:0"))
    hub = ModbusHub(conn(plc.port), tags)
    async with running(hub) as got:
        await wait_until(lambda: got.quality("m1", "r8") == "good", "neighbours readable")
        await wait_until(lambda: got.quality("m2", "state") == "bad", "unit 2 bad")
    assert hub.problems["m2/state"] == "unit 2: SERVER_DEVICE_FAILURE"
    assert hub.problems["m1/r5"] == "unit 1: ILLEGAL_DATA_ADDRESS"
    assert got.value("m1", "r0") == 100 and got.value("m1", "r3") == 103
    assert got.value("m1", "r8") == 108 and got.quality("m1", "r5") == "bad"
    assert hub.unit_available[2]  # it answers, with an exception: it is not dead


async def test_connection_refused_then_server_appears(plc_factory: Callable[..., Plc]) -> None:
    port = free_port()
    hub = ModbusHub(conn(port), [ModbusTag("m", "state", 1, "hr:2")])
    async with running(hub) as got:
        await wait_until(lambda: got.quality("m", "state") == "bad", "bad while refused")
        assert not hub.connected
        plc = plc_factory({1: [0, 0, 42]}, port=port)
        await plc.start()
        await wait_until(lambda: got.value("m", "state") == 42, "data flows")
        assert hub.connected
        # and again after the server goes away and comes back
        await plc.stop()
        plc.task = None
        await wait_until(lambda: got.quality("m", "state") == "bad", "bad after loss")
        plc2 = plc_factory({1: [0, 0, 43]}, port=port)
        await plc2.start()
        await wait_until(lambda: got.value("m", "state") == 43, "data flows again")


async def test_a_swallowed_cancellation_still_stops_the_hub(
    plc_factory: Callable[..., Plc],
) -> None:
    """Python 3.11's asyncio.wait_for (which pymodbus awaits for every request) returns the
    answer instead of raising when the cancellation lands just as the answer arrives. The
    emit callback below swallows the hub's cancellation the same way, deterministically: the
    hub must still stop at its next poll instead of polling on forever."""
    plc = plc_factory({1: [7, 7]})
    await plc.start()
    hub = ModbusHub(conn(plc.port), [ModbusTag("m", "state", 1, "hr:0")])
    hub_task: asyncio.Task[None] | None = None
    swallowed = 0
    emitted = 0

    async def emit(sample: object) -> None:
        nonlocal swallowed, emitted
        emitted += 1
        if emitted == 3 and hub_task is not None:
            hub_task.cancel()  # the agent stops: the hub's task group cancels its units
            for _ in range(10):  # let the cancellation reach this unit, then lose it
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:
                    swallowed += 1
                    break

    async with hub:
        hub_task = asyncio.create_task(hub.run(emit))
        await asyncio.wait({hub_task}, timeout=30)
        stopped = hub_task.done()
        if not stopped:
            hub_task.cancel()  # pre-fix behaviour: put the runaway loop down for good
    assert swallowed == 1
    assert stopped, f"the hub kept polling after its cancellation ({emitted} samples)"
    assert hub_task.cancelled()
    assert emitted == 3  # not one more poll after the stop


RTU = """\
agent: {id: a1, site: s1}
connections:
  - id: bus
    type: modbus-rtu
    port: /dev/ttyUSB0
    %s
equipment:
  - id: press-1
    connection: bus
    unit: 7
    ideal_cycle_time: 1s
    signals:
      state: {address: "hr:0", map: {0: idle, 1: running}}
      total_count: {address: "hr:1", type: uint32}
"""


def test_rtu_connection_config() -> None:
    cfg = parse_config(RTU % "baudrate: 9600")
    rtu = cfg.connections[0]
    assert isinstance(rtu, ModbusRtuConnection)
    assert (rtu.baudrate, rtu.parity, rtu.stopbits, rtu.timeout) == (9600, "E", 1, 0.5)
    with pytest.raises(ConfigError, match=r"connections\[0\]\.parity \(line 6\)"):
        parse_config(RTU % "parity: X")
    with pytest.raises(ConfigError, match=r"connections\[0\]\.host \(line 6\): unknown key"):
        parse_config(RTU % "host: 10.0.0.1")
