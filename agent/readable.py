"""Sizes, durations, ages, rates and names as the agent's commands print them for a person.

Every command that prints a number of bytes or seconds goes through here, so `status`,
`buffer stats` and `check` say "2.0 GiB" and "3 min" alike; `--json` prints the raw numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_DIGITS = re.compile(r"(\d+)")


def size(n: float | None) -> str:
    """1536 -> '1.5 KiB'; binary units, as `df -h` and the outbox quota use."""
    if n is None:
        return "-"
    value = float(n)
    for unit in _BYTE_UNITS:
        if abs(value) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def duration(seconds: float | None) -> str:
    """A span of time: '0.4 s', '45 s', '12 min', '3 h 5 min', '2 d 4 h'."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 120:
        return f"{whole} s"
    if whole < 7200:
        return f"{whole // 60} min"
    if whole < 2 * 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def age(seconds: float | None, *, none: str = "-") -> str:
    """How long ago something happened: '12 min ago'; `none` when it did not happen."""
    if seconds is None:
        return none
    return f"{duration(seconds)} ago"


def rate(per_second: float | None, unit: str = "") -> str:
    """Events per second: '412/s', '3.5/s', '0.20/s'; '-' when unknown."""
    if per_second is None:
        return "-"
    suffix = f" {unit}/s" if unit else "/s"
    if per_second == 0:
        return f"0{suffix}"
    if per_second >= 100:
        return f"{per_second:.0f}{suffix}"
    if per_second >= 1:
        return f"{per_second:.1f}{suffix}"
    return f"{per_second:.2f}{suffix}"


def percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f} %"


def count(n: float | None) -> str:
    """A whole number with thousands separated by a thin space: 2 147 483 648."""
    if n is None:
        return "-"
    return f"{int(n):,}".replace(",", " ")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key so that press-2 comes before press-10 (numbers compare as numbers)."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part.casefold())
        for part in _DIGITS.split(name)
        if part
    )


def natural_sorted(names: Iterable[str]) -> list[str]:
    return sorted(names, key=natural_key)
