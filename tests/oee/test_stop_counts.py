"""Stops counted by the engine: each fault stop (failure) and each micro-stop once, in the
bucket where it starts (or, for a stop starting outside planned time, where its first second
of planned busy time is), whatever buckets, breaks and shift edges it crosses."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from common.checks import validate, validated
from connectors.sample import Sample
from oee.calendar import ShiftCalendar
from oee.components import Components
from oee.config import BreakSpec, EquipmentSpec, ShiftSpec
from oee.engine import EquipmentEngine
from oee.events import OeeEvent
from oee.kpis import kpis

T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)  # a Monday, shift start
RUNNING, FAULT, IDLE, PLANNED = 1, 2, 0, 4


def calendar() -> ShiftCalendar:
    shifts = [
        validated(
            ShiftSpec,
            name="early",
            start="06:00",  # type: ignore[arg-type]
            end="08:00",  # type: ignore[arg-type]
            breaks=[validated(BreakSpec, start="07:00", end="07:15")],
        ),
        validated(ShiftSpec, name="late", start="08:00", end="10:00"),
    ]
    return ShiftCalendar(shifts, "UTC")


def engine(**extra: object) -> EquipmentEngine:
    spec = validate(
        EquipmentSpec,
        {
            "id": "press-1",
            "ideal_cycle_time": 1.0,
            "state_map": {0: "idle", 1: "running", 2: "fault", 3: "setup", 4: "planned_stop"},
            "counters": {"total_count": {}},
            **extra,
        },
    )
    return EquipmentEngine(spec, calendar(), agent_id="a", site_id="s")


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def run(eng: EquipmentEngine, states: list[tuple[float, int]], end: float) -> list[OeeEvent]:
    events = eng.start(at(0))
    for minute, value in states:
        events += eng.feed(Sample("press-1", "state", value, at(minute)))
        events += eng.tick(at(minute))
    events += eng.finish(at(end))
    return [e for e in events if isinstance(e, OeeEvent)]


def counted(buckets: list[OeeEvent]) -> dict[str, tuple[int, int]]:
    """Bucket start (HH:MM) -> (fault_stops, micro_stops), for buckets counting any stop."""
    return {
        b.bucket_start.strftime("%H:%M"): (b.components.fault_stops, b.components.micro_stops)
        for b in buckets
        if b.components.fault_stops or b.components.micro_stops
    }


def test_a_fault_is_counted_once_in_the_bucket_where_it_starts() -> None:
    buckets = run(
        engine(),
        [
            (0, RUNNING),
            (10.5, FAULT),  # 06:10:30 to 06:13:20, across three bucket edges
            (13 + 1 / 3, RUNNING),
            (20, IDLE),  # an idle stop is no failure
            (21, RUNNING),
            (59.5, FAULT),  # 06:59:30 to 07:16: across the break, counted once
            (76, RUNNING),
            (118, FAULT),  # 07:58 to 08:03: across the shift edge, counted once
            (123, RUNNING),
        ],
        end=180,
    )
    assert counted(buckets) == {"06:10": (1, 0), "06:59": (1, 0), "07:58": (1, 0)}
    c = Components.pool(b.components for b in buckets)
    # 170 s + 30 s + 60 s (the break is off plan) + 300 s of faults in 3 failures
    assert c.fault_s == pytest.approx(170 + 30 + 60 + 300)
    k = kpis(c)
    assert k["failures"] == 3
    assert k["mttr_s"] == pytest.approx(560 / 3)
    assert k["mtbf_s"] == pytest.approx(c.production_s / 3)


def test_a_stop_starting_outside_planned_time_counts_where_planned_time_begins() -> None:
    buckets = run(
        engine(),
        [(0, RUNNING), (65, FAULT), (78, RUNNING), (100, PLANNED), (101, FAULT), (102, RUNNING)],
        end=120,
    )
    # 07:05 in the break: counted at 07:15, its first planned second. A fault right after a
    # planned stop starts in planned busy time: counted where it starts.
    assert counted(buckets) == {"07:15": (1, 0), "07:41": (1, 0)}


def test_micro_stops_counted_apart_and_failures_follow_the_time_model() -> None:
    timeline = [
        (0, RUNNING),
        (10 + 40 / 60, FAULT),  # 06:10:40 to 06:11:20: a micro-fault across a bucket edge
        (11 + 20 / 60, RUNNING),
        (20, IDLE),  # 06:20 to 06:21: a micro idle stop
        (21, RUNNING),
        (30, FAULT),  # 06:30 to 06:33: longer than the threshold, a failure
        (33, RUNNING),
        (40, FAULT),  # 06:40 to 06:42: exactly the threshold, a micro-stop (inclusive)
        (42, RUNNING),
    ]
    perf = run(engine(micro_stop_threshold=120.0, micro_stops="performance"), timeline, 60)
    # Classic: micro-stop time is production time, so a micro-fault is no failure.
    assert counted(perf) == {"06:10": (0, 1), "06:20": (0, 1), "06:30": (1, 0), "06:40": (0, 1)}
    c = Components.pool(b.components for b in perf)
    assert c.fault_s == pytest.approx(180)
    assert kpis(c)["mttr_s"] == pytest.approx(180)

    iso = run(engine(micro_stop_threshold=120.0, micro_stops="availability"), timeline, 60)
    # ISO: micro-stops stay downtime, so a micro-fault's time is fault time and a failure.
    assert counted(iso) == {"06:10": (1, 1), "06:20": (0, 1), "06:30": (1, 0), "06:40": (1, 1)}
    c = Components.pool(b.components for b in iso)
    assert c.fault_s == pytest.approx(40 + 180 + 120)
    assert kpis(c)["failures"] == 3
    assert kpis(c)["mttr_s"] == pytest.approx(340 / 3)
    assert kpis(c)["micro_stops"] == 3


def test_a_restart_in_the_middle_of_a_stop_counts_it_once() -> None:
    """From a checkpoint (through JSON) taken while a stop waits to be judged, the stop is
    counted once, in its start bucket, exactly as without the restart."""
    timeline = [(0, RUNNING), (10.5, FAULT), (11.5, RUNNING), (30, FAULT), (35, RUNNING)]
    extra = {"micro_stop_threshold": 120.0}
    clean = run(engine(**extra), timeline, 60)

    first = engine(**extra)
    events = first.start(at(0))
    for minute, value in timeline[:2]:
        events += first.feed(Sample("press-1", "state", value, at(minute)))
        events += first.tick(at(minute))
    events += first.tick(at(11))
    saved = json.loads(json.dumps(first.checkpoint()))
    second = engine(**extra)
    second.restore(saved)
    for minute, value in timeline[2:]:
        events += second.feed(Sample("press-1", "state", value, at(minute)))
        events += second.tick(at(minute))
    events += second.finish(at(60))
    restarted = [e for e in events if isinstance(e, OeeEvent)]
    assert counted(restarted) == counted(clean) == {"06:10": (0, 1), "06:30": (1, 0)}
