"""One hub per Modbus TCP connection: connect, poll coalesced blocks, decode, emit Samples.

The hub owns the reconnect loop. A unit that fails is marked unavailable (its signals are
emitted once with bad quality) and retried with backoff, without delaying the other units.
State changes are logged ("connected", "lost", "recovered"), not every failed poll.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException

from connectors.modbus.codec import CodecError, decode_registers, parse_address, register_count
from connectors.modbus.config import ModbusConnection
from connectors.modbus.plan import Block, ReadRequest, TagSpan, plan_reads
from connectors.sample import Sample

Emit = Callable[[Sample], Awaitable[None]]

EXCEPTION_NAMES = {
    1: "ILLEGAL_FUNCTION",
    2: "ILLEGAL_DATA_ADDRESS",
    3: "ILLEGAL_DATA_VALUE",
    4: "SERVER_DEVICE_FAILURE",
    5: "ACKNOWLEDGE",
    6: "SERVER_DEVICE_BUSY",
    8: "MEMORY_PARITY_ERROR",
    10: "GATEWAY_PATH_UNAVAILABLE",
    11: "GATEWAY_TARGET_DEVICE_FAILED_TO_RESPOND",
}


@dataclass(frozen=True)
class ModbusTag:
    """One signal of one equipment, as the hub reads it."""

    equipment_id: str
    signal: str
    unit: int
    address: str
    data_type: str = "uint16"
    order: str = "ABCD"
    scale: float = 1.0
    offset: float = 0.0
    bit: int | None = None
    length: int | None = None

    @property
    def key(self) -> str:
        return f"{self.equipment_id}/{self.signal}"


class ModbusReadError(Exception):
    """A read failed: a Modbus exception response (named) or no/invalid answer."""


class ModbusHub:
    """Polls one Modbus TCP server; `async with hub: await hub.run(emit)`."""

    def __init__(self, config: ModbusConnection, tags: Sequence[ModbusTag]) -> None:
        self.config = config
        self.tags = {t.key: t for t in tags}
        spans = []
        for tag in tags:
            addr = parse_address(tag.address, base=config.addressing)
            count = 1 if addr.is_bit else register_count(tag.data_type, tag.length)
            spans.append(TagSpan(tag.key, ReadRequest(tag.unit, addr.table, addr.address, count)))
        self.blocks: list[Block] = plan_reads(spans, max_gap=config.max_gap)
        self.connected = False
        self.requests = 0
        self.last_read_latency_s: float | None = None
        self._unit_down_until: dict[int, float] = {}
        self._unit_failures: dict[int, int] = {}
        self._client: AsyncModbusTcpClient | None = None
        self._log = structlog.get_logger("connectors.modbus").bind(connection=config.id)

    async def __aenter__(self) -> ModbusHub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self.connected = False

    async def _connect(self) -> bool:
        self._close()
        client = AsyncModbusTcpClient(
            self.config.host,
            port=self.config.port,
            timeout=self.config.timeout,
            retries=self.config.retries,
            reconnect_delay=0,  # the hub owns reconnects
        )
        ok = await client.connect()
        if not ok:
            client.close()
            return False
        self._client = client
        return True

    async def _read(self, block: Block) -> list[Any]:
        client = self._client
        if client is None:
            raise ModbusReadError("not connected")
        read = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }[block.table]
        self.requests += 1
        rr = await read(block.start, count=block.count, device_id=block.unit)
        if rr.isError():
            code = getattr(rr, "exception_code", 0)
            name = EXCEPTION_NAMES.get(code, f"exception code {code}")
            raise ModbusReadError(f"unit {block.unit}: {name}")
        return list(rr.bits if block.table in ("coil", "discrete") else rr.registers)

    def _decode(self, block: Block, values: list[Any], ts: datetime) -> list[Sample]:
        out = []
        for member in block.members:
            tag = self.tags[member.key]
            raw = block.slice(values, member.key)
            try:
                if block.table in ("coil", "discrete"):
                    value: Any = bool(raw[0])
                else:
                    value = decode_registers(
                        raw,
                        tag.data_type,
                        tag.order,
                        scale=tag.scale,
                        offset=tag.offset,
                        bit=tag.bit,
                        length=tag.length,
                    )
                out.append(Sample(tag.equipment_id, tag.signal, value, ts))
            except CodecError as exc:
                self._log.warning("decode failed", tag=tag.key, error=str(exc))
                out.append(Sample(tag.equipment_id, tag.signal, None, ts, "bad"))
        return out

    def _bad(self, unit: int | None, ts: datetime) -> list[Sample]:
        return [
            Sample(t.equipment_id, t.signal, None, ts, "bad")
            for t in self.tags.values()
            if unit is None or t.unit == unit
        ]

    async def poll_once(self) -> list[Sample]:
        """Read every block once; units in backoff are skipped. Raises on a lost connection."""
        samples: list[Sample] = []
        now = time.monotonic()
        started = now
        for block in self.blocks:
            if self._unit_down_until.get(block.unit, 0.0) > now:
                continue
            try:
                values = await self._read(block)
            except (TimeoutError, ModbusReadError, ModbusException) as exc:
                if self._client is None or not self._client.connected:
                    raise ConnectionError(str(exc)) from exc
                failures = self._unit_failures.get(block.unit, 0) + 1
                self._unit_failures[block.unit] = failures
                backoff = min(self.config.reconnect_max, self.config.poll_interval * 2**failures)
                self._unit_down_until[block.unit] = time.monotonic() + backoff
                if failures == 1:
                    self._log.warning("unit unavailable", unit=block.unit, error=str(exc))
                    samples.extend(self._bad(block.unit, datetime.now(UTC)))
                continue
            if self._unit_failures.pop(block.unit, 0):
                self._unit_down_until.pop(block.unit, None)
                self._log.info("unit recovered", unit=block.unit)
            samples.extend(self._decode(block, values, datetime.now(UTC)))
        self.last_read_latency_s = time.monotonic() - started
        return samples

    async def run(self, emit: Emit) -> None:
        """Poll forever; reconnect with capped exponential backoff and jitter."""
        attempt = 0
        while True:
            try:
                if not self.connected:
                    if not await self._connect():
                        raise ConnectionError("connection refused or timed out")
                    self.connected = True
                    self._log.info(
                        "recovered" if attempt else "connected",
                        host=self.config.host,
                        port=self.config.port,
                    )
                    attempt = 0
                started = time.monotonic()
                for sample in await self.poll_once():
                    await emit(sample)
                elapsed = time.monotonic() - started
                await asyncio.sleep(max(0.0, self.config.poll_interval - elapsed))
            except (ConnectionError, OSError, ModbusException) as exc:
                was_connected = self.connected
                self._close()
                if was_connected or attempt == 0:
                    self._log.warning("lost" if was_connected else "cannot connect", error=str(exc))
                    for sample in self._bad(None, datetime.now(UTC)):
                        await emit(sample)
                attempt += 1
                delay = min(self.config.reconnect_max, 0.5 * 2 ** min(attempt, 10))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
