"""The configuration of one Modbus TCP connection (a `connections:` entry with type modbus)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from connectors.duration import Duration


class ModbusConnection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    type: Literal["modbus"] = "modbus"
    host: str
    port: int = Field(default=502, ge=1, le=65535)
    poll_interval: Duration = 1.0
    timeout: Duration = 2.0
    retries: int = Field(default=1, ge=0, le=10)
    addressing: Literal[0, 1] = Field(
        default=0, description="0: addresses as sent on the wire; 1: 1-based (PLC manuals)"
    )
    max_gap: int = Field(default=10, ge=0, le=120)
    reconnect_max: Duration = 30.0
