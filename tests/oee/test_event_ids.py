"""Event ids (oee.events.uuid7): UUIDv7 that one process hands out in increasing order, so
events of the same instant keep the order the engine made them in."""

from __future__ import annotations

import itertools
import time
import uuid
from datetime import UTC, datetime, timedelta

from agent.config import parse_config
from connectors.sample import Sample
from oee.engine import PlantEngine
from oee.events import StateEvent, uuid7


def test_ids_of_one_process_increase_even_within_a_millisecond() -> None:
    before = int(time.time() * 1000)
    ids = [uuid.UUID(uuid7()) for _ in range(20_000)]  # several thousand per millisecond
    assert all(a.int < b.int for a, b in itertools.pairwise(ids))
    for u in ids:
        assert u.version == 7 and u.variant == uuid.RFC_4122
    assert before <= ids[0].int >> 80 <= int(time.time() * 1000) + 1


def test_an_explicit_time_is_kept() -> None:
    u = uuid.UUID(uuid7(now_ms=1_700_000_000_123))
    assert u.int >> 80 == 1_700_000_000_123 and u.version == 7


def test_an_announced_start_sorts_before_the_first_state_of_the_same_instant() -> None:
    config = parse_config(
        "agent: {id: a, site: s}\nshifts: [{name: day, start: '00:00', end: '00:00'}]\n"
        "equipment:\n  - {id: m, ideal_cycle_time: 1s, signals: {state: {map: {1: running}},"
        " total_count: {}}}\n",
        "ids.yaml",
        env={},
    )
    at = datetime(2026, 11, 18, 9, tzinfo=UTC)
    for _ in range(200):
        engine = PlantEngine(config.oee_specs(), config.calendar(), agent_id="a", site_id="s")
        events = engine.engines["m"].start(at, announce=True)
        events += engine.feed(Sample("m", "state", 1, at))
        events += engine.tick(at + timedelta(minutes=1))
        states = [e for e in events if isinstance(e, StateEvent)]
        assert [s.state for s in states] == ["unknown", "running"]
        assert states[0].ts == states[1].ts
        ordered = sorted(states, key=lambda e: (e.ts, uuid.UUID(e.event_id)))
        assert [s.state for s in ordered] == ["unknown", "running"]
