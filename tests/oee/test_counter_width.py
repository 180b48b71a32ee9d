"""A counter whose width the PLC declares after the engine started (an OPC UA node's DataType):
its stored reading keeps the width it was taken at until the next one, across checkpoints."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from common.checks import validate, validated
from connectors.sample import Sample
from oee.calendar import ShiftCalendar
from oee.config import CounterSpec, EquipmentSpec, ShiftSpec
from oee.engine import EquipmentEngine
from oee.events import AgentEvent, CountEvent, Event

T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)
CALENDAR = ShiftCalendar([validated(ShiftSpec, name="day", start="00:00", end="00:00")], "UTC")


def engine(width: int) -> EquipmentEngine:
    spec = validate(
        EquipmentSpec,
        {
            "id": "press-1",
            "ideal_cycle_time": 1.0,
            "state_map": {1: "running"},
            "counters": {"total_count": CounterSpec(width=width)},  # type: ignore[arg-type]
        },
    )
    eng = EquipmentEngine(spec, CALENDAR, agent_id="a", site_id="s")
    eng.start(T0)
    eng.feed(Sample("press-1", "state", 1, T0))
    return eng


def count(eng: EquipmentEngine, events: list[Event], value: int, second: int) -> None:
    at = T0 + timedelta(seconds=second)
    events += eng.feed(Sample("press-1", "total_count", value, at))
    events += eng.tick(at + timedelta(milliseconds=500))  # the agent's flush applies the scan


def produced(events: list[Event]) -> int:
    return sum(e.produced for e in events if isinstance(e, CountEvent))


def counter_events(events: list[Event]) -> list[str]:
    return [e.code for e in events if isinstance(e, AgentEvent) and e.code.startswith("counter")]


def test_declared_width_counts_past_16_bits() -> None:
    eng = engine(16)
    eng.set_counter("total_count", CounterSpec(width=32))
    events: list[Event] = []
    for second, value in enumerate((65_000, 65_530, 90_000, 90_001)):
        count(eng, events, value, second + 1)
    assert produced(events) == 25_001
    assert counter_events(events) == []


def test_reading_stored_at_16_bits_is_measured_there_once() -> None:
    # An engine that counted a UInt32 node at 16 bits stored 70_000 as 4_464. When the node's
    # width becomes known, the next step is measured at 16 bits (10 parts, not 65_546),
    # and from then on at 32.
    old = engine(16)
    count(old, [], 70_000, 1)
    saved = old.checkpoint()
    del saved["counter_widths"]  # a checkpoint written before widths were recorded
    eng = engine(16)
    eng.restore(json.loads(json.dumps(saved)))
    eng.set_counter("total_count", CounterSpec(width=32))
    events: list[Event] = []
    count(eng, events, 70_010, 2)
    count(eng, events, 140_010, 3)
    assert produced(events) == 10 + 70_000
    assert eng.counters["total_count"] == 140_010


def test_restart_keeps_the_declared_width() -> None:
    # After a restart the configured width applies until the PLC declares it again; the
    # checkpoint says the stored reading was taken at 32 bits, so nothing is re-measured.
    first = engine(16)
    first.set_counter("total_count", CounterSpec(width=32))
    count(first, [], 100_000, 1)
    saved = json.loads(json.dumps(first.checkpoint()))
    assert saved["counter_widths"] == {"total_count": 32}
    for declared_before_the_next_reading in (True, False):
        eng = engine(16)
        eng.restore(saved)
        if declared_before_the_next_reading:
            eng.set_counter("total_count", CounterSpec(width=32))
        events: list[Event] = []
        count(eng, events, 100_050, 2)
        assert produced(events) == 50
        assert counter_events(events) == []
