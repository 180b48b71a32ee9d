"""The configuration of one Modbus connection: TCP (`type: modbus`) or RTU over a serial line
(`type: modbus-rtu`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.duration import Duration


class _ModbusCommon(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    poll_interval: Duration = 1.0
    timeout: Duration = Field(default=2.0, description="per request and unit")
    retries: int = Field(default=1, ge=0, le=10)
    addressing: Literal[0, 1] = Field(
        default=0, description="0: addresses as sent on the wire; 1: 1-based (PLC manuals)"
    )
    coalesce: bool = Field(
        default=True,
        description="false: one request per tag, for devices that reject reads "
        "spanning several of their variables",
    )
    max_gap: int = Field(default=10, ge=0, le=120)
    max_registers: int = Field(default=125, ge=1, le=125, description="per read request")
    reconnect_max: Duration = 30.0
    unit_backoff_max: Duration = Field(
        default=30.0, description="a unit that does not answer is probed at most this rarely"
    )


class ModbusConnection(_ModbusCommon):
    """Modbus TCP. With `connection_per_unit` (default) each unit gets its own TCP connection,
    so a unit that never answers cannot hold up requests to the others."""

    type: Literal["modbus"] = "modbus"
    host: str
    port: int = Field(default=502, ge=1, le=65535)
    connection_per_unit: bool = True


class ModbusRtuConnection(_ModbusCommon):
    """Modbus RTU on a serial line: one request at a time on the bus, so a unit that does not
    answer is marked unavailable and only probed again after a backoff."""

    type: Literal["modbus-rtu"] = "modbus-rtu"
    port: str = Field(min_length=1, description="serial device, e.g. /dev/ttyUSB0")
    baudrate: int = Field(default=19200, ge=300, le=921600)
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "E"
    stopbits: Literal[1, 2] = 1
    timeout: Duration = 0.5
