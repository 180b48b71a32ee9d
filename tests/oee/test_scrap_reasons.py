"""Quality by reason: scrap is attributed to the scrap reason in force when the scrap counter
increments (the engine fed samples; the count events carry the reason)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from common.checks import validate, validated
from connectors.sample import Sample
from oee.calendar import ShiftCalendar
from oee.config import CounterSpec, EquipmentSpec, ShiftSpec
from oee.engine import EquipmentEngine
from oee.events import CountEvent, Event, OeeEvent

T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)
ALL_DAY = ShiftCalendar([validated(ShiftSpec, name="all", start="00:00", end="00:00")], "UTC")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def engine() -> EquipmentEngine:
    spec = validate(
        EquipmentSpec,
        {
            "id": "press-1",
            "ideal_cycle_time": 1.0,
            "state_map": {0: "idle", 1: "running"},
            "scrap_reason_map": {1: "burr", 2: "crack"},
            "counters": {n: CounterSpec() for n in ("total_count", "scrap_count")},
        },
    )
    return EquipmentEngine(spec, ALL_DAY, agent_id="a", site_id="s", bucket_seconds=60)


def feed(eng: EquipmentEngine, samples: list[tuple[float, str, object]]) -> list[Event]:
    events: list[Event] = []
    for seconds, signal, value in samples:
        events += eng.feed(Sample("press-1", signal, value, at(seconds)))  # type: ignore[arg-type]
    return events


def scrap_by_reason(events: list[Event]) -> dict[str | None, int]:
    out: dict[str | None, int] = {}
    for e in events:
        if isinstance(e, CountEvent) and e.scrap:
            out[e.scrap_reason] = out.get(e.scrap_reason, 0) + e.scrap
    return out


BASE: list[tuple[float, str, object]] = [
    (0, "state", 1),
    (0, "total_count", 0),
    (0, "scrap_count", 0),
]


def test_scrap_goes_to_the_reason_in_force_when_the_counter_increments() -> None:
    eng = engine()
    events = list(eng.start(at(0)))
    events += feed(
        eng,
        [
            *BASE,
            (10, "total_count", 10),
            (10, "scrap_count", 2),  # no reason yet
            (20, "scrap_reason", 1),
            (30, "total_count", 20),
            (30, "scrap_count", 5),  # +3 burr
            # The reason and the increment in one scan: the reason applies first.
            (40, "scrap_reason", 2),
            (40, "scrap_count", 9),  # +4 crack
            (50, "scrap_reason", 0),  # 0: no reason
            (55, "scrap_count", 10),  # +1 none
        ],
    )
    events += eng.finish(at(120))
    assert scrap_by_reason(events) == {None: 3, "burr": 3, "crack": 4}
    # The increment of total parts carries no reason: it counts no scrap.
    total_only = [e for e in events if isinstance(e, CountEvent) and e.produced and not e.scrap]
    assert total_only and all(e.scrap_reason is None for e in total_only)
    buckets = [e for e in events if isinstance(e, OeeEvent)]
    assert sum(b.components.scrap for b in buckets) == 10


def test_the_scrap_reason_survives_a_restart_and_maps_unknown_codes() -> None:
    eng = engine()
    events = list(eng.start(at(0)))
    events += feed(eng, [*BASE, (5, "scrap_reason", 1)])
    events += eng.tick(at(6))
    saved = eng.checkpoint()
    again = engine()
    again.restore(saved)
    events = feed(again, [(10, "scrap_count", 2), (20, "scrap_reason", 7), (30, "scrap_count", 3)])
    events += again.finish(at(60))
    assert scrap_by_reason(events) == {"burr": 2, "code 7": 1}


def test_prime_learns_the_scrap_reason_before_the_window() -> None:
    eng = engine()
    for seconds, signal, value in [*BASE, (1, "scrap_reason", "Riss")]:
        eng.prime(Sample("press-1", signal, value, at(seconds)))  # type: ignore[arg-type]
    events: list[Event] = list(eng.start(at(2)))
    events += feed(eng, [(10, "scrap_count", 4)])
    events += eng.finish(at(60))
    # A PLC writing its reasons as text needs no map.
    assert scrap_by_reason(events) == {"Riss": 4}


def test_without_a_scrap_reason_signal_count_events_carry_none() -> None:
    spec: dict[str, Any] = {
        "id": "press-1",
        "ideal_cycle_time": 1.0,
        "state_map": {1: "running"},
        "counters": {n: CounterSpec() for n in ("total_count", "scrap_count")},
    }
    eng = EquipmentEngine(
        validate(EquipmentSpec, spec), ALL_DAY, agent_id="a", site_id="s", bucket_seconds=60
    )
    events = list(eng.start(at(0)))
    events += feed(eng, [*BASE, (10, "total_count", 5), (10, "scrap_count", 1)])
    events += eng.finish(at(60))
    assert scrap_by_reason(events) == {None: 1}
