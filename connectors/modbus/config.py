"""The configuration of one Modbus connection: TCP (`type: modbus`) or RTU over a serial line
(`type: modbus-rtu`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from common.checks import FORBID, Check
from common.duration import Duration


@dataclass(kw_only=True)
class _ModbusCommon:
    __pydantic_config__: ClassVar[dict[str, object]] = FORBID

    id: Annotated[str, Check(min_length=1)]
    poll_interval: Duration = 1.0
    timeout: Duration = 2.0  # per request and unit
    retries: Annotated[int, Check(ge=0, le=10)] = 1
    # 0: addresses as sent on the wire; 1: 1-based (PLC manuals)
    addressing: Literal[0, 1] = 0
    # false: one request per tag, for devices that reject reads spanning several of their
    # variables
    coalesce: bool = True
    max_gap: Annotated[int, Check(ge=0, le=120)] = 10
    max_registers: Annotated[int, Check(ge=1, le=125)] = 125  # per read request
    reconnect_max: Duration = 30.0
    # a unit that does not answer is probed at most this rarely
    unit_backoff_max: Duration = 30.0


@dataclass(kw_only=True)
class ModbusConnection(_ModbusCommon):
    """Modbus TCP. With `connection_per_unit` (default) each unit gets its own TCP connection,
    so a unit that never answers cannot hold up requests to the others."""

    type: Literal["modbus"] = "modbus"
    host: str
    port: Annotated[int, Check(ge=1, le=65535)] = 502
    connection_per_unit: bool = True


@dataclass(kw_only=True)
class ModbusRtuConnection(_ModbusCommon):
    """Modbus RTU on a serial line: one request at a time on the bus, so a unit that does not
    answer is marked unavailable and only probed again after a backoff."""

    type: Literal["modbus-rtu"] = "modbus-rtu"
    port: Annotated[str, Check(min_length=1)]  # serial device, e.g. /dev/ttyUSB0
    baudrate: Annotated[int, Check(ge=300, le=921600)] = 19200
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "E"
    stopbits: Literal[1, 2] = 1
    timeout: Duration = 0.5
