"""One hub per Modbus connection (TCP or RTU): connect, poll coalesced blocks, decode, emit.

Each unit (slave id) is polled by its own task, on its own TCP connection unless
`connection_per_unit: false`, so a unit that never answers does not delay the others. On a
serial line (RTU) the bus carries one request at a time; there a unit that stops answering is
marked unavailable (its signals emitted once with bad quality) and only probed again after a
capped, jittered backoff, so it costs the others at most one timeout per backoff period.

Exception responses are reported by name. A coalesced block answered with
ILLEGAL_DATA_ADDRESS (a gap register the device does not have) is split into one read per
tag, so one unmapped register does not hide its neighbours. State changes are logged
("connected", "lost", "recovered", "unit unavailable"), not every failed poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException

from common.retry import Backoff, jittered
from connectors.connector import Emit, EquipmentSource, raise_if_cancelled
from connectors.modbus.codec import CodecError, decode_registers, parse_address, register_count
from connectors.modbus.config import ModbusConnection, ModbusRtuConnection
from connectors.modbus.plan import Block, Member, ReadRequest, TagSpan, plan_reads
from connectors.sample import Sample

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
_ILLEGAL_DATA_ADDRESS = 2
# A gateway answering 10/11 means the unit behind it is silent: treat like no answer.
_GATEWAY_NO_ANSWER = frozenset({10, 11})

AnyModbusConnection = ModbusConnection | ModbusRtuConnection


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


def modbus_tags(connection_id: str, equipment: Sequence[EquipmentSource]) -> list[ModbusTag]:
    """The tags of every equipment attached to connection `connection_id`."""
    tags = []
    for eq in equipment:
        if eq.connection != connection_id:
            continue
        for name, sig in eq.signals.items():
            if sig.address is None:
                continue
            tags.append(
                ModbusTag(
                    equipment_id=eq.id,
                    signal=str(name),
                    unit=eq.unit,
                    address=sig.address,
                    data_type=sig.data_type,
                    order=sig.order,
                    scale=sig.scale,
                    offset=sig.offset,
                    bit=sig.bit,
                    length=sig.length,
                )
            )
    return tags


class ModbusReadError(Exception):
    """A Modbus exception response; `code` is the exception code, the message names it."""

    def __init__(self, unit: int, code: int) -> None:
        self.unit = unit
        self.code = code
        super().__init__(f"unit {unit}: {exception_name(code)}")


class UnitSilent(Exception):
    """The unit did not answer (timeout, or a gateway reporting it silent)."""


def exception_name(code: int) -> str:
    return EXCEPTION_NAMES.get(code, f"exception code {code}")


class _Link:
    """One Modbus client (a TCP connection or the serial port) and its reconnect state."""

    def __init__(self, hub: ModbusHub, name: str) -> None:
        self.hub = hub
        self.name = name
        self.client: Any = None
        self.lock = asyncio.Lock()
        self.failures = 0
        self.retry_at = 0.0
        self.ever_connected = False
        self.error = "not connected yet"

    @property
    def connected(self) -> bool:
        return self.client is not None and bool(self.client.connected)

    async def ensure(self) -> Any:
        """The connected client, or None while the link is down and backing off."""
        async with self.lock:
            if self.connected:
                return self.client
            if time.monotonic() < self.retry_at:
                return None
            self.close()
            client = self.hub._make_client()
            problem = ""
            try:
                ok = await client.connect()
            except Exception as exc:  # e.g. termios.error for settings a serial port rejects
                ok, problem = False, f": {type(exc).__name__}: {exc}"
            if not ok:
                self.error = f"cannot connect to {self.hub.endpoint}{problem}"
                with contextlib.suppress(Exception):
                    client.close()
                self.failures += 1
                if self.failures == 1:
                    self.hub._log.warning(
                        "lost" if self.ever_connected else "cannot connect", link=self.name
                    )
                backoff = Backoff(0.5, self.hub.config.reconnect_max, doublings=10)
                self.retry_at = time.monotonic() + backoff.delay(self.failures)
                return None
            self.hub._log.info("recovered" if self.ever_connected else "connected", link=self.name)
            self.client = client
            self.failures = 0
            self.ever_connected = True
            return client

    def drop(self) -> None:
        """Forget the connection (e.g. after a garbled answer): the next use reconnects, which
        also resets pymodbus' transaction ids."""
        self.close()
        self.retry_at = 0.0

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
            self.client = None


class ModbusHub:
    """Polls one Modbus TCP server or RTU line; `async with hub: await hub.run(emit)`."""

    def __init__(self, config: AnyModbusConnection, tags: Sequence[ModbusTag]) -> None:
        self.config = config
        self.tags = {t.key: t for t in tags}
        spans = []
        for tag in tags:
            addr = parse_address(tag.address, base=config.addressing)
            count = 1 if addr.is_bit else register_count(tag.data_type, tag.length)
            spans.append(TagSpan(tag.key, ReadRequest(tag.unit, addr.table, addr.address, count)))
        if config.coalesce:
            self.blocks: list[Block] = plan_reads(
                spans, max_gap=config.max_gap, max_registers=config.max_registers
            )
        else:
            self.blocks = [b for span in spans for b in plan_reads([span])]
        self.units: dict[int, list[Block]] = {}
        for block in self.blocks:
            self.units.setdefault(block.unit, []).append(block)
        self.requests = 0
        self.requests_by_unit: dict[int, int] = dict.fromkeys(self.units, 0)
        self.last_read_latency_s: float | None = None
        self.unit_available: dict[int, bool] = dict.fromkeys(self.units, True)
        self.problems: dict[str, str] = {}
        self._log = structlog.get_logger("connectors.modbus").bind(connection=config.id)
        # The hub logs state changes once; pymodbus would log every failed attempt and timeout.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        per_unit = isinstance(config, ModbusConnection) and config.connection_per_unit
        shared = _Link(self, "line")
        self._links: dict[int, _Link] = {
            unit: _Link(self, f"unit {unit}") if per_unit else shared for unit in self.units
        }

    @property
    def connected(self) -> bool:
        return any(link.connected for link in self._links.values())

    @property
    def endpoint(self) -> str:
        cfg = self.config
        return cfg.port if isinstance(cfg, ModbusRtuConnection) else f"{cfg.host}:{cfg.port}"

    async def __aenter__(self) -> ModbusHub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for link in self._links.values():
            link.close()

    def _make_client(self) -> Any:
        cfg = self.config
        # pymodbus' own reconnect is off: the hub owns reconnects and their backoff.
        if isinstance(cfg, ModbusRtuConnection):
            return AsyncModbusSerialClient(
                cfg.port,
                baudrate=cfg.baudrate,
                bytesize=cfg.bytesize,
                parity=cfg.parity,
                stopbits=cfg.stopbits,
                timeout=cfg.timeout,
                retries=cfg.retries,
                reconnect_delay=0,
            )
        return AsyncModbusTcpClient(
            cfg.host, port=cfg.port, timeout=cfg.timeout, retries=cfg.retries, reconnect_delay=0
        )

    async def _read(self, client: Any, block: Block) -> list[Any]:
        read = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }[block.table]
        self.requests += 1
        self.requests_by_unit[block.unit] = self.requests_by_unit.get(block.unit, 0) + 1
        try:
            rr = await read(block.start, count=block.count, device_id=block.unit)
        except ConnectionException:
            raise
        except (TimeoutError, ModbusException) as exc:
            raise UnitSilent(f"unit {block.unit}: no answer ({exc})") from exc
        if rr.isError():
            code = int(getattr(rr, "exception_code", 0) or 0)
            if code in _GATEWAY_NO_ANSWER:
                raise UnitSilent(f"unit {block.unit}: {exception_name(code)}")
            raise ModbusReadError(block.unit, code)
        return list(rr.bits if block.table in ("coil", "discrete") else rr.registers)

    def _decode(self, block: Block, values: list[Any], ts: datetime) -> list[Sample]:
        out = []
        for member in block.members:
            tag = self.tags[member.key]
            try:
                raw = block.slice(values, member.key)
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
            except (CodecError, ValueError, IndexError) as exc:
                self._problem(tag.key, f"cannot decode: {exc}")
                out.append(Sample(tag.equipment_id, tag.signal, None, ts, "bad"))
                continue
            self._clear_problem(tag.key)
            out.append(Sample(tag.equipment_id, tag.signal, value, ts))
        return out

    def _problem(self, key: str, reason: str) -> None:
        if self.problems.get(key) != reason:
            self._log.warning("signal unreadable", tag=key, reason=reason)
        self.problems[key] = reason

    def _clear_problem(self, key: str) -> None:
        if self.problems.pop(key, None) is not None:
            self._log.info("signal readable again", tag=key)

    def _bad(self, members: Sequence[Member], reason: str, ts: datetime) -> list[Sample]:
        out = []
        for member in members:
            tag = self.tags[member.key]
            self._problem(tag.key, reason)
            out.append(Sample(tag.equipment_id, tag.signal, None, ts, "bad"))
        return out

    def _split(self, unit: int, block: Block) -> None:
        """Replace a coalesced block by one read per tag (the device rejects the whole span)."""
        singles = [
            Block(unit, block.table, block.start + m.offset, m.size, (Member(m.key, 0, m.size),))
            for m in block.members
        ]
        blocks = self.units[unit]
        i = blocks.index(block)
        blocks[i : i + 1] = singles
        self._log.info("block split into single reads", unit=unit, start=block.start)

    async def poll_unit_once(self, unit: int) -> list[Sample]:
        """Read every block of `unit` once. Raises UnitSilent/ConnectionError."""
        link = self._links[unit]
        client = await link.ensure()
        if client is None:
            raise ConnectionError(link.error)
        samples: list[Sample] = []
        started = time.monotonic()
        for block in list(self.units[unit]):
            try:
                values = await self._read(client, block)
            except ModbusReadError as exc:
                if exc.code == _ILLEGAL_DATA_ADDRESS and len(block.members) > 1:
                    self._split(unit, block)
                samples.extend(self._bad(block.members, str(exc), datetime.now(UTC)))
                continue
            except ConnectionException as exc:
                link.drop()
                link.error = f"connection to {self.endpoint} lost"
                raise ConnectionError(link.error) from exc
            samples.extend(self._decode(block, values, datetime.now(UTC)))
        self.last_read_latency_s = time.monotonic() - started
        return samples

    async def _run_unit(self, unit: int, emit: Emit) -> None:
        failures = 0
        link = self._links[unit]
        interval = self.config.poll_interval
        while True:
            raise_if_cancelled()
            started = time.monotonic()
            try:
                samples = await self.poll_unit_once(unit)
            except Exception as exc:
                raise_if_cancelled(exc)
                # Whatever a device or driver does, it costs this unit its values, never the
                # hub (the other units) or the agent.
                if not isinstance(exc, UnitSilent | ConnectionError):
                    link.drop()
                    exc = ConnectionError(f"{type(exc).__name__}: {exc}")
                failures += 1
                if self.unit_available[unit]:
                    self.unit_available[unit] = False
                    if isinstance(exc, UnitSilent):
                        self._log.warning("unit unavailable", unit=unit, error=str(exc))
                    members = [m for b in self.units[unit] for m in b.members]
                    reason = str(exc)
                    for sample in self._bad(members, reason, datetime.now(UTC)):
                        await emit(sample)
                if isinstance(exc, UnitSilent) and link.client is not None:
                    if not link.connected:
                        link.drop()  # pymodbus closed it after repeated silence
                    backoff = Backoff(interval, self.config.unit_backoff_max, doublings=10)
                    delay = backoff.base(failures)
                else:
                    delay = max(interval, link.retry_at - time.monotonic())
                await asyncio.sleep(jittered(delay))
                continue
            if not self.unit_available[unit]:
                self.unit_available[unit] = True
                self._log.info("unit recovered", unit=unit)
            failures = 0
            for sample in samples:
                await emit(sample)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def run(self, emit: Emit) -> None:
        """Poll every unit forever, each in its own task."""
        async with asyncio.TaskGroup() as group:
            for unit in self.units:
                group.create_task(self._run_unit(unit, emit), name=f"{self.config.id}/{unit}")
