"""Durations: one grammar for every duration in the YAML files and on the command lines.

A duration is a number of seconds (`1`, `0.5`) or one or more parts `<number><unit>`
(`500ms`, `1.5s`, `5m`, `5min`, `2h`, `30d`, `1w`, `1h30m`), spaces allowed between parts and
between a number and its unit; units are ms, s, m or min (minutes), h, d, w and are read in
any case. Never negative, always finite. Models use `Duration` (seconds, a float); the cloud's
token lifetimes use `parse_timedelta`.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Annotated

from common.checks import Before

UNIT_SECONDS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86_400.0,
    "w": 7 * 86_400.0,
}
_NUMBER = r"\d+(?:\.\d+)?"
# `min` before `m` and `ms` before `m`: the longest unit wins.
_PART = re.compile(rf"({_NUMBER})\s*(ms|min|s|m|h|d|w)", re.IGNORECASE)
_PLAIN = re.compile(rf"^\s*({_NUMBER})\s*$")
_PARTS = re.compile(rf"^\s*(?:{_NUMBER}\s*(?:ms|min|s|m|h|d|w)\s*)+$", re.IGNORECASE)
HINT = "use a number of seconds or parts such as 500ms, 1.5s, 5min, 2h, 30d, 1h30m"


class DurationError(ValueError):
    """Not a duration of this grammar (the message says what is wrong and what is valid)."""


def parse_duration(value: object) -> float:
    """A duration (see the module docstring) -> seconds."""
    if isinstance(value, bool):
        raise DurationError(f"invalid duration {value!r}: {HINT}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (plain := _PLAIN.match(value)):
        seconds = float(plain.group(1))
    elif isinstance(value, str) and _PARTS.match(value):
        seconds = sum(float(n) * UNIT_SECONDS[u.lower()] for n, u in _PART.findall(value))
    else:
        raise DurationError(f"invalid duration {value!r}: {HINT}")
    if math.isnan(seconds) or math.isinf(seconds):
        raise DurationError(f"invalid duration {value!r}: a duration must be finite")
    if seconds < 0:
        raise DurationError("a duration cannot be negative")
    return seconds


def parse_timedelta(value: object) -> timedelta:
    """A duration as a timedelta (to the microsecond)."""
    return timedelta(seconds=parse_duration(value))


Duration = Annotated[float, Before(parse_duration)]
"""A field type: a duration in the YAML, seconds (float) in the dataclass."""

__all__ = ["HINT", "UNIT_SECONDS", "Duration", "DurationError", "parse_duration", "parse_timedelta"]
