"""The KPI catalogue (oee.kpis): each formula on hand-computed components, each null rule, and
pooling: the KPIs of any split of a window, pooled, are those of the whole window (a mean of
the parts' KPIs is not)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.sample import Sample
from oee.components import Components
from oee.kpis import KPI_DEFINITIONS, KPI_NAMES, kpis, pooled_kpis, select
from tests.oee.test_properties import END, START, WINDOW_MS, replay, timelines

# One shift of 8 h (28,800 s of calendar) with 7 h planned: 6 h running, 20 min setup,
# 30 min of faults in 3 failures, 10 min idle; 20,000 parts of 1 s ideal (of which 400 scrap
# and 100 rework), 2 micro-stops.
SHIFT = Components(
    planned_busy_s=25_200,
    production_s=21_600,
    setup_s=1_200,
    downtime_s=2_400,
    fault_s=1_800,
    idle_s=600,
    planned_down_s=0,
    off_plan_s=3_600,
    produced=20_000,
    good=19_500,
    scrap=400,
    rework=100,
    ideal_produced_s=20_000,
    ideal_good_s=19_500,
    fault_stops=3,
    micro_stops=2,
)
CALENDAR = 28_800.0


def test_every_kpi_by_hand() -> None:
    k = kpis(SHIFT, CALENDAR)
    assert list(k) == list(KPI_NAMES)
    a, p, q = 21_600 / 25_200, 20_000 / 21_600, 19_500 / 20_000
    expected: dict[str, Any] = {
        "availability": 0.857142857142857,
        "performance": 0.925925925925926,
        "quality": 0.975,
        "oee": 0.773809523809524,  # 19,500 / 25,200
        "nee": 0.816798941798942,  # 22,800 / 25,200 = 0.904762 x P x Q
        "technical_efficiency": 0.9,  # 21,600 / 24,000
        "setup_ratio": 0.052631578947368,  # 1,200 / 22,800
        "scrap_ratio": 0.02,
        "rework_ratio": 0.005,
        "first_pass_yield": 0.975,
        "loading": 0.875,  # 25,200 / 28,800
        "teep": 0.677083333333333,  # 0.773809... x 0.875
        "failures": 3,
        "micro_stops": 2,
        "mtbf_s": 7_200.0,  # 6 h of production / 3 failures
        "mttr_s": 600.0,  # 30 min of faults / 3
        "throughput_per_hour": 3_333.333333333333,  # 20,000 parts in 6 h of production
    }
    assert a * p * q == pytest.approx(k["oee"])
    for name, value in expected.items():
        assert k[name] == pytest.approx(value, abs=1e-12), name
    assert isinstance(k["failures"], int) and isinstance(k["micro_stops"], int)


def test_mixed_products_first_pass_yield_counts_parts_quality_weights_ideal_time() -> None:
    # 100 parts of 1 s (10 scrap) and 100 of 3 s (all good): Q weights by ideal time.
    c = Components(
        planned_busy_s=600, production_s=500, produced=200, good=190, scrap=10,
        ideal_produced_s=400, ideal_good_s=390,
    )  # fmt: skip
    k = kpis(c)
    assert k["first_pass_yield"] == pytest.approx(0.95)
    assert k["quality"] == pytest.approx(390 / 400)
    assert k["scrap_ratio"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("change", "calendar", "nulls"),
    [
        # no planned busy time: A, OEE, NEE and TEEP are undefined (loading is 0)
        (
            {"planned_busy_s": 0, "production_s": 0, "setup_s": 0, "downtime_s": 0,
             "fault_s": 0, "idle_s": 0, "ideal_produced_s": 0, "ideal_good_s": 0,
             "produced": 0, "good": 0, "scrap": 0, "rework": 0, "fault_stops": 0},
            CALENDAR,
            {"availability", "performance", "quality", "oee", "nee", "technical_efficiency",
             "setup_ratio", "scrap_ratio", "rework_ratio", "first_pass_yield", "teep",
             "mtbf_s", "mttr_s", "throughput_per_hour"},
        ),
        # no production time: P, NEE, MTBF stay defined only where their denominator is
        (
            {"production_s": 0, "downtime_s": 24_000, "fault_s": 23_400,
             "ideal_produced_s": 0, "ideal_good_s": 0, "produced": 0, "good": 0, "scrap": 0,
             "rework": 0},
            CALENDAR,
            {"performance", "quality", "nee", "scrap_ratio", "rework_ratio",
             "first_pass_yield", "throughput_per_hour"},
        ),
        # nothing produced: quality-side KPIs undefined, P = 0 (not null)
        (
            {"produced": 0, "good": 0, "scrap": 0, "rework": 0, "ideal_produced_s": 0,
             "ideal_good_s": 0},
            CALENDAR,
            {"quality", "nee", "scrap_ratio", "rework_ratio", "first_pass_yield"},
        ),
        # no failures: MTBF and MTTR undefined, failures is 0
        ({"fault_stops": 0}, CALENDAR, {"mtbf_s", "mttr_s"}),
        # no running and no setup: setup ratio and technical efficiency need time
        (
            {"production_s": 0, "setup_s": 0, "downtime_s": 0, "fault_s": 0, "idle_s": 0,
             "unknown_s": 25_200, "ideal_produced_s": 0, "ideal_good_s": 0, "produced": 0,
             "good": 0, "scrap": 0, "rework": 0, "fault_stops": 0},
            CALENDAR,
            {"performance", "quality", "nee", "technical_efficiency", "setup_ratio",
             "scrap_ratio", "rework_ratio", "first_pass_yield", "mtbf_s", "mttr_s",
             "throughput_per_hour"},
        ),
        # calendar unknown or zero: loading and TEEP undefined
        ({}, None, {"loading", "teep"}),
        ({}, 0.0, {"loading", "teep"}),
    ],
    ids=[
        "no_planned_busy_time", "no_production", "nothing_produced", "no_failures",
        "no_running_nor_setup", "calendar_unknown", "calendar_zero",
    ],
)  # fmt: skip
def test_null_exactly_where_a_denominator_is_zero(
    change: dict[str, float], calendar: float | None, nulls: set[str]
) -> None:
    c = dataclasses.replace(SHIFT, **change)
    k = kpis(c, calendar)
    assert {n for n, v in k.items() if v is None} == nulls
    assert k["failures"] == c.fault_stops and k["micro_stops"] == c.micro_stops


def test_no_production_gives_zero_not_null_where_defined() -> None:
    c = dataclasses.replace(SHIFT, production_s=0, downtime_s=24_000, fault_s=23_400)
    k = kpis(c, CALENDAR)
    assert k["availability"] == 0
    assert k["technical_efficiency"] == 0
    assert k["mtbf_s"] == 0
    assert k["mttr_s"] == pytest.approx(23_400 / 3)
    assert k["setup_ratio"] == 1


def test_select_names_in_catalogue_order() -> None:
    assert select(None) == KPI_NAMES
    assert select(["mttr_s", "oee", " "]) == ("oee", "mttr_s")
    assert select([]) == KPI_NAMES
    with pytest.raises(ValueError, match="unknown KPI 'mtbf'"):
        select(["mtbf", "oee"])
    assert [d.name for d in KPI_DEFINITIONS] == list(KPI_NAMES)
    assert len(set(KPI_NAMES)) == len(KPI_NAMES)


# -- pooling ----------------------------------------------------------------------------------


@st.composite
def bucket_components(draw: st.DrawFn) -> tuple[Components, float]:
    """A plausible bucket of 1 to 60 s: its time classes tile it, good = produced - scrap
    - rework, ideal times from a cycle time of 0.5 to 3 s."""
    # Whole microseconds, as the engine accounts them.
    length_us = draw(st.integers(1, 60)) * 1_000_000
    planned_us = draw(st.integers(0, length_us))
    cuts = sorted(draw(st.integers(0, planned_us)) for _ in range(3))
    edges = [0, *cuts, planned_us]
    production, setup, fault, idle = ((hi - lo) / 1e6 for lo, hi in itertools.pairwise(edges))
    length, planned = length_us / 1e6, planned_us / 1e6
    produced = draw(st.integers(0, 120))
    scrap = draw(st.integers(0, produced))
    rework = draw(st.integers(0, produced - scrap))
    good = produced - scrap - rework
    cycle = draw(st.sampled_from((0.5, 1.0, 1.5, 3.0)))
    c = Components(
        planned_busy_s=planned, production_s=production, setup_s=setup,
        downtime_s=fault + idle, fault_s=fault, idle_s=idle, off_plan_s=length - planned,
        produced=produced, good=good, scrap=scrap, rework=rework,
        ideal_produced_s=produced * cycle, ideal_good_s=good * cycle,
        fault_stops=draw(st.integers(0, 2)), micro_stops=draw(st.integers(0, 2)),
    )  # fmt: skip
    return c, length


def same_kpis(a: dict[str, Any], b: dict[str, Any]) -> None:
    for name in KPI_NAMES:
        if a[name] is None or b[name] is None:
            assert a[name] is None and b[name] is None, name
        else:
            assert a[name] == pytest.approx(b[name], rel=1e-9, abs=1e-9), name


@settings(max_examples=300, deadline=None)
@given(st.lists(bucket_components(), min_size=1, max_size=40), st.data())
def test_pooling_any_split_gives_the_whole_window(
    buckets: list[tuple[Components, float]], data: st.DataObject
) -> None:
    whole = kpis(Components.pool(c for c, _ in buckets), math.fsum(length for _, length in buckets))
    # Any split into consecutive parts (shifts, days) and any regrouping (machines).
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(buckets) - 1)), max_size=5)))
    bounds = [0, *[c for c in cuts if c < len(buckets)], len(buckets)]
    parts = [buckets[i:j] for i, j in itertools.pairwise(bounds) if i < j]
    part_totals = [
        (Components.pool(c for c, _ in part), math.fsum(length for _, length in part))
        for part in parts
    ]
    same_kpis(pooled_kpis(part_totals), whole)
    shuffled = data.draw(st.permutations(part_totals))
    same_kpis(pooled_kpis(shuffled), whole)


def test_a_mean_of_the_parts_kpis_is_not_the_window_kpi() -> None:
    """Two halves of a shift that differ in every denominator: every ratio KPI of the window
    differs from the mean of the halves' values (the pooled one is the right one)."""
    first = Components(
        planned_busy_s=3_600, production_s=3_000, setup_s=300, downtime_s=300, fault_s=300,
        produced=3_000, good=2_900, scrap=100, ideal_produced_s=2_700, ideal_good_s=2_610,
        fault_stops=1,
    )  # fmt: skip
    second = Components(
        planned_busy_s=1_800, production_s=600, setup_s=0, downtime_s=1_200, fault_s=1_200,
        off_plan_s=5_400, produced=400, good=300, scrap=50, rework=50, ideal_produced_s=360,
        ideal_good_s=270, fault_stops=2,
    )  # fmt: skip
    halves = [kpis(first, 3_600), kpis(second, 7_200)]
    whole = pooled_kpis([(first, 3_600), (second, 7_200)])
    assert whole == kpis(first + second, 10_800)
    for name in KPI_NAMES:
        if name in ("failures", "micro_stops"):
            assert whole[name] == halves[0][name] + halves[1][name]  # type: ignore[operator]
            continue
        mean = (halves[0][name] + halves[1][name]) / 2  # type: ignore[operator]
        assert whole[name] != pytest.approx(mean, rel=1e-3), name
    # e.g. MTBF: 3,600 s of production over 3 failures, not the mean of 3,000 and 300
    assert whole["mtbf_s"] == pytest.approx(1_200.0)
    assert whole["mttr_s"] == pytest.approx(500.0)  # 1,500 s of faults / 3, not 300
    assert whole["availability"] == pytest.approx(3_600 / 5_400)
    assert whole["loading"] == pytest.approx(0.5)  # not the mean of 1.0 and 0.25


@settings(max_examples=60, deadline=None)
@given(timelines(), st.sampled_from(("performance", "availability")), st.data())
def test_replay_windows_split_anywhere_pool_to_the_whole_window_kpis(
    samples: list[Sample], mode: str, data: st.DataObject
) -> None:
    """On engine output: stops (failures, micro-stops) crossing a cut are counted once, in
    the window holding their start, so pooled KPIs of the parts equal the whole's."""
    cut = START + timedelta(milliseconds=data.draw(st.integers(1, WINDOW_MS - 1)))
    window_s = (END - START).total_seconds()
    whole = kpis(replay(samples, START, END, mode), window_s)
    parts = [
        (replay(samples, START, cut, mode), (cut - START).total_seconds()),
        (replay(samples, cut, END, mode), (END - cut).total_seconds()),
    ]
    same_kpis(pooled_kpis(parts), whole)
