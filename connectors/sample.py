"""The Sample: one value of one equipment signal, as read from a PLC."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal


@dataclass(frozen=True, slots=True)
class Sample:
    """`source_type` is the data type the PLC itself declares for the value (an OPC UA node's
    DataType, in the names the Modbus codec uses: int8, uint8, int16, ..., uint64, float32,
    float64, bool, string), or None when the protocol does not say (Modbus registers are
    untyped). A counter without `type:` takes its width and sign from it."""

    equipment_id: str
    signal: str
    value: bool | int | float | str | None
    ts: datetime
    quality: Literal["good", "bad"] = "good"
    source_type: str | None = None
