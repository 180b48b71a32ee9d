"""The Sample: one value of one equipment signal, as read from a PLC."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal


@dataclass(frozen=True, slots=True)
class Sample:
    equipment_id: str
    signal: str
    value: bool | int | float | str | None
    ts: datetime
    quality: Literal["good", "bad"] = "good"
