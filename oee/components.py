"""Additive OEE components and the one place where ratios are computed from them.

Every level (bucket, shift, day, machine, line, site) stores or sums these components;
ratios are derived from sums at read time and never averaged.

Both are plain dataclasses: `Components(...)` checks its bounds (oee.checking), and where
untrusted input enters pydantic validates it into the same class (ingest, the cloud's reads).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.checks import FORBID
from oee.bounds import BoundedFloat, BoundedInt
from oee.checking import checked

TIME_FIELDS: tuple[str, ...] = (
    "planned_busy_s",
    "production_s",
    "setup_s",
    "downtime_s",
    "fault_s",
    "idle_s",
    "micro_stop_s",
    "unknown_s",
    "planned_down_s",
    "off_plan_s",
)
QUANTITY_FIELDS: tuple[str, ...] = ("produced", "good", "scrap", "rework", "off_plan_produced")
IDEAL_FIELDS: tuple[str, ...] = ("ideal_produced_s", "ideal_good_s")
# Stops counted in the bucket where they start (oee.engine): failures and micro-stops.
STOP_FIELDS: tuple[str, ...] = ("fault_stops", "micro_stops")
INTEGER_FIELDS: tuple[str, ...] = QUANTITY_FIELDS + STOP_FIELDS
COMPONENT_FIELDS: tuple[str, ...] = TIME_FIELDS + QUANTITY_FIELDS + IDEAL_FIELDS + STOP_FIELDS


@checked
@dataclass(frozen=True)
class Components:
    """Additive quantities of one window; `+` pools two windows exactly.

    `downtime_s` = `fault_s` + `idle_s` (micro-stops counted as downtime included);
    `micro_stop_s` is the part of the stops judged micro-stops, whichever class they went to.
    `fault_stops` counts the fault stops whose time is fault downtime (failures), `micro_stops`
    the stops judged micro-stops (whichever class their time went to); each stop is counted
    once, in the bucket where it starts. Events of earlier agents have neither: zero.
    """

    __pydantic_config__ = FORBID

    planned_busy_s: BoundedFloat = 0.0
    production_s: BoundedFloat = 0.0
    setup_s: BoundedFloat = 0.0
    downtime_s: BoundedFloat = 0.0
    fault_s: BoundedFloat = 0.0
    idle_s: BoundedFloat = 0.0
    micro_stop_s: BoundedFloat = 0.0
    unknown_s: BoundedFloat = 0.0
    planned_down_s: BoundedFloat = 0.0
    off_plan_s: BoundedFloat = 0.0
    produced: BoundedInt = 0
    good: BoundedInt = 0
    scrap: BoundedInt = 0
    rework: BoundedInt = 0
    off_plan_produced: BoundedInt = 0
    ideal_produced_s: BoundedFloat = 0.0
    ideal_good_s: BoundedFloat = 0.0
    fault_stops: BoundedInt = 0
    micro_stops: BoundedInt = 0

    def __add__(self, other: Components) -> Components:
        return Components(
            **{name: getattr(self, name) + getattr(other, name) for name in COMPONENT_FIELDS}
        )

    @classmethod
    def pool(cls, parts: Iterable[Components]) -> Components:
        total = cls()
        for part in parts:
            total = total + part
        return total

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> Components:
        """Build from a row of sums (missing or NULL columns count as zero)."""
        values: dict[str, Any] = {}
        for name in COMPONENT_FIELDS:
            raw = row.get(name)
            if raw is None:
                continue
            values[name] = int(raw) if name in INTEGER_FIELDS else float(raw)
        return cls(**values)

    def ratios(self) -> Ratios:
        return ratios(self)

    def as_dict(self) -> dict[str, Any]:
        """The fields by name, in order (what the JSON of an event or an answer holds)."""
        return dict(self.__dict__)


@dataclass(frozen=True, slots=True)
class Ratios:
    """A, P, Q and OEE; None where the ratio is undefined (never 0 or 1 by default)."""

    __pydantic_config__ = FORBID

    availability: float | None
    performance: float | None
    quality: float | None
    oee: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "availability": self.availability,
            "performance": self.performance,
            "quality": self.quality,
            "oee": self.oee,
        }


def ratios(c: Components) -> Ratios:
    """ISO 22400 ratios from additive components (see OEE.md, Formulas).

    A = APT/PBT, P = ideal_produced/APT, Q = ideal_good/ideal_produced, OEE = ideal_good/PBT.
    Performance is never clamped.
    """
    availability, performance, quality, oee = ratio_values(c)
    return Ratios(availability=availability, performance=performance, quality=quality, oee=oee)


def ratio_values(
    c: Components,
) -> tuple[float | None, float | None, float | None, float | None]:
    """(availability, performance, quality, oee) of `ratios`, without building the model
    (read APIs render many of them per answer)."""
    pbt = c.planned_busy_s
    apt = c.production_s
    availability = apt / pbt if pbt > 0 else None
    performance = c.ideal_produced_s / apt if apt > 0 else None
    if c.produced > 0 and c.ideal_produced_s > 0:
        quality: float | None = c.ideal_good_s / c.ideal_produced_s
    elif c.produced > 0:
        quality = c.good / c.produced
    else:
        quality = None
    oee = c.ideal_good_s / pbt if pbt > 0 else None
    return availability, performance, quality, oee


@dataclass(frozen=True, slots=True)
class PerformanceExcess:
    """Performance above 1: the configured ideal cycle time is probably too long."""

    performance: float
    # The mean cycle time actually achieved bounds the true ideal cycle time from above.
    suspected_ideal_cycle_time_s: float | None


def performance_excess(
    ideal_produced: float, production: float, produced: int, *, unit: float = 1.0
) -> PerformanceExcess | None:
    """The excess when ideal time of the parts produced exceeds the production time, else None.

    `ideal_produced` and `production` share one unit, `unit` of them make a second (the engine
    sums microseconds); the engine's shift check and replay's window check both ask here.
    """
    if production <= 0:
        return None
    performance = ideal_produced / production
    if performance <= 1:
        return None
    suspected = production / produced / unit if produced else None
    return PerformanceExcess(performance, suspected)
