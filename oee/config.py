"""The OEE-relevant configuration: the shift calendar and each equipment's spec.

These dataclasses are part of the agent's YAML (the agent composes them) and of `replay`;
their durations are `common.duration.Duration`. pydantic validates them from the file
(`common.checks`); built directly, they take values already of their types, and
`EquipmentSpec` checks what makes a spec unusable (states, counters, products) itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import time
from typing import Annotated, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from common.checks import FORBID, After, Before, Check
from common.duration import Duration
from oee.bounds import MAX_ID_CHARS, MAX_TEXT_CHARS, clean_text
from oee.events import STATES
from oee.quantities import counter_model_error

# Longer ideal cycle times are typing errors; the bound keeps ideal times of counted parts finite.
MAX_CYCLE_SECONDS = 86_400.0
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _parse_clock(value: object) -> time:
    if isinstance(value, time):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 06:00 as the sexagesimal number 360 (minutes).
        hours, minutes = divmod(value, 60)
        if hours < 24:
            return time(hours, minutes)
    if isinstance(value, str):
        match = re.fullmatch(r"(\d{1,2}):(\d{2})", value.strip())
        if match and int(match.group(1)) <= 24 and int(match.group(2)) < 60:
            hours, minutes = int(match.group(1)), int(match.group(2))
            return time(0, 0) if hours == 24 and minutes == 0 else time(hours % 24, minutes)
    raise ValueError(f'invalid time of day {value!r}: use "HH:MM" in quotes, e.g. "06:00"')


ClockTime = Annotated[time, Before(_parse_clock)]


@dataclass(kw_only=True)
class BreakSpec:
    """A planned break inside a shift, in the plant's local time."""

    __pydantic_config__: ClassVar[dict[str, object]] = FORBID
    start: ClockTime
    end: ClockTime


@dataclass(kw_only=True)
class ShiftSpec:
    """A shift in the plant's local time; `end` <= `start` means it ends the next day."""

    __pydantic_config__: ClassVar[dict[str, object]] = FORBID
    name: Annotated[EventText, Check(min_length=1)]
    start: ClockTime
    end: ClockTime
    days: list[Weekday] = field(default_factory=lambda: list(WEEKDAYS))
    breaks: list[BreakSpec] = field(default_factory=list)


def _check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown IANA time zone {value!r} (e.g. Europe/Berlin)") from exc
    return value


TimeZoneName = Annotated[str, Before(_check_timezone)]


@dataclass(kw_only=True)
class CounterSpec:
    """How a cumulative PLC counter behaves: bit width, signedness, plausibility bound."""

    __pydantic_config__: ClassVar[dict[str, object]] = FORBID
    width: Literal[8, 16, 32, 64] = 32
    signed: bool = False
    max_delta: Annotated[int | None, Check(gt=0)] = None


def _cycle_time(value: float) -> float:
    if value <= 0:
        raise ValueError("ideal_cycle_time must be greater than zero")
    if value > MAX_CYCLE_SECONDS:
        raise ValueError("ideal_cycle_time must be at most 24h")
    return value


CycleTime = Annotated[Duration, After(_cycle_time)]


@dataclass(kw_only=True)
class ProductSpec:
    __pydantic_config__: ClassVar[dict[str, object]] = FORBID
    ideal_cycle_time: CycleTime


def _code_key(raw: object) -> str:
    """PLC codes as map keys: 1, 1.0 and "1" are the same code; text is cleaned (clean_text)."""
    if isinstance(raw, bool) or (isinstance(raw, float) and raw.is_integer()):
        return clean_text(str(int(raw)))
    return clean_text(str(raw)).strip()


def _code_map(value: object) -> object:
    if isinstance(value, dict):
        return {_code_key(k): v for k, v in value.items()}
    return value


def _event_text(value: str) -> str:
    """A configured name that events carry (reason, product, shift) fits them as it is."""
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(f"{value[:20]!r}... is longer than {MAX_TEXT_CHARS} characters")
    if clean_text(value) != value:
        raise ValueError(f"{value!r} holds control characters")
    return value


EventText = Annotated[str, After(_event_text)]
CodeMap = Annotated[dict[str, EventText], Before(_code_map)]


def _known_states(value: dict[str, str]) -> None:
    for raw, state in value.items():
        if state not in STATES or state == "unknown":
            allowed = ", ".join(s for s in STATES if s != "unknown")
            raise ValueError(f"unknown state {state!r} for value {raw}: use one of {allowed}")


@dataclass(kw_only=True)
class EquipmentSpec:
    """What the OEE engine needs to know about one piece of equipment."""

    __pydantic_config__: ClassVar[dict[str, object]] = FORBID
    id: Annotated[str, Check(min_length=1, max_length=MAX_ID_CHARS)]
    line: str | None = None
    ideal_cycle_time: CycleTime
    micro_stop_threshold: Duration | None = None
    micro_stops: Literal["performance", "availability"] = "performance"
    state_map: CodeMap
    reason_map: CodeMap = field(default_factory=dict)
    scrap_reason_map: CodeMap = field(default_factory=dict)
    product_map: CodeMap = field(default_factory=dict)
    products: dict[EventText, ProductSpec] = field(default_factory=dict)
    counters: dict[Literal["total_count", "good_count", "scrap_count", "rework_count"], CounterSpec]

    def __post_init__(self) -> None:
        # Checked however the spec is made (validated from a file, or built from an
        # equipment's configuration): each is a spec the engine could not count with.
        _known_states(self.state_map)
        for name in self.products:
            _event_text(name)
        problem = counter_model_error(self.counters)
        if problem is not None:
            raise ValueError(problem)
        for code, product in self.product_map.items():
            if product not in self.products:
                raise ValueError(f"product {product!r} (value {code}) has no entry under products")

    def code(self, raw: object) -> str:
        return _code_key(raw)

    def cycle_time(self, product: str | None) -> float:
        if product is not None and product in self.products:
            return self.products[product].ideal_cycle_time
        return self.ideal_cycle_time
