"""Engine state on disk (agent/engine_store.py) with the real engine and a real outbox file:
only what changed is written, and restarts after crashes at any point of a flush, with stored
state of any age, give every event exactly once, exact counts and time classes that add up
to the window, with no more time unknown than the documented crash bound."""

from __future__ import annotations

import itertools
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import parse_config
from agent.engine_store import EngineStore
from buffer.outbox import NewBatch, Outbox
from connectors.sample import Sample
from oee.engine import PlantEngine, to_us
from oee.events import CountEvent, Event, OeeEvent, dump_events, load_events

START = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)
PRESSES = ("press-1", "press-2")
CONFIG = parse_config(
    """
agent: {id: store, site: store-site, timezone: UTC, bucket_seconds: 20}
shifts: [{name: all-day, start: "00:00", end: "00:00"}]
equipment:
"""
    + "".join(
        f"""  - id: {eq}
    ideal_cycle_time: 2s
    micro_stop_threshold: 4s
    signals:
      state: {{map: {{0: idle, 1: running, 2: fault}}}}
      total_count: {{type: uint32}}
      scrap_count: {{type: uint32}}
"""
        for eq in PRESSES
    ),
    "<store>",
)


def plant() -> PlantEngine:
    return PlantEngine(
        CONFIG.oee_specs(), CONFIG.calendar(), agent_id="a", site_id="s", bucket_seconds=20
    )


def sealer(events: list[Event]):  # type: ignore[no-untyped-def]
    raw = dump_events(events)

    def seal(epoch: str, seq: int) -> tuple[bytes, str]:
        return raw, f"{epoch}-{seq}"

    return seal


@dataclass
class Press:
    """The PLC: a state program and cumulative counters that run on while the agent is down."""

    rng: random.Random
    state: int = 1
    left: int = 0
    total: int = 4_000_000_000  # near the 32-bit wrap
    scrap: int = 0
    first: tuple[int, int] | None = None

    def step(self) -> None:
        if self.left <= 0:
            self.state = self.rng.choice((1, 1, 0, 2))
            self.left = self.rng.randint(1, 12)
        self.left -= 1
        if self.state == 1 and self.rng.random() < 0.6:
            self.total = (self.total + 1) % (1 << 32)
            if self.rng.random() < 0.1:
                self.scrap += 1


@dataclass
class Agent:
    """One agent process: the outbox, the state store and the engine, as the runtime wires
    them (agent/runtime.py); dropped without a stop to simulate kill -9."""

    path: Path
    heartbeat_s: float
    snapshot_s: float
    box: Outbox = field(init=False)
    store: EngineStore = field(init=False)
    engine: PlantEngine = field(init=False)
    pending: list[Event] = field(default_factory=list)

    def start(self, now: datetime) -> None:
        self.box = Outbox(self.path)
        self.store = EngineStore(self.box, heartbeat_s=self.heartbeat_s, snapshot_s=self.snapshot_s)
        self.engine = plant()
        self.pending = []
        resumed = self.store.resume(self.engine, now)
        if resumed is not None:
            assert resumed[1] == {}
            self.pending += resumed[0]
        self.pending += self.engine.start(now)

    def feed(self, presses: dict[str, Press], now: datetime) -> None:
        for eq, press in presses.items():
            for signal, value in (
                ("state", press.state),
                ("total_count", press.total),
                ("scrap_count", press.scrap),
            ):
                self.pending += self.engine.feed(Sample(eq, signal, value, now, "good"))

    def flush(self, now: datetime, *, commit: bool = True) -> None:
        self.pending += self.engine.tick(now)
        state = self.store.prepare(self.engine.checkpoint(), to_us(now))
        if not commit:
            return  # killed between preparing and committing: nothing reaches the disk
        batches = [NewBatch(len(self.pending), sealer(self.pending))] if self.pending else []
        self.box.append(batches, state)
        if state is not None:
            self.store.committed(state)
        self.pending = []

    def finish(self, now: datetime) -> None:
        self.pending += self.engine.finish(now)
        self.flush(now)
        self.box.close()


def stored(path: Path) -> list[Event]:
    box = Outbox(path)
    events = [e for b in box.pending(1_000_000) for e in load_events(b.envelope)]
    box.close()
    return events


def run(
    tmp: Path,
    seconds: int,
    crashes: dict[int, tuple[str, int]],
    heartbeat_s: float,
    snapshot_s: float,
    seed: int,
) -> tuple[list[Event], dict[str, Press], datetime]:
    rng = random.Random(seed)
    presses = {eq: Press(random.Random(rng.random())) for eq in PRESSES}
    agent = Agent(tmp / "outbox.db", heartbeat_s, snapshot_s)
    agent.start(START)
    t = 0
    while t < seconds:
        now = START + timedelta(seconds=t)
        for press in presses.values():
            press.step()
        crash = crashes.get(t)
        agent.feed(presses, now)
        if crash is None:
            agent.flush(now)
            t += 1
            continue
        where, down = crash
        if where == "mid-flush":
            agent.flush(now, commit=False)
        elif where == "after-commit":
            agent.flush(now)
        # "before-flush": samples fed, nothing flushed. Then kill -9: the process is gone.
        agent.box._conn.close()
        for _ in range(down):
            for press in presses.values():
                press.step()  # the line runs on while the agent is down
        t += 1 + down
        agent.start(START + timedelta(seconds=t))
    end = START + timedelta(seconds=t)
    agent.feed(presses, end)
    agent.finish(end)
    return stored(tmp / "outbox.db"), presses, end


def check(
    events: list[Event],
    presses: dict[str, Press],
    end: datetime,
    first: dict[str, tuple[int, int]],
    bound_s: float,
) -> None:
    assert len({e.event_id for e in events}) == len(events)
    for eq, press in presses.items():
        counts = [e for e in events if isinstance(e, CountEvent) and e.equipment_id == eq]
        produced = (press.total - first[eq][0]) % (1 << 32)
        assert sum(e.produced for e in counts) == produced, eq
        assert sum(e.scrap for e in counts) == press.scrap - first[eq][1], eq
        buckets = sorted(
            (e for e in events if isinstance(e, OeeEvent) and e.equipment_id == eq),
            key=lambda e: e.bucket_start,
        )
        starts = Counter(e.bucket_start for e in buckets)
        assert max(starts.values()) == 1, "a bucket was emitted twice"
        assert buckets[0].bucket_start == START and buckets[-1].bucket_end == end
        for a, b in itertools.pairwise(buckets):
            assert a.bucket_end == b.bucket_start, "buckets must tile the window"
        unknown = 0.0
        for e in buckets:
            c = e.components
            window = (e.bucket_end - e.bucket_start).total_seconds()
            assert c.planned_busy_s + c.planned_down_s + c.off_plan_s == pytest.approx(window)
            busy = c.production_s + c.setup_s + c.downtime_s + c.unknown_s
            assert busy == pytest.approx(c.planned_busy_s)
            unknown += c.unknown_s
        assert sum(e.components.produced for e in buckets) == produced
        assert unknown <= bound_s + 1e-6, (unknown, bound_s)


CRASH = st.tuples(st.sampled_from(("mid-flush", "after-commit", "before-flush")), st.integers(0, 6))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    crashes=st.dictionaries(st.integers(2, 80), CRASH, max_size=4),
    heartbeat_s=st.sampled_from((1.0, 3.0, 30.0)),
    snapshot_s=st.sampled_from((2.0, 15.0, 1000.0)),
    seed=st.integers(0, 10_000),
)
def test_crashes_anywhere_with_state_of_any_age_keep_events_counts_and_time_exact(
    crashes: dict[int, tuple[str, int]], heartbeat_s: float, snapshot_s: float, seed: int
) -> None:
    # Crash points must not overlap a previous downtime.
    kept: dict[int, tuple[str, int]] = {}
    busy_until = -1
    for at in sorted(crashes):
        if at > busy_until:
            kept[at] = crashes[at]
            busy_until = at + crashes[at][1] + 1
    # On a RAM file system where there is one: the file system's fsync is not under test here.
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
        rng = random.Random(seed)
        first = {eq: _first(random.Random(rng.random())) for eq in PRESSES}
        events, presses, end = run(Path(tmp), 90, kept, heartbeat_s, snapshot_s, seed)
    # Unknown time: the downtime itself plus, per crash, what the bound allows (the time
    # since the last committed instant: at most the heartbeat interval and one flush).
    bound = sum(down + 1 + heartbeat_s + 1 for down in (c[1] for c in kept.values()))
    check(events, presses, end, first, bound)


def _first(rng: random.Random) -> tuple[int, int]:
    """The counters the agent reads first (its baseline): the press after one step."""
    press = Press(rng)
    press.step()
    return press.total, press.scrap


def test_an_idle_line_writes_nothing_but_heartbeats_and_a_counted_part_only_a_patch(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "outbox.db")
    store = EngineStore(box, heartbeat_s=10, snapshot_s=1000)
    engine = plant()
    engine.start(START)
    writes: list[Any] = []
    for t in range(0, 19):  # inside one bucket: nothing closes
        now = START + timedelta(seconds=t)
        read = now - timedelta(milliseconds=100)  # polled before the flush, as in the agent
        for eq in PRESSES:
            engine.feed(Sample(eq, "state", 0, read, "good"))
            engine.feed(Sample(eq, "total_count", 100, read, "good"))
        engine.tick(now)
        state = store.prepare(engine.checkpoint(), to_us(now))
        if state is not None:
            box.append([], state)
            store.committed(state)
        writes.append(state)
    written = [w for w in writes if w is not None]
    # Whole states when something changed: the start, the first bucket opened (0 -> 1 s), the
    # stop judged not a micro-stop (4 s threshold); then nothing but a heartbeat every 10 s.
    assert [(w.at - to_us(START)) // 1_000_000 for w in written] == [0, 1, 5, 15]
    assert [w.entry is None for w in written] == [False, False, False, True]
    # A part counted: a patch with the counter, not the whole state.
    now = START + timedelta(seconds=19)
    engine.feed(Sample("press-1", "state", 1, now - timedelta(milliseconds=900), "good"))
    engine.tick(now)
    store.committed(store.prepare(engine.checkpoint(), to_us(now)))  # type: ignore[arg-type]
    later = now + timedelta(milliseconds=500)  # the same bucket, [0 s, 20 s)
    engine.feed(Sample("press-1", "total_count", 101, now + timedelta(milliseconds=200), "good"))
    engine.tick(later)
    state = store.prepare(engine.checkpoint(), to_us(later))
    assert state is not None and state.entry is not None
    from agent.engine_store import decode

    body = decode(state.entry)
    assert set(body) == {"c"} and set(body["c"]) == {"press-1"}
    assert body["c"]["press-1"]["counters"] == {"total_count": 101}
    box.close()


def test_the_single_checkpoint_row_of_an_older_agent_is_resumed_and_folded(
    tmp_path: Path,
) -> None:
    import json
    import sqlite3

    path = tmp_path / "outbox.db"
    engine = plant()
    engine.start(START)
    for eq in PRESSES:
        engine.feed(Sample(eq, "state", 1, START, "good"))
        engine.feed(Sample(eq, "total_count", 500, START, "good"))
    engine.tick(START + timedelta(seconds=5))
    Outbox(path).close()
    with sqlite3.connect(path) as conn:  # what an older agent left: one row, whole plant
        conn.execute(
            "INSERT INTO checkpoint(id, data) VALUES (1, ?)", (json.dumps(engine.checkpoint()),)
        )
    box = Outbox(path)
    store = EngineStore(box, heartbeat_s=60, snapshot_s=300)
    again = plant()
    resumed = store.resume(again, START + timedelta(seconds=9))
    assert resumed is not None and resumed[1] == {}
    assert again.engines["press-1"].counters == {"total_count": 500}
    state = store.prepare(again.checkpoint(), to_us(START + timedelta(seconds=9)))
    assert state is not None and state.snapshot is not None  # folded at the first flush
    box.append([], state)
    store.committed(state)
    assert box.load_state().legacy is None
    box.close()
    box = Outbox(path)
    saved, at = EngineStore(box, heartbeat_s=60, snapshot_s=300).load()
    assert set(saved) == set(PRESSES) and at == to_us(START + timedelta(seconds=9))
    box.close()


def test_an_idle_bucket_close_writes_only_the_keys_that_changed_and_a_restart_reads_them(
    tmp_path: Path,
) -> None:
    from agent.engine_store import decode, key_entries
    from oee.checkpoint import plan

    path = tmp_path / "outbox.db"
    box = Outbox(path)
    store = EngineStore(box, heartbeat_s=60, snapshot_s=1000)
    engine = plant()
    engine.start(START)
    bodies: dict[int, Any] = {}
    for t in range(0, 45):  # idle presses across the bucket ends at 20 s and 40 s
        now = START + timedelta(seconds=t, milliseconds=500)  # flushes between the polls
        read = now - timedelta(milliseconds=100)
        for eq in PRESSES:
            engine.feed(Sample(eq, "state", 0, read, "good"))
            engine.feed(Sample(eq, "total_count", 100, read, "good"))
            engine.feed(Sample(eq, "scrap_count", 3, read, "good"))
        events = engine.tick(now)
        state = store.prepare(engine.checkpoint(), to_us(now), riding=bool(events))
        if state is not None:
            box.append([NewBatch(len(events), sealer(events))] if events else [], state)
            store.committed(state)
            bodies[t] = None if state.entry is None else decode(state.entry)
    # The close at 40 s: per press its cursor, its buckets and its shift totals, nothing of
    # what stayed (state, counters, widths, reason) and no sample times that moved alone.
    # Both presses closed the same bucket in the same state: one entry names both, and their
    # shift totals are written as what the closed bucket added to them.
    close = bodies[40]
    assert set(close) == {"K"} and len(close["K"]) == 1
    assert sorted(close["K"][0][1]) == sorted(PRESSES)
    for patch in key_entries(close).values():
        assert set(patch["set"]) == {"cursor", "buckets"}, patch
        assert set(patch["add"]) == {"shift_totals"}, patch
        assert "drop" not in patch
    # The start, the stop judged (4 s), the two closes: nothing else in between.
    assert list(bodies) == [0, 4, 20, 40]
    box.close()
    # A restart reads back what the journal holds: the engine's state but for the clock.
    saved, at = EngineStore(Outbox(path), heartbeat_s=60, snapshot_s=1000).load()
    assert at == to_us(START + timedelta(seconds=40, milliseconds=500))
    current = engine.checkpoint()
    for eq in PRESSES:
        assert saved[eq]["cursor"] == at
        assert plan(saved[eq], current[eq]) is None, eq  # differs only by the clock


def test_a_due_fold_waits_for_a_commit_made_anyway(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    store = EngineStore(box, heartbeat_s=1000, snapshot_s=10)
    engine = plant()
    engine.start(START)
    for eq in PRESSES:
        engine.feed(Sample(eq, "state", 0, START, "good"))
    engine.tick(START + timedelta(seconds=6))  # the stop judged: nothing changes after
    first = store.prepare(engine.checkpoint(), to_us(START + timedelta(seconds=6)))
    assert first is not None
    box.append([], first)
    store.committed(first)
    at = START + timedelta(seconds=17)  # the fold is due (10 s) but nothing else is written
    engine.tick(at)
    assert store.prepare(engine.checkpoint(), to_us(at)) is None
    riding = store.prepare(engine.checkpoint(), to_us(at), riding=True)  # events go anyway
    assert riding is not None and riding.snapshot is not None
    # Alone only once twice overdue.
    late = START + timedelta(seconds=27)
    engine.tick(late)
    alone = store.prepare(engine.checkpoint(), to_us(late))
    assert alone is not None and alone.snapshot is not None
    box.close()
