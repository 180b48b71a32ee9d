"""The engine on hand-built timelines, including the oee.com example shift."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from common.checks import validate, validated
from connectors.sample import Sample
from oee.calendar import ShiftCalendar
from oee.components import Components
from oee.config import BreakSpec, CounterSpec, EquipmentSpec, ShiftSpec
from oee.engine import EquipmentEngine
from oee.events import AgentEvent, OeeEvent

T0 = datetime(2026, 1, 5, 5, 0, tzinfo=UTC)  # a Monday; 06:00 in Berlin (UTC+1)


def spec(**extra: object) -> EquipmentSpec:
    base: dict[str, object] = {
        "id": "press-1",
        "ideal_cycle_time": 1.0,
        "state_map": {0: "idle", 1: "running", 2: "fault", 3: "setup", 4: "planned_stop"},
        "counters": {"total_count": CounterSpec(width=32), "scrap_count": CounterSpec(width=32)},
    }
    base.update(extra)
    return validate(EquipmentSpec, base)


def oee_com_calendar() -> ShiftCalendar:
    shift = validated(
        ShiftSpec,
        name="early",
        start="06:00",  # type: ignore[arg-type]
        end="14:00",  # type: ignore[arg-type]
        breaks=[
            validated(BreakSpec, start="09:00", end="09:15"),
            validated(BreakSpec, start="11:30", end="12:00"),
            validated(BreakSpec, start="12:45", end="13:00"),
        ],
    )
    return ShiftCalendar([shift], "Europe/Berlin")


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def pooled(events: list[object]) -> Components:
    return Components.pool(e.components for e in events if isinstance(e, OeeEvent))


def test_oee_com_shift() -> None:
    engine = EquipmentEngine(spec(), oee_com_calendar(), agent_id="a", site_id="s")
    events: list[object] = []
    events += engine.start(at(0))
    events += engine.feed(Sample("press-1", "total_count", 1000, at(0)))
    events += engine.feed(Sample("press-1", "scrap_count", 50, at(0)))
    events += engine.feed(Sample("press-1", "state", 1, at(0)))
    events += engine.feed(Sample("press-1", "state", 2, at(60)))  # 47 min fault
    events += engine.feed(Sample("press-1", "state", 1, at(107)))
    events += engine.feed(Sample("press-1", "total_count", 1000 + 19271, at(470)))
    events += engine.feed(Sample("press-1", "scrap_count", 50 + 423, at(470)))
    events += engine.finish(at(480))
    c = pooled(events)
    assert c.planned_busy_s == pytest.approx(420 * 60)
    assert c.production_s == pytest.approx(373 * 60)
    assert c.downtime_s == pytest.approx(47 * 60)
    assert c.off_plan_s == pytest.approx(60 * 60)
    assert (c.produced, c.scrap, c.good) == (19271, 423, 18848)
    r = c.ratios()
    assert r.availability == pytest.approx(0.888095, abs=1e-6)
    assert r.performance == pytest.approx(0.861081, abs=1e-6)
    assert r.quality == pytest.approx(0.978050, abs=1e-6)
    assert r.oee == pytest.approx(0.747937, abs=1e-6)
    buckets = [e for e in events if isinstance(e, OeeEvent)]
    assert all(b.bucket_end - b.bucket_start <= timedelta(minutes=1) for b in buckets)


def test_undefined_ratios_are_null() -> None:
    assert Components().ratios().oee is None
    r = Components(planned_busy_s=10, unknown_s=10).ratios()
    assert (r.availability, r.performance, r.quality, r.oee) == (0.0, None, None, 0.0)


def test_counter_wrap_reset_and_restart_without_phantom_delta() -> None:
    cal = ShiftCalendar([validated(ShiftSpec, name="all", start="00:00", end="00:00")], "UTC")
    s = spec(counters={"total_count": CounterSpec(width=16)})
    engine = EquipmentEngine(s, cal, agent_id="a", site_id="s")
    events: list[object] = []
    events += engine.feed(Sample("press-1", "state", 1, at(0)))
    events += engine.feed(Sample("press-1", "total_count", 65530, at(0)))
    events += engine.feed(Sample("press-1", "total_count", 4, at(1)))  # wrap: +10
    snapshot = engine.checkpoint()
    restarted = EquipmentEngine(s, cal, agent_id="a", site_id="s")
    restarted.restore(snapshot)
    events += restarted.feed(Sample("press-1", "total_count", 9, at(2)))  # +5, not 9
    events += restarted.feed(Sample("press-1", "total_count", 2, at(3)))  # reset: +2
    events += restarted.finish(at(4))
    assert pooled(events).produced == 17
    codes = [e.code for e in events if isinstance(e, AgentEvent)]
    assert codes == ["counter_wrap", "counter_reset"]


def test_micro_stops_both_settings() -> None:
    cal = ShiftCalendar([validated(ShiftSpec, name="all", start="00:00", end="00:00")], "UTC")
    results = {}
    for mode in ("performance", "availability"):
        engine = EquipmentEngine(
            spec(micro_stop_threshold="2m", micro_stops=mode), cal, agent_id="a", site_id="s"
        )
        events: list[object] = []
        events += engine.feed(Sample("press-1", "state", 1, at(0)))
        events += engine.feed(Sample("press-1", "state", 2, at(0.5)))  # 2 min exactly: micro
        events += engine.tick(at(1.9))
        events += engine.feed(Sample("press-1", "state", 1, at(2.5)))
        events += engine.feed(Sample("press-1", "state", 0, at(3)))  # 3 min: a real stop
        events += engine.feed(Sample("press-1", "state", 1, at(6)))
        events += engine.finish(at(7))
        results[mode] = pooled(events)
    perf, avail = results["performance"], results["availability"]
    assert perf.production_s == pytest.approx(240)  # 0.5 + 2 (micro) + 0.5 + 1 min
    assert avail.production_s == pytest.approx(120)
    assert perf.downtime_s == pytest.approx(180)
    assert avail.downtime_s == pytest.approx(300)
    assert perf.micro_stop_s == avail.micro_stop_s == pytest.approx(120)
    assert perf.planned_busy_s == avail.planned_busy_s == pytest.approx(420)


def test_calendar_dst_days_and_night_shifts() -> None:
    whole_day = validated(ShiftSpec, name="all", start="00:00", end="00:00")
    cal = ShiftCalendar([whole_day], "Europe/Berlin")
    spring = cal.window_at(datetime(2026, 3, 29, 12, 0, tzinfo=UTC))
    autumn = cal.window_at(datetime(2026, 10, 25, 12, 0, tzinfo=UTC))
    assert spring.end - spring.start == timedelta(hours=23)
    assert autumn.end - autumn.start == timedelta(hours=25)
    night = validated(ShiftSpec, name="night", start="22:00", end="06:00")
    cal = ShiftCalendar([night], "Europe/Berlin")
    w = cal.window_at(datetime(2026, 10, 25, 2, 0, tzinfo=UTC))
    assert (w.shift, w.start, w.end) == (
        "night",
        datetime(2026, 10, 24, 20, 0, tzinfo=UTC),  # 22:00 CEST
        datetime(2026, 10, 25, 5, 0, tzinfo=UTC),  # 06:00 CET: 9 hours
    )


def test_off_plan_windows_span_weekends_and_empty_calendars() -> None:
    weekdays = validated(
        ShiftSpec,
        name="day",
        start="06:00",  # type: ignore[arg-type]
        end="14:00",  # type: ignore[arg-type]
        days=["mon", "tue", "wed", "thu", "fri"],
    )
    cal = ShiftCalendar([weekdays], "UTC")
    w = cal.window_at(datetime(2026, 1, 10, 12, 0, tzinfo=UTC))  # Saturday
    assert (w.shift, w.start, w.end) == (
        None,
        datetime(2026, 1, 9, 14, 0, tzinfo=UTC),
        datetime(2026, 1, 12, 6, 0, tzinfo=UTC),
    )
    empty = ShiftCalendar([], "Asia/Kolkata").window_at(
        datetime(2026, 1, 10, 12, 0, 30, tzinfo=UTC)
    )
    # Without shifts the window is bounded at UTC midnights, which every bucket edge divides.
    assert (empty.start, empty.end) == (
        datetime(2026, 1, 10, tzinfo=UTC),
        datetime(2026, 1, 11, tzinfo=UTC),
    )


def test_performance_above_one_is_flagged_with_the_suspected_cycle_time() -> None:
    cal = ShiftCalendar(
        [validated(ShiftSpec, name="early", start="06:00", end="07:00")],
        "UTC",
    )
    engine = EquipmentEngine(spec(ideal_cycle_time=2.0), cal, agent_id="a", site_id="s")
    t = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)
    events: list[object] = []
    events += engine.feed(Sample("press-1", "state", 1, t))
    events += engine.feed(Sample("press-1", "total_count", 0, t))
    events += engine.feed(Sample("press-1", "total_count", 3000, t + timedelta(minutes=50)))
    events += engine.tick(t + timedelta(hours=1))
    flags = [e for e in events if isinstance(e, AgentEvent) and e.code == "performance_above_one"]
    assert len(flags) == 1
    assert flags[0].equipment_id == "press-1"
    assert flags[0].data["performance"] == pytest.approx(6000 / 3600)
    assert flags[0].data["suspected_ideal_cycle_time_s"] == pytest.approx(1.2)
    assert pooled(events).ratios().performance == pytest.approx(6000 / 3600)  # not clamped


def test_noisy_inputs_raise_one_event_per_episode() -> None:
    cal = ShiftCalendar([validated(ShiftSpec, name="all", start="00:00", end="00:00")], "UTC")
    engine = EquipmentEngine(spec(), cal, agent_id="a", site_id="s")
    events: list[object] = []
    for second in range(10):  # an unmapped state polled at 1 Hz
        events += engine.feed(Sample("press-1", "state", 7, at(second / 60)))
    events += engine.feed(Sample("press-1", "total_count", 100, at(1)))
    for second in range(5):  # a source clock that jumped back
        events += engine.feed(Sample("press-1", "total_count", 50, at(0.5 + second / 60)))
    codes = [e.code for e in events if isinstance(e, AgentEvent)]
    assert codes == ["unmapped_state", "sample_stale"]


def test_checkpoint_of_another_version_is_refused() -> None:
    cal = ShiftCalendar([], "UTC")
    engine = EquipmentEngine(spec(), cal, agent_id="a", site_id="s")
    snapshot = engine.checkpoint()
    snapshot["version"] = 1
    with pytest.raises(ValueError, match="checkpoint version"):
        EquipmentEngine(spec(), cal, agent_id="a", site_id="s").restore(snapshot)


def test_restart_gap_is_unknown_time_and_counts_once() -> None:
    cal = ShiftCalendar([validated(ShiftSpec, name="all", start="00:00", end="00:00")], "UTC")
    engine = EquipmentEngine(spec(), cal, agent_id="a", site_id="s")
    events: list[object] = []
    events += engine.feed(Sample("press-1", "state", 1, at(0)))
    events += engine.feed(Sample("press-1", "total_count", 100, at(0)))
    events += engine.tick(at(10))
    restarted = EquipmentEngine(spec(), cal, agent_id="a", site_id="s")
    restarted.restore(json.loads(json.dumps(engine.checkpoint())))
    # What agent/runtime.py does: the time it was down is unknown, from the cursor on.
    assert restarted.cursor is not None
    events += restarted.mark_unknown(restarted.cursor, "agent restarted")
    events += restarted.feed(Sample("press-1", "state", 1, at(15)))
    events += restarted.feed(Sample("press-1", "total_count", 130, at(15)))
    events += restarted.finish(at(20))
    c = pooled(events)
    assert (c.production_s, c.unknown_s, c.planned_busy_s) == (900.0, 300.0, 1200.0)
    assert c.produced == 30


def test_implausible_jump_is_quarantined_and_reported() -> None:
    cal = ShiftCalendar([validated(ShiftSpec, name="all", start="00:00", end="00:00")], "UTC")
    s = spec(counters={"total_count": CounterSpec(width=32, max_delta=1000)})
    engine = EquipmentEngine(s, cal, agent_id="a", site_id="s")
    events: list[object] = []
    events += engine.feed(Sample("press-1", "state", 1, at(0)))
    events += engine.feed(Sample("press-1", "total_count", 100, at(0)))
    events += engine.feed(Sample("press-1", "total_count", 900_000, at(1)))  # a glitch
    events += engine.feed(Sample("press-1", "total_count", 900_040, at(2)))  # +40 from there
    events += engine.finish(at(3))
    assert pooled(events).produced == 40
    quarantined = [e for e in events if isinstance(e, AgentEvent)]
    assert [(e.code, e.data["current"]) for e in quarantined] == [("counter_quarantined", 900_000)]


def test_unusable_checkpoint_entry_starts_that_equipment_afresh() -> None:
    from oee.engine import PlantEngine

    cal = ShiftCalendar([validated(ShiftSpec, name="all", start="00:00", end="00:00")], "UTC")
    good = EquipmentEngine(spec(), cal, agent_id="a", site_id="s")
    good.feed(Sample("press-1", "total_count", 100, at(0)))
    good.tick(at(1))  # the clock passed the scan: applied
    other = spec(id="press-2")
    plant = PlantEngine([spec(), other], cal, agent_id="a", site_id="s")
    problems = plant.restore({"press-1": good.checkpoint(), "press-2": {"version": 1}, "gone": {}})
    assert list(problems) == ["press-2"]
    assert plant.engines["press-1"].counters == {"total_count": 100}
    assert plant.engines["press-2"].counters == {}
    events = plant.feed(Sample("press-2", "state", 1, at(1))) + plant.tick(at(2))  # it works
    assert any(getattr(e, "state", None) == "running" for e in events)


def test_restart_inside_a_bucket_that_began_mid_bucket_continues_that_bucket() -> None:
    # An agent started at 00:00:20 (its first bucket is [00:00:20, 00:01:00)) and killed at
    # 00:00:40 restarts at 00:02:00: the bucket it had open goes on, and the buckets tile
    # the timeline, each with its whole length in its time classes.
    cal = ShiftCalendar([validated(ShiftSpec, name="all", start="00:00", end="00:00")], "UTC")
    start = T0 + timedelta(seconds=20)
    engine = EquipmentEngine(spec(), cal, agent_id="a", site_id="s")
    events: list[object] = list(engine.start(start))
    events += engine.feed(Sample("press-1", "state", 1, start))
    events += engine.tick(start + timedelta(seconds=20))
    restarted = EquipmentEngine(spec(), cal, agent_id="a", site_id="s")
    restarted.restore(json.loads(json.dumps(engine.checkpoint())))
    assert restarted.cursor is not None
    events += restarted.mark_unknown(restarted.cursor, "agent restarted")
    events += restarted.start(T0 + timedelta(minutes=2))
    events += restarted.feed(Sample("press-1", "state", 1, T0 + timedelta(minutes=2)))
    events += restarted.tick(T0 + timedelta(minutes=3))
    buckets = sorted((e for e in events if isinstance(e, OeeEvent)), key=lambda e: e.bucket_start)
    assert [(b.bucket_start, b.bucket_end) for b in buckets] == [
        (start, T0 + timedelta(minutes=1)),
        (T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)),
        (T0 + timedelta(minutes=2), T0 + timedelta(minutes=3)),
    ]
    for b in buckets:
        c = b.components
        length = (b.bucket_end - b.bucket_start).total_seconds()
        assert c.planned_busy_s + c.planned_down_s + c.off_plan_s == pytest.approx(length)
    assert (buckets[0].components.production_s, buckets[0].components.unknown_s) == (20.0, 20.0)
