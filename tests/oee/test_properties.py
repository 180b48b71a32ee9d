"""Invariants of the OEE engine on random timelines (hypothesis).

- the classes of time partition the window, and planned busy time partitions into its classes;
- OEE = ideal_good_s / planned_busy_s (= A x P x Q when all are defined);
- splitting a window anywhere and pooling the parts gives the whole;
- duplicates, a stream fed twice, or a restart from a checkpoint (through JSON) at any point
  give the same buckets as one clean run.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig, parse_config
from agent.replay import ReplayRun
from connectors.sample import Sample
from oee.components import COMPONENT_FIELDS, Components, ratios
from oee.engine import EquipmentEngine
from oee.events import OeeEvent

START = datetime(2026, 1, 5, 5, 0, tzinfo=UTC)
WINDOW_MS = 4 * 3600 * 1000
END = START + timedelta(milliseconds=WINDOW_MS)
STATE_VALUES = (0, 1, 2, 3, 4, 9)  # 9 is not in the state map
SIGNALS = ("state", "state", "state", "total_count", "total_count", "scrap_count", "product")


def config(mode: str) -> AgentConfig:
    # Edges everywhere: a break, two adjacent shifts, off plan before and after; 5-minute
    # buckets keep the examples quick.
    return parse_config(
        f"""
agent: {{id: prop, site: prop-site, timezone: UTC, bucket_seconds: 300}}
shifts:
  - {{name: early, start: "05:30", end: "07:00", breaks: [{{start: "06:10", end: "06:20"}}]}}
  - {{name: late, start: "07:00", end: "08:30"}}
equipment:
  - id: press-1
    ideal_cycle_time: 1.5s
    micro_stop_threshold: 5m
    micro_stops: {mode}
    products: {{A: {{ideal_cycle_time: 1s}}, B: {{ideal_cycle_time: 2.5s}}}}
    signals:
      state: {{map: {{0: idle, 1: running, 2: fault, 3: setup, 4: planned_stop}}}}
      total_count: {{type: uint16}}
      scrap_count: {{type: uint16}}
      reason: {{map: {{1: jam}}}}
      product: {{map: {{1: A, 2: B}}}}
""",
        "<property>",
    )


CONFIGS = {mode: config(mode) for mode in ("performance", "availability")}


@st.composite
def timelines(draw: st.DrawFn) -> list[Sample]:
    """Samples in time order, some sharing a timestamp; counters wrap and reset now and then."""
    raw = draw(
        st.lists(
            st.tuples(
                st.integers(-600_000, WINDOW_MS + 600_000),  # also before and after the window
                st.sampled_from(SIGNALS),
                st.integers(0, 400),
                st.booleans(),
            ),
            max_size=60,
        )
    )
    # Coarse times (whole 10 s steps, sometimes with milliseconds) make equal timestamps.
    raw.sort(key=lambda r: r[0] // 10_000 * 10_000 if r[3] else r[0])
    total, scrap = 65_400, 0
    samples: list[Sample] = []
    for offset, signal, n, coarse in raw:
        ts = START + timedelta(milliseconds=offset // 10_000 * 10_000 if coarse else offset)
        if samples and ts < samples[-1].ts:
            ts = samples[-1].ts
        value: int | None
        quality = "good"
        if signal == "state":
            value = STATE_VALUES[n % len(STATE_VALUES)]
            if n % 17 == 0:
                value, quality = None, "bad"
        elif signal == "total_count":
            total = n % 50 if n % 23 == 0 else total + n  # sometimes a reset
            value = total % 65_536
        elif signal == "scrap_count":
            scrap += n // 40
            value = scrap
        else:
            value = 1 + n % 2
        samples.append(Sample("press-1", signal, value, ts, quality))  # type: ignore[arg-type]
    return samples


def replay(samples: list[Sample], start: datetime, end: datetime, mode: str) -> Components:
    run = ReplayRun(CONFIGS[mode], start, end)
    for line, sample in enumerate(samples, start=1):
        run.feed(sample, line)
    run.finish()
    return run.tally["press-1"].components


def engine(mode: str) -> EquipmentEngine:
    cfg = CONFIGS[mode]
    return EquipmentEngine(
        cfg.oee_specs()[0], cfg.calendar(), agent_id="a", site_id="s", bucket_seconds=300
    )


def buckets(events: list[Any]) -> list[tuple[Any, ...]]:
    return [
        (e.bucket_start, e.bucket_end, e.shift, e.components, e.downtime_by_reason)
        for e in events
        if isinstance(e, OeeEvent)
    ]


def clean_run(samples: list[Sample], mode: str) -> list[Any]:
    eng = engine(mode)
    events: list[Any] = eng.start(START)
    for sample in samples:
        events += eng.feed(sample)
    events += eng.finish(END)
    return events


def assert_same(a: Components, b: Components) -> None:
    for name in COMPONENT_FIELDS:
        assert getattr(a, name) == pytest.approx(getattr(b, name), abs=1e-6), name


MODES = st.sampled_from(("performance", "availability"))
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(timelines(), MODES)
def test_classes_of_time_partition_the_window(samples: list[Sample], mode: str) -> None:
    c = replay(samples, START, END, mode)
    window = (END - START).total_seconds()
    assert c.planned_busy_s + c.planned_down_s + c.off_plan_s == pytest.approx(window, abs=1e-6)
    busy = c.production_s + c.setup_s + c.downtime_s + c.unknown_s
    assert busy == pytest.approx(c.planned_busy_s, abs=1e-6)
    assert c.downtime_s == pytest.approx(c.fault_s + c.idle_s, abs=1e-6)
    assert c.produced == c.good + c.scrap + c.rework
    assert min(c.planned_busy_s, c.production_s, c.unknown_s, c.off_plan_s) >= 0


@SETTINGS
@given(timelines(), MODES)
def test_oee_is_ideal_good_time_over_planned_busy_time(samples: list[Sample], mode: str) -> None:
    c = replay(samples, START, END, mode)
    r = ratios(c)
    if c.planned_busy_s == 0:
        assert r.oee is None and r.availability is None
        return
    assert r.oee == pytest.approx(c.ideal_good_s / c.planned_busy_s)
    if r.availability is not None and r.performance is not None and r.quality is not None:
        assert r.availability * r.performance * r.quality == pytest.approx(r.oee, abs=1e-9)


@SETTINGS
@given(timelines(), MODES, st.integers(1, WINDOW_MS - 1), st.integers(1, 400_000), st.booleans())
def test_splitting_a_window_and_pooling_gives_the_whole(
    samples: list[Sample], mode: str, cut_ms: int, after_ms: int, near_a_state: bool
) -> None:
    cut = START + timedelta(milliseconds=cut_ms)
    states = [s.ts for s in samples if s.signal == "state" and START < s.ts < END]
    if near_a_state and states:
        # Cut shortly after a state change: inside a stop that may be a micro-stop.
        cut = min(states[cut_ms % len(states)] + timedelta(milliseconds=after_ms), END)
        if cut >= END:
            return
    whole = replay(samples, START, END, mode)
    parts = replay(samples, START, cut, mode) + replay(samples, cut, END, mode)
    assert_same(parts, whole)


@SETTINGS
@given(timelines(), MODES)
def test_duplicates_and_a_stream_fed_twice_change_nothing(samples: list[Sample], mode: str) -> None:
    clean = buckets(clean_run(samples, mode))
    doubled = [s for sample in samples for s in (sample, sample)]
    assert buckets(clean_run(doubled, mode)) == clean
    assert buckets(clean_run(samples + samples, mode)) == clean


@SETTINGS
@given(timelines(), MODES, st.data())
def test_restart_from_a_checkpoint_anywhere_gives_the_clean_run(
    samples: list[Sample], mode: str, data: st.DataObject
) -> None:
    at = data.draw(st.integers(0, len(samples)), label="restart after sample")
    tick = data.draw(st.booleans(), label="tick before the checkpoint")
    first = engine(mode)
    events: list[Any] = first.start(START)
    for sample in samples[:at]:
        events += first.feed(sample)
    if tick and at:
        events += first.tick(max(samples[at - 1].ts, START))
    snapshot = json.loads(json.dumps(first.checkpoint()))
    second = engine(mode)
    second.restore(snapshot)
    for sample in samples[at:]:
        events += second.feed(sample)
    events += second.finish(END)
    assert buckets(events) == buckets(clean_run(samples, mode))
