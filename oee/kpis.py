"""The KPI catalogue: every KPI of a window from its pooled additive components.

One definition for the edge (`edge-agent replay`) and the cloud (`GET /v1/kpis`). Every KPI
is a function of summed components (and of the calendar time of the window), never a mean of
per-bucket values, so the KPIs of a window are the same however it is split into buckets,
shifts, days or machines. A KPI whose denominator is zero is None (undefined), never 0 or 1.

Availability, performance, quality and OEE are those of `oee.components.ratios`; the others:

    nee                   (production_s + setup_s) / planned_busy_s x P x Q
    technical_efficiency  production_s / (production_s + downtime_s)
    setup_ratio           setup_s / (production_s + setup_s)
    scrap_ratio           scrap / produced
    rework_ratio          rework / produced
    first_pass_yield      good / produced (good = produced - scrap - rework, oee.quantities)
    loading               planned_busy_s / calendar_s
    teep                  OEE x loading
    failures              fault_stops (a count; never None)
    micro_stops           micro_stops (a count; never None)
    mtbf_s                production_s / failures
    mttr_s                fault_s / failures
    throughput_per_hour   produced / (production_s / 3600)

`calendar_s` is the calendar time the window covers: its length for one equipment, the sum of
the equipment's calendars for several (None: not known, so loading and TEEP are None).

Each KPI has one direction (`better`): "higher" or "lower" is better. Losses are lower-is-better
(setup, scrap and rework ratios, failures, micro-stops, MTTR); the others are higher-is-better.
Targets are judged by it (oee.targets.judge), in API answers and in the dashboard alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from oee.components import Components, ratios

KpiValue = float | int | None
Better = Literal["higher", "lower"]


@dataclass(frozen=True)
class KpiDefinition:
    """One KPI: its name in answers, formula as documented, ISO 22400-2 name, unit, and
    whether a higher or a lower value is better."""

    name: str
    formula: str
    iso_name: str | None
    unit: str
    better: Better = "higher"


KPI_DEFINITIONS: tuple[KpiDefinition, ...] = (
    KpiDefinition("availability", "production_s / planned_busy_s", "Availability (A)", "ratio"),
    KpiDefinition("performance", "ideal_produced_s / production_s", "Effectiveness (E)", "ratio"),
    KpiDefinition("quality", "ideal_good_s / ideal_produced_s", "Quality ratio (QR)", "ratio"),
    KpiDefinition("oee", "ideal_good_s / planned_busy_s (= A x P x Q)", "OEE index", "ratio"),
    KpiDefinition("nee", "(production_s + setup_s) / planned_busy_s x P x Q", "NEE index", "ratio"),
    KpiDefinition(
        "technical_efficiency",
        "production_s / (production_s + downtime_s)",
        "Technical efficiency (TE)",
        "ratio",
    ),
    KpiDefinition("setup_ratio", "setup_s / (production_s + setup_s)", None, "ratio", "lower"),
    KpiDefinition("scrap_ratio", "scrap / produced", "Scrap ratio", "ratio", "lower"),
    KpiDefinition("rework_ratio", "rework / produced", "Rework ratio", "ratio", "lower"),
    KpiDefinition("first_pass_yield", "good / produced", "First pass yield (FPY)", "ratio"),
    KpiDefinition("loading", "planned_busy_s / calendar_s", None, "ratio"),
    KpiDefinition("teep", "OEE x loading", None, "ratio"),
    KpiDefinition("failures", "fault_stops", "Failure events (FE)", "count", "lower"),
    KpiDefinition("micro_stops", "micro_stops", None, "count", "lower"),
    KpiDefinition(
        "mtbf_s",
        "production_s / failures",
        "Mean operating time between failures (MTBF)",
        "seconds",
    ),
    KpiDefinition(
        "mttr_s", "fault_s / failures", "Mean time to restoration (MTTR)", "seconds", "lower"
    ),
    KpiDefinition(
        "throughput_per_hour", "produced / (production_s / 3600)", "Throughput rate", "parts/h"
    ),
)
KPI_NAMES: tuple[str, ...] = tuple(d.name for d in KPI_DEFINITIONS)
BETTER: dict[str, Better] = {d.name: d.better for d in KPI_DEFINITIONS}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def kpis(c: Components, calendar_s: float | None = None) -> dict[str, KpiValue]:
    """Every KPI of KPI_NAMES, in that order, from the pooled components of a window."""
    r = ratios(c)
    p, q = r.performance, r.quality
    utilization = _ratio(c.production_s + c.setup_s, c.planned_busy_s)
    nee = None if utilization is None or p is None or q is None else utilization * p * q
    loading = None if calendar_s is None else _ratio(c.planned_busy_s, calendar_s)
    teep = None if r.oee is None or loading is None else r.oee * loading
    failures = c.fault_stops
    hours = c.production_s / 3600
    return {
        "availability": r.availability,
        "performance": p,
        "quality": q,
        "oee": r.oee,
        "nee": nee,
        "technical_efficiency": _ratio(c.production_s, c.production_s + c.downtime_s),
        "setup_ratio": _ratio(c.setup_s, c.production_s + c.setup_s),
        "scrap_ratio": _ratio(c.scrap, c.produced),
        "rework_ratio": _ratio(c.rework, c.produced),
        "first_pass_yield": _ratio(c.good, c.produced),
        "loading": loading,
        "teep": teep,
        "failures": failures,
        "micro_stops": c.micro_stops,
        "mtbf_s": _ratio(c.production_s, failures),
        "mttr_s": _ratio(c.fault_s, failures),
        "throughput_per_hour": _ratio(c.produced, hours),
    }


def pooled_kpis(
    parts: Iterable[tuple[Components, float | None]],
) -> dict[str, KpiValue]:
    """KPIs of several windows together: components and calendars summed, then divided (a
    calendar of None in any part makes the whole one unknown)."""
    items = list(parts)
    calendar: float | None = 0.0
    for _, part in items:
        calendar = None if calendar is None or part is None else calendar + part
    return kpis(Components.pool(c for c, _ in items), calendar)


def select(names: Iterable[str] | None) -> tuple[str, ...]:
    """The KPI names asked for, in catalogue order (None or empty: all); ValueError names an
    unknown one."""
    if names is None:
        return KPI_NAMES
    wanted = {n.strip() for n in names if n.strip()}
    unknown = sorted(wanted - set(KPI_NAMES))
    if unknown:
        # Shown escaped and cut: the names come from a request.
        shown = ", ".join(repr(n[:40]) for n in unknown[:3])
        raise ValueError(f"unknown KPI {shown}; known: {', '.join(KPI_NAMES)}")
    return tuple(n for n in KPI_NAMES if n in wanted) if wanted else KPI_NAMES
