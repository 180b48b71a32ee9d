"""Command-line value types with the limits the agent's configuration has (ports, Modbus unit
ids, durations), so a command refuses on its command line what the agent would refuse."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from common.duration import parse_duration
from oee.config import MAX_CYCLE_SECONDS

# Modbus unit ids of devices: 0 is the broadcast address (no device answers a read), 248..255
# are reserved.
MAX_UNIT_ID = 247
MAX_PORT = 65535


def whole_number(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be {low}..{high}, got {value}")
        return value

    return parse


def duration(low: float, high: float, what: str) -> Callable[[str], float]:
    """'2s', '500ms', '1.5' (seconds), ... within (low, high] seconds."""

    def parse(text: str) -> float:
        try:
            value = parse_duration(text.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if not low < value <= high:
            raise argparse.ArgumentTypeError(
                f"{what} must be more than {low:g} s and at most {high:g} s, got {text}"
            )
        return value

    return parse


def factor(low: float, high: float, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low < value <= high:
            raise argparse.ArgumentTypeError(
                f"{what} must be more than {low:g} and at most {high:g}, got {text}"
            )
        return value

    return parse


port = whole_number(1, MAX_PORT, "a TCP port")
cycle_time = duration(0.0, MAX_CYCLE_SECONDS, "a cycle time")
time_scale = factor(0.0, 1000.0, "the time scale")
