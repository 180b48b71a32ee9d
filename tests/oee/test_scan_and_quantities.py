"""One scan is one snapshot; one definition of the quantities; PLC strings and event bounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from common.checks import validate, validated
from connectors.sample import Sample
from oee.bounds import MAX_TEXT_CHARS
from oee.calendar import ShiftCalendar
from oee.components import Components
from oee.config import CounterSpec, EquipmentSpec, ShiftSpec
from oee.engine import EquipmentEngine
from oee.events import (
    AgentEvent,
    CountEvent,
    Event,
    FieldValueError,
    OeeEvent,
    StateEvent,
    dump_events,
    load_events,
)

T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)
ALL_DAY = ShiftCalendar([validated(ShiftSpec, name="all", start="00:00", end="00:00")], "UTC")
STATES = {0: "idle", 1: "running", 2: "fault", 4: "planned_stop"}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def engine(
    counters: tuple[str, ...] = ("total_count", "scrap_count"), width: int = 32, **extra: Any
) -> EquipmentEngine:
    spec = validate(
        EquipmentSpec,
        {
            "id": "press-1",
            "ideal_cycle_time": 1.0,
            "state_map": STATES,
            "reason_map": {1: "no material"},
            "counters": {name: CounterSpec(width=width) for name in counters},  # type: ignore[arg-type]
            **extra,
        },
    )
    return EquipmentEngine(spec, ALL_DAY, agent_id="a", site_id="s", bucket_seconds=60)


def run(eng: EquipmentEngine, samples: list[tuple[float, str, object]], end: float) -> list[Event]:
    events: list[Event] = list(eng.start(at(0)))
    for seconds, signal, value in samples:
        events += eng.feed(Sample("press-1", signal, value, at(seconds)))  # type: ignore[arg-type]
    return events + eng.finish(at(end))


def of(events: list[Event], kind: type[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


MODELS = [
    ("total_count", "scrap_count"),
    ("total_count", "scrap_count", "rework_count"),
    ("total_count", "good_count"),
    ("total_count", "good_count", "rework_count"),
    ("good_count", "scrap_count"),
    ("good_count", "scrap_count", "rework_count"),
    ("total_count",),
    ("good_count",),
]


@pytest.mark.parametrize("counters", MODELS, ids="+".join)
def test_count_events_sum_to_the_buckets_for_every_counter_model(counters: tuple[str, ...]) -> None:
    # 10 parts a minute; a tenth scrap, a twentieth rework; some parts in a planned stop.
    samples: list[tuple[float, str, object]] = [(0, "state", 1)]
    values = dict.fromkeys(counters, 0)
    for minute in range(6):
        if minute == 4:
            samples.append((minute * 60, "state", 4))
        if minute == 5:
            samples.append((minute * 60, "state", 1))
        for name in counters:
            samples.append((minute * 60 + 30, name, values[name]))
        good, scrap, rework = 8, 1, 1
        values = {
            name: values[name]
            + {"total_count": 10, "good_count": good, "scrap_count": scrap, "rework_count": rework}[
                name
            ]
            for name in counters
        }
    events = run(engine(counters), samples, 6 * 60)
    buckets = Components.pool(e.components for e in of(events, OeeEvent))
    counts = of(events, CountEvent)
    in_plan = [e for e in counts if e.in_plan]
    for name in ("produced", "good", "scrap", "rework"):
        assert sum(getattr(e, name) for e in in_plan) == getattr(buckets, name), name
    assert sum(e.produced for e in counts if not e.in_plan) == buckets.off_plan_produced > 0
    assert buckets.produced == buckets.good + buckets.scrap + buckets.rework
    # Each counter's first reading is its baseline: five minutes are counted. Without a
    # total counter, produced is what the other counters count.
    per_minute = (
        10
        if "total_count" in counters
        else sum({"good_count": 8, "scrap_count": 1, "rework_count": 1}[name] for name in counters)
    )
    assert buckets.produced + buckets.off_plan_produced == 5 * per_minute
    in_plan_minutes = 4
    scrap = 1 if "scrap_count" in counters else 0
    if "total_count" in counters and "good_count" in counters:
        scrap = 10 - 8 - (1 if "rework_count" in counters else 0)
    assert buckets.scrap == in_plan_minutes * scrap
    if "rework_count" in counters:
        assert buckets.rework == in_plan_minutes


def test_good_and_scrap_counters_without_total_count_produced() -> None:
    samples: list[tuple[float, str, object]] = [
        (0, "state", 1),
        (0, "good_count", 100),
        (0, "scrap_count", 7),
        (30, "good_count", 140),
        (30, "scrap_count", 9),
    ]
    c = Components.pool(
        e.components for e in of(run(engine(("good_count", "scrap_count")), samples, 60), OeeEvent)
    )
    assert (c.produced, c.good, c.scrap) == (42, 40, 2)
    assert c.ideal_produced_s == 42.0 and c.ideal_good_s == 40.0


@pytest.mark.parametrize(
    "counters", [("scrap_count",), ("rework_count",), ("scrap_count", "rework_count")]
)
def test_counters_that_cannot_give_produced_are_refused(counters: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError, match="produced parts cannot be derived"):
        engine(counters)


@pytest.mark.parametrize("order", [("state", "reason"), ("reason", "state")])
def test_a_stop_carries_the_reason_set_in_the_same_scan_whatever_the_order(
    order: tuple[str, str],
) -> None:
    values = {"state": 2, "reason": 1}
    samples: list[tuple[float, str, object]] = [(0, "state", 1), (0, "reason", 0)]
    samples += [(60, name, values[name]) for name in order]
    samples += [(120, "state", 1), (120, "reason", 0)]
    events = run(engine(), samples, 180)
    stops = [(e.state, e.reason) for e in of(events, StateEvent)]
    assert stops == [("running", None), ("fault", "no material"), ("running", None)]


@pytest.mark.parametrize("order", [("state", "total_count"), ("total_count", "state")])
def test_the_last_part_before_a_planned_stop_read_in_the_stops_scan_is_in_plan(
    order: tuple[str, str],
) -> None:
    # The PLC counts its last part and enters planned_stop between two polls: the part was made
    # while running, so it is in plan whatever the YAML order of the two signals.
    values = {"state": 4, "total_count": 11}
    samples: list[tuple[float, str, object]] = [(0, "state", 1), (0, "total_count", 0)]
    samples += [(30, "total_count", 10)]
    samples += [(60, name, values[name]) for name in order]
    events = run(engine(counters=("total_count",)), samples, 120)
    buckets = of(events, OeeEvent)
    assert sum(b.components.produced for b in buckets) == 11
    assert sum(b.components.off_plan_produced for b in buckets) == 0
    assert all(c.in_plan for c in of(events, CountEvent))


def test_a_reason_that_changes_during_a_stop_is_a_change_of_the_timeline() -> None:
    samples: list[tuple[float, str, object]] = [
        (0, "state", 1),
        (60, "state", 2),
        (60, "reason", 1),
        (90, "reason", "jam"),  # the operator finds the real cause
        (150, "state", 1),
    ]
    events = run(engine(), samples, 180)
    changes = [(e.ts, e.state, e.previous, e.reason) for e in of(events, StateEvent)]
    assert changes == [
        (at(0), "running", "unknown", None),
        (at(60), "fault", "running", "no material"),
        (at(90), "fault", "fault", "jam"),
        (at(150), "running", "fault", None),
    ]
    # The timeline's intervals by reason are the Pareto's seconds by reason.
    pareto: dict[str, float] = {}
    for bucket in of(events, OeeEvent):
        for reason, seconds in bucket.downtime_by_reason.items():
            pareto[reason] = pareto.get(reason, 0.0) + seconds
    assert pareto == {"no material": 30.0, "jam": 60.0}


def test_unmapped_reasons_text_is_its_own_name_and_a_number_stays_a_code() -> None:
    samples: list[tuple[float, str, object]] = [
        (0, "state", 2),
        (0, "reason", "jam"),
        (60, "reason", 7),
        (120, "reason", 1),
    ]
    events = run(engine(), samples, 180)
    assert [e.reason for e in of(events, StateEvent)] == ["jam", "code 7", "no material"]


def test_plc_strings_lose_control_characters_and_are_capped() -> None:
    samples: list[tuple[float, str, object]] = [
        (0, "state", 2),
        (0, "reason", "ja\x00m\x07\u200b"),
        (0, "product", "B\x00" + "x" * 500),
        (60, "state", "9\x00\x1b[31m"),
        (60, "total_count", 0),
        (90, "total_count", 5),
    ]
    eng = engine(product_map={})
    events = run(eng, samples, 120)
    assert load_events(dump_events(events)) == events  # every event is storable
    assert of(events, StateEvent)[0].reason == "jam"
    count = of(events, CountEvent)[0]
    assert count.product == "B" + "x" * (MAX_TEXT_CHARS - 1)
    unmapped = [e for e in of(events, AgentEvent) if e.code == "unmapped_state"]
    assert unmapped[0].data["value"] == "9[31m"


def test_an_absurd_jump_of_a_64_bit_counter_is_quarantined_not_raised() -> None:
    eng = engine(("total_count",), width=64)
    samples: list[tuple[float, str, object]] = [
        (0, "state", 1),
        (0, "total_count", 5),
        (10, "total_count", 2**64 - 10),  # a reset to an absurd value
        (20, "total_count", 2**64 - 6),  # +4 from there
        (30, "total_count", float("inf")),
        (40, "total_count", 2**64 - 3),  # +3
    ]
    events = run(eng, samples, 60)
    assert load_events(dump_events(events)) == events
    assert Components.pool(e.components for e in of(events, OeeEvent)).produced == 7
    flags = [(e.code, e.data.get("current")) for e in of(events, AgentEvent)]
    assert flags == [("counter_quarantined", str(2**64 - 10)), ("counter_invalid", None)]


def test_many_plausible_jumps_in_one_bucket_are_quarantined_past_the_bound() -> None:
    eng = engine(("total_count",), width=64, ideal_cycle_time=86_400)
    samples: list[tuple[float, str, object]] = [(0, "state", 1), (0, "total_count", 0)]
    samples += [(i, "total_count", i * 2**31) for i in range(1, 50)]
    events = run(eng, samples, 60)
    assert load_events(dump_events(events)) == events
    assert Components.pool(e.components for e in of(events, OeeEvent)).produced <= 2**32
    assert any(e.code == "counter_quarantined" for e in of(events, AgentEvent))


def test_the_event_model_refuses_what_the_cloud_cannot_store() -> None:
    good = CountEvent(agent_id="a", site_id="s", equipment_id="p", ts=T0, produced=1, good=1)
    raw = dump_events([good])
    for bad in (
        raw.replace(b'"produced":1', b'"produced":' + str(10**30).encode()),
        raw.replace(b'"good":1', b'"good":9007199254740992'),
        raw.replace(b'"equipment_id":"p"', b'"equipment_id":"p\\u0000"'),
        raw.replace(b'"agent_id":"a"', b'"agent_id":"' + b"a" * 200 + b'"'),
        raw.replace(b'"event_id":"', b'"event_id":"x'),
    ):
        with pytest.raises(ValidationError):
            load_events(bad)
    with pytest.raises(FieldValueError, match=r"AgentEvent\.data: text holds a NUL"):
        AgentEvent(agent_id="a", site_id="s", ts=T0, code="x", message="m", data={"k": "\x00"})
    with pytest.raises(FieldValueError, match=r"AgentEvent\.data: data number"):
        AgentEvent(agent_id="a", site_id="s", ts=T0, code="x", message="m", data={"n": 2**64})
    with pytest.raises(FieldValueError, match=r"StateEvent\.raw: nan is not a finite number"):
        StateEvent(agent_id="a", site_id="s", ts=T0, state="fault", raw=float("nan"))
    assert load_events(raw) == [good]


def test_an_open_scan_survives_a_checkpoint() -> None:
    eng = engine()
    eng.start(at(0))
    assert eng.feed(Sample("press-1", "state", 2, at(10))) == []  # the scan may go on
    snapshot = eng.checkpoint()
    restored = engine()
    restored.restore(snapshot)
    restored.feed(Sample("press-1", "reason", 1, at(10)))  # same scan, after the restart
    events = restored.tick(at(11))
    assert [(e.state, e.reason) for e in of(events, StateEvent)] == [("fault", "no material")]
    version_2 = {k: v for k, v in snapshot.items() if k != "scan"}  # written by earlier agents
    engine().restore(version_2)
    with pytest.raises(ValueError, match="unknown signal"):
        engine().restore(snapshot | {"scan": [snapshot["scan"][0], [["colour", 1]]]})


def test_a_performance_too_large_for_an_event_is_reported_without_its_number() -> None:
    eng = engine(("total_count",), width=64, ideal_cycle_time=86_400)
    eng.calendar = ShiftCalendar(
        [validated(ShiftSpec, name="early", start="06:00", end="07:00")], "UTC"
    )  # type: ignore[arg-type]
    samples: list[tuple[float, str, object]] = [
        (0, "state", 2),
        (0, "total_count", 0),
        (10, "state", 1),
        (10.000001, "state", 2),  # one microsecond of production
        (20, "total_count", 2**32),
    ]
    events = run(eng, samples, 3600)
    assert load_events(dump_events(events)) == events
    flags = [e for e in of(events, AgentEvent) if e.code == "performance_above_one"]
    assert [f.data["performance"] for f in flags] == [None]
