"""The live values the floor outputs serve are the engine's: the running shift's values equal
the pooled buckets the engine closed in that shift (what the cloud sums), the last bucket
is the last one it closed, and every kind of component (stop counts included) reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agent.config import parse_config
from agent.floor.live import METRIC_NAMES, LiveSource
from connectors.sample import Sample
from oee.components import Components, ratios
from oee.engine import PlantEngine
from oee.events import Event, OeeEvent

CONFIG = """
agent: {id: edge-live, site: plant-live, timezone: UTC, bucket_seconds: 10}
shifts: [{name: all-day, start: "00:00", end: "00:00"}]
equipment:
  - id: press-1
    line: line-1
    ideal_cycle_time: 1s
    signals:
      state: {map: {0: idle, 1: running, 2: fault}}
      total_count: {}
      scrap_count: {}
      reason: {map: {1: jam, 2: no material}}
"""


def test_shift_and_last_bucket_are_the_engines_buckets() -> None:
    config = parse_config(CONFIG, replay=True)
    engine = PlantEngine(
        config.oee_specs(),
        config.calendar(),
        agent_id="edge-live",
        site_id="plant-live",
        bucket_seconds=10,
    )
    t0 = datetime(2026, 3, 2, 8, 0, 3, tzinfo=UTC)
    events: list[Event] = list(engine.start(t0))
    source = LiveSource(engine, {"press-1": "line-1"}, {"press-1": "plc"}, dict, lambda: 0)
    produced = scrap = 0
    for second in range(95):
        t = t0 + timedelta(seconds=second)
        # Runs, faults for 7 s every 20 s (stops that end: stop counts), makes parts.
        state = 2 if second % 20 >= 13 else 1
        if state == 1:
            produced += 1
            scrap += second % 9 == 0
        for signal, value in (
            ("state", state),
            ("reason", 1 + (second // 20) % 2),
            ("total_count", produced),
            ("scrap_count", scrap),
        ):
            events += engine.feed(Sample("press-1", signal, value, t))
        events += engine.tick(t)
        source.observe(events)
    buckets = [e for e in events if isinstance(e, OeeEvent)]
    assert len(buckets) >= 8
    values = source.read()["press-1"].values
    assert set(values) == set(METRIC_NAMES)
    pooled = Components.pool(b.components for b in buckets)
    assert pooled.fault_stops > 0, "the run must end stops (stop counts in the shift sums)"
    r = ratios(pooled)
    assert values["Shift/Name"] == "all-day"
    assert values["Shift/Start"] == datetime(2026, 3, 2, tzinfo=UTC)
    assert values["Shift/Through"] == buckets[-1].bucket_end
    assert values["Shift/Produced"] == pooled.produced
    assert values["Shift/Scrap"] == pooled.scrap
    assert values["Shift/Good"] == pooled.good
    assert abs(values["Shift/PlannedBusyTime"] - pooled.planned_busy_s) < 1e-6  # type: ignore[operator]
    for name, want in (
        ("Shift/Availability", r.availability),
        ("Shift/Performance", r.performance),
        ("Shift/Quality", r.quality),
        ("Shift/OEE", r.oee),
    ):
        assert want is not None
        assert abs(values[name] - want) < 1e-12, name  # type: ignore[operator]
    last = buckets[-1]
    assert values["LastBucket/Start"] == last.bucket_start
    assert values["LastBucket/Produced"] == last.components.produced
    assert values["LastBucket/OEE"] == ratios(last.components).oee
    # The engine's current state, and the PLC link as the hubs report it.
    assert values["State"] == engine.engines["press-1"].state
    assert values["Reason"] == (engine.engines["press-1"].reason or "")
    assert values["Link/Connected"] is False  # no hub named "plc" reports connected
