"""The engine's read API: snapshots of state, shift and counters, and feed() diagnostics."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from common.checks import validate, validated
from connectors.sample import Sample
from oee.calendar import ShiftCalendar
from oee.components import Components, performance_excess
from oee.config import CounterSpec, EquipmentSpec, ShiftSpec
from oee.engine import EquipmentEngine, PlantEngine, from_us, parse_shift_key
from oee.events import OeeEvent

T = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)


def spec(eq: str = "press-1") -> EquipmentSpec:
    return validate(
        EquipmentSpec,
        {
            "id": eq,
            "ideal_cycle_time": "2s",
            "state_map": {0: "idle", 1: "running", 2: "fault"},
            "counters": {"total_count": CounterSpec(), "scrap_count": CounterSpec()},
            "products": {"A-100": {"ideal_cycle_time": "1s"}},
        },
    )


def calendar() -> ShiftCalendar:
    return ShiftCalendar(
        [validated(ShiftSpec, name="early", start="06:00", end="14:00")],
        "UTC",
    )


def at(seconds: float) -> datetime:
    return T + timedelta(seconds=seconds)


def engine() -> EquipmentEngine:
    return EquipmentEngine(spec(), calendar(), agent_id="a", site_id="s")


def test_snapshot_before_anything_is_known() -> None:
    snap = engine().snapshot()
    assert (snap.equipment_id, snap.state, snap.state_since, snap.cursor) == (
        "press-1",
        "unknown",
        None,
        None,
    )
    assert (snap.shift, snap.open_bucket, snap.last_closed) == (None, None, None)
    assert snap.state_seconds is None
    assert dict(snap.refused) == {"stale": 0, "duplicate": 0}


def test_snapshot_follows_state_product_counters_and_the_running_shift() -> None:
    e = engine()
    events: list[object] = []
    events += e.feed(Sample("press-1", "product", "A-100", at(0)))
    events += e.feed(Sample("press-1", "total_count", 100, at(0)))
    events += e.feed(Sample("press-1", "state", 1, at(0)))
    events += e.feed(Sample("press-1", "total_count", 130, at(30)))
    events += e.feed(Sample("press-1", "scrap_count", 0, at(30)))
    events += e.tick(at(45))
    snap = e.snapshot()
    assert (snap.state, snap.state_since, snap.product) == ("running", at(0), "A-100")
    assert snap.cursor == at(45)
    assert snap.state_seconds == 45
    assert dict(snap.counters) == {"total_count": 130, "scrap_count": 0}
    assert not snap.stop_pending
    assert snap.shift is not None
    assert (snap.shift.name, snap.shift.start) == ("early", T)
    # No bucket closed yet: the shift-to-date figure is empty, the live one holds the parts.
    assert snap.shift.closed == Components()
    assert snap.shift.ratios.oee is None
    assert (snap.shift.live.produced, snap.shift.live.production_s) == (30, 45)
    assert snap.open_bucket is not None
    assert (snap.open_bucket.start, snap.open_bucket.end) == (at(0), at(60))
    assert snap.last_closed is None

    events += e.tick(at(90))  # the first minute closes
    closed = [ev for ev in events if isinstance(ev, OeeEvent)]
    assert len(closed) == 1
    snap = e.snapshot()
    assert snap.last_closed is not None
    assert snap.last_closed.components == closed[0].components
    assert (snap.last_closed.start, snap.last_closed.end) == (at(0), at(60))
    assert snap.shift is not None
    assert snap.shift.closed == closed[0].components
    assert snap.shift.ratios == closed[0].components.ratios()
    assert snap.shift.live.production_s == 90


def test_snapshot_is_a_frozen_copy() -> None:
    e = engine()
    e.feed(Sample("press-1", "total_count", 5, at(0)))
    e.feed(Sample("press-1", "state", 2, at(0)))
    e.tick(at(10))
    snap = e.snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.state = "running"  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.counters["total_count"] = 0  # type: ignore[index]
    e.feed(Sample("press-1", "total_count", 9, at(20)))
    e.feed(Sample("press-1", "state", 1, at(20)))
    e.tick(at(30))
    assert (snap.state, dict(snap.counters)) == ("fault", {"total_count": 5})
    assert (e.snapshot().state, dict(e.snapshot().counters)) == ("running", {"total_count": 9})


def test_diagnose_says_what_feed_does_and_feed_counts_refusals() -> None:
    e = engine()
    first = Sample("press-1", "state", 1, at(10))
    assert e.diagnose(first) is None
    e.feed(first)
    e.feed(Sample("press-1", "total_count", 1, at(20)))
    e.tick(at(20))

    stale = Sample("press-1", "state", 2, at(5))
    got = e.diagnose(stale)
    assert got is not None
    assert (got.verdict, got.signal, got.ts, got.last, got.ignored) == (
        "stale",
        "state",
        at(5),
        at(10),
        True,
    )
    duplicate = Sample("press-1", "total_count", 1, at(20))
    got = e.diagnose(duplicate)
    assert got is not None
    assert (got.verdict, got.last, got.ignored) == ("duplicate", at(20), True)
    late = Sample("press-1", "state", 2, at(15))
    got = e.diagnose(late)
    assert got is not None
    assert (got.verdict, got.applied_at, got.ignored) == ("late", at(20), False)
    assert e.diagnose(Sample("press-1", "state", 2, at(25))) is None

    before = e.snapshot()
    e.feed(stale)
    e.feed(duplicate)
    e.feed(late)
    after = e.snapshot()
    assert dict(after.refused) == {"stale": 1, "duplicate": 1}
    assert dict(before.refused) == {"stale": 0, "duplicate": 0}
    assert (after.state, after.state_since) == ("fault", at(20))  # late: at the accounted time


def test_plant_snapshots_and_shift_keys() -> None:
    plant = PlantEngine([spec("press-1"), spec("press-2")], calendar(), agent_id="a", site_id="s")
    plant.feed(Sample("press-2", "state", 0, at(0)))
    plant.tick(at(5))
    snaps = plant.snapshots()
    assert list(snaps) == ["press-1", "press-2"]
    assert (snaps["press-1"].state, snaps["press-2"].state) == ("unknown", "idle")
    start_us = 1_767_592_800_000_000
    assert parse_shift_key(f"early@{start_us}") == ("early", from_us(start_us))
    assert parse_shift_key("night@None") == ("night", None)
    assert parse_shift_key("a@b@1") == ("a@b", from_us(1))


def test_performance_excess_is_the_one_check() -> None:
    assert performance_excess(100.0, 100.0, 10) is None
    assert performance_excess(1.0, 0.0, 0) is None
    excess = performance_excess(6000.0, 3600.0, 3000)
    assert excess is not None
    assert excess.performance == pytest.approx(6000 / 3600)
    assert excess.suspected_ideal_cycle_time_s == pytest.approx(1.2)
    in_us = performance_excess(6_000_000_000, 3_600_000_000, 3000, unit=1_000_000)
    assert in_us == excess
