"""Targets for OEE and the other KPIs of oee.kpis: what a target set may hold, and which one
applies to an equipment (the most specific scope wins: equipment > line > site).

The agent's YAML and the cloud's API validate target sets here, so a target that one accepts
the other accepts too. `judge` says whether a value meets its target by the KPI's direction
(oee.kpis: a higher OEE is better, a lower scrap ratio is), for every answer that carries a
target.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from common.checks import After
from oee.kpis import BETTER, KPI_DEFINITIONS, KPI_NAMES, KpiValue

_UNITS = {d.name: d.unit for d in KPI_DEFINITIONS}
# A target above this is a typing error whatever the unit (a year in seconds, parts per hour
# of the fastest machines, failures in a window).
MAX_TARGET = 1e9


def target_error(kpi: str, value: object) -> str | None:
    """Why `value` cannot be the target of `kpi`, or None when it can."""
    if kpi not in _UNITS:
        return f"unknown KPI {kpi[:40]!r}; known: {', '.join(KPI_NAMES)}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"the target of {kpi} must be a number"
    if not math.isfinite(value) or value < 0:
        return f"the target of {kpi} must be a finite number >= 0"
    if _UNITS[kpi] == "ratio" and value > 1:
        return f"{kpi} is a ratio: write its target as a fraction (0.85 for 85 %), got {value}"
    if value > MAX_TARGET:
        return f"the target of {kpi} must be at most {MAX_TARGET:g}"
    return None


def check_targets(value: dict[str, float]) -> dict[str, float]:
    """A target set {kpi: value}; ValueError names the first bad entry."""
    for kpi, target in value.items():
        problem = target_error(kpi, target)
        if problem is not None:
            raise ValueError(problem)
    return {k: float(v) for k, v in value.items()}


TargetSet = Annotated[dict[str, float], After(check_targets)]


def effective(layers: Iterable[Mapping[str, float] | None]) -> dict[str, float]:
    """The targets in force from `layers`, least specific first (site, line, equipment): a
    KPI takes its target from the most specific layer that sets it."""
    out: dict[str, float] = {}
    for layer in layers:
        if layer:
            out.update(layer)
    return {k: out[k] for k in KPI_NAMES if k in out}


def meets(kpi: str, value: KpiValue, target: float) -> bool | None:
    """Whether `value` of `kpi` meets `target`: at or above it for a higher-is-better KPI, at
    or below it for a lower-is-better one; None when the value is undefined."""
    if value is None:
        return None
    return value >= target if BETTER[kpi] == "higher" else value <= target


def judge(values: Mapping[str, KpiValue], targets: Mapping[str, float]) -> dict[str, Any]:
    """Per KPI of `targets` that `values` shows: {target, better, met} (see `meets`)."""
    return {
        kpi: {
            "target": target,
            "better": BETTER[kpi],
            "met": meets(kpi, values[kpi], target),
        }
        for kpi, target in targets.items()
        if kpi in values
    }
