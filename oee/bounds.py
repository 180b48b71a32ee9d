"""Bounds of every value an event may carry, and the cleaning of strings read from PLCs.

Integers stay within +-(2**53 - 1): exact in PostgreSQL's bigint and in every JSON consumer
(a JavaScript number). Floats are finite and within +-1e18. Strings hold no NUL and no lone
surrogate (PostgreSQL's jsonb refuses both) and have a bounded length. A string read from a
PLC is cleaned at the edge before it becomes an event field (`clean_text`): control and other
non-printing characters (Unicode category C*) are removed and it is cut to MAX_TEXT_CHARS.

The bounds are declared once, as `Check(...)` metadata of the fields' types (common.checks):
pydantic applies them where a batch is validated (ingest), and `oee.checking` applies the same
ones in plain Python where the agent makes an event.
"""

from __future__ import annotations

import math
import re
import unicodedata
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from common.checks import After, Check

MAX_INT = 2**53 - 1
MAX_FLOAT = 1e18
MAX_ID_CHARS = 128  # agent, site and equipment ids
MAX_TEXT_CHARS = 200  # PLC strings: reasons, products, raw values; shift names
MAX_CODE_CHARS = 64  # agent event codes, signal names
MAX_MESSAGE_CHARS = 4000
MAX_DATA_KEY_CHARS = 200
MAX_DATA_STRING_CHARS = 4000
MAX_DATA_VALUES = 100_000  # values of one agent event's data, nested ones included
MAX_DATA_DEPTH = 8

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(value: str) -> str:
    if _UNSTORABLE.search(value):
        raise ValueError("text holds a NUL character or a lone surrogate")
    return value


# Checked by pydantic-core itself (a Rust pattern, no Python call per string): NUL fails the
# pattern, and a lone surrogate is not valid UTF-8, so pydantic refuses the string before the
# pattern (`string_unicode`); JSON input with a lone surrogate escape is refused by the
# parser. This keeps length constraints on Text in Rust too; ingest validates every text
# field of every event, and a Python validator per string was about a third of that time.
NO_NUL = r"^[^\x00]*$"
Text = Annotated[str, Check(pattern=NO_NUL)]
BoundedInt = Annotated[int, Check(ge=-MAX_INT, le=MAX_INT)]
BoundedFloat = Annotated[float, Check(allow_inf_nan=False, ge=-MAX_FLOAT, le=MAX_FLOAT)]


class _Aware:
    """Annotated metadata of a datetime that must carry a UTC offset: pydantic's
    `AwareDatetime` (the same check and error) when pydantic builds the schema."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "AWARE"

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        schema = handler(source)
        # The datetime's own schema, inside the validators of the same Annotated (`After`).
        inner = schema
        while inner.get("type") != "datetime" and isinstance(inner.get("schema"), dict):
            inner = inner["schema"]
        if inner.get("type") != "datetime":
            raise TypeError(f"AWARE applies to a datetime, not to {source!r}")
        inner["tz_constraint"] = "aware"
        return schema


AWARE = _Aware()
_ZERO = timedelta(0)


def utc(value: datetime) -> datetime:
    """An aware time in UTC. A time already in UTC (what agents send; from JSON its tzinfo is
    pydantic's own UTC) is kept as it is: the offset check costs a third of astimezone, on
    every event ingest reads."""
    return value if value.utcoffset() == _ZERO else value.astimezone(UTC)


# An event's times: aware, and kept in UTC.
UtcTime = Annotated[datetime, AWARE, After(utc)]


def plain_errors(errors: list[Any]) -> str:
    """pydantic's errors of a list of events in words, `event 2, count.product: ...; ...`,
    with the NUL pattern's refusal said as such (its message names the pattern)."""
    nul = f"String should match pattern '{NO_NUL}'"
    parts = []
    for error in errors:
        loc = list(error.get("loc", ()))
        where = f"event {loc.pop(0)}" if loc and isinstance(loc[0], int) else ""
        path = ".".join(str(part) for part in loc)
        where = ", ".join(w for w in (where, path) if w) or "batch"
        msg = error.get("msg", "")
        if error.get("type") == "string_pattern_mismatch" and msg == nul:
            msg = "text holds a NUL character"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def number_in_bounds(value: float) -> bool:
    """Whether an int or float can be an event field as it is."""
    if isinstance(value, int):
        return -MAX_INT <= value <= MAX_INT
    return math.isfinite(value) and -MAX_FLOAT <= value <= MAX_FLOAT


def int_or_text(value: int) -> int | str:
    """An integer for event data: as a number when in bounds, else its decimal text (a
    64-bit counter reading is exact either way)."""
    return value if -MAX_INT <= value <= MAX_INT else str(value)


def clean_text(value: str) -> str:
    """A PLC string as an event may carry it: without C* characters, at most MAX_TEXT_CHARS."""
    if len(value) <= MAX_TEXT_CHARS and value.isprintable():
        return value  # the common case, without a look at each character
    kept = "".join(c for c in value if not unicodedata.category(c).startswith("C"))
    return kept[:MAX_TEXT_CHARS]


def plc_value(value: bool | int | float | str | None) -> bool | int | float | str | None:
    """A raw PLC value as an event carries it: text cleaned, a number out of bounds (a 64-bit
    counter, NaN, infinity) as its text."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value if number_in_bounds(value) else clean_text(str(value))
    return value


def check_data(data: dict[str, Any]) -> dict[str, Any]:
    """An agent event's data: JSON values within the bounds above."""
    budget = [MAX_DATA_VALUES]
    _check_value(data, 0, budget)
    return data


def _check_value(value: object, depth: int, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"data holds more than {MAX_DATA_VALUES} values")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int | float):
        if not number_in_bounds(value):
            raise ValueError(f"data number {value!r} is out of bounds")
    elif isinstance(value, str):
        _storable(value)
        if len(value) > MAX_DATA_STRING_CHARS:
            raise ValueError(f"data string longer than {MAX_DATA_STRING_CHARS} characters")
    elif isinstance(value, dict | list | tuple):
        if depth >= MAX_DATA_DEPTH:
            raise ValueError(f"data nested deeper than {MAX_DATA_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ValueError("data keys must be strings")
                _storable(key)
                if len(key) > MAX_DATA_KEY_CHARS:
                    raise ValueError(f"data key longer than {MAX_DATA_KEY_CHARS} characters")
                _check_value(item, depth + 1, budget)
        else:
            for item in value:
                _check_value(item, depth + 1, budget)
    else:
        raise ValueError(f"data value of type {type(value).__name__} is not JSON")
