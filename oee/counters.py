"""Cumulative PLC counters to part-count deltas: width, sign, wrap, reset, plausibility."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from oee.config import CounterSpec

DeltaKind = Literal["baseline", "normal", "wrap", "reset", "quarantined"]

# More parts than this between two readings is implausible for any machine: quarantined even
# without a configured max_delta (a 64-bit counter reset to a huge value, a corrupt reading).
MAX_COUNTER_DELTA = 2**32


@dataclass(frozen=True)
class CounterDelta:
    delta: int
    kind: DeltaKind
    previous: int | None
    current: int


def counter_delta(spec: CounterSpec, previous: int | None, current_raw: int) -> CounterDelta:
    """The parts counted between two readings of one counter (see OEE.md, Quantities).

    Values are compared in the unsigned domain of the counter's width, so a signed 16-bit
    counter going 32767 -> -32768 is one part, not a reset.
    """
    modulus = 1 << spec.width
    limit = min(spec.max_delta or MAX_COUNTER_DELTA, MAX_COUNTER_DELTA)
    current = int(current_raw) % modulus
    if previous is None:
        return CounterDelta(0, "baseline", None, current)
    d = current - previous
    if d >= 0:
        if d > limit:
            return CounterDelta(0, "quarantined", previous, current)
        return CounterDelta(d, "normal", previous, current)
    # Wrap is plausible only when the previous value was in the top quarter of the range and
    # the new one is in the bottom quarter; anything else is a reset (PLC restart, job change).
    if previous >= modulus - modulus // 4 and current < modulus // 4:
        wrapped = d + modulus
        if wrapped > limit:
            return CounterDelta(0, "quarantined", previous, current)
        return CounterDelta(wrapped, "wrap", previous, current)
    if current > limit:
        return CounterDelta(0, "quarantined", previous, current)
    return CounterDelta(current, "reset", previous, current)
