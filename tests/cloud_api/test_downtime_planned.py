"""A stop's downtime is its planned time: `/v1/downtime/events` against the OEE buckets when
machines stay stopped through a break or past the end of a shift.

PLC samples -> the agent's engine and sealed outbox (`AgentRuntime.record`) -> the real
ingest (BatchWriter.process) -> PostgreSQL -> the HTTP API, then the cross-view checker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool

from agent.config import AgentConfig, parse_config
from agent.plant_history import plant_history
from agent.runtime import AgentRuntime
from buffer.outbox import Outbox
from cloud_api.ingest.worker import BatchWriter
from connectors.sample import Sample
from sync.keys import AgentKeys, CloudKeyring
from sync.uplink import batch_topic
from tests.conftest import enroll, make_agent_keys
from tests.invariants import api_client, check_views

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo-agent.yaml"

# One shift with a break, nothing planned after 14:00 (UTC, a Monday).
CONFIG = """
agent: {{id: edge-breaks, site: plant-breaks, state_dir: {state}, bucket_seconds: 60}}
connections: [{{id: plc, type: modbus, host: 127.0.0.1, port: 5020}}]
mqtt: {{host: 127.0.0.1, port: 1883}}
shifts:
  - name: early
    start: "06:00"
    end: "14:00"
    breaks: [{{start: "09:00", end: "09:15"}}]
equipment:
  - id: press-1
    connection: plc
    ideal_cycle_time: 1s
    signals: &signals
      state: {{address: "holding:0", type: uint16, map: {{0: idle, 1: running, 2: fault}}}}
      total_count: {{address: "holding:1", type: uint32, width: 32}}
      reason: {{address: "holding:5", type: uint16, map: {{1: no material, 3: jam}}}}
  - {{id: press-2, connection: plc, ideal_cycle_time: 1s, signals: *signals}}
  - {{id: press-3, connection: plc, ideal_cycle_time: 1s, signals: *signals}}
  - {{id: press-4, connection: plc, ideal_cycle_time: 1s, micro_stop_threshold: 2m,
      signals: *signals}}
  - {{id: press-5, connection: plc, ideal_cycle_time: 1s, signals: *signals}}
"""
DAY = datetime(2026, 11, 2, tzinfo=UTC)
RUNNING, IDLE, FAULT = 1, 0, 2
NO_MATERIAL, JAM = 1, 3


def at(hh_mm: str, seconds: float = 0.0) -> datetime:
    h, m = map(int, hh_mm.split(":"))
    return DAY + timedelta(hours=h, minutes=m, seconds=seconds)


def machine(eq: str, changes: list[tuple[datetime, int, int]], end: datetime) -> list[Sample]:
    """The readings of one machine: (from, state, reason) changes, a count every minute
    while it runs (one part a second)."""
    out: list[Sample] = []
    total = 0
    ends = [c[0] for c in changes[1:]] + [end]
    for (since, state, reason), nxt in zip(changes, ends, strict=True):
        out.append(Sample(eq, "reason", reason, since))
        out.append(Sample(eq, "state", state, since))
        out.append(Sample(eq, "total_count", total, since))
        t = since
        while t < nxt:
            step = min(nxt, t + timedelta(minutes=1))
            if state == RUNNING:
                total += int((step - t).total_seconds())
            # Read just before a change, while the parts still belong to this state.
            out.append(Sample(eq, "total_count", total, step - timedelta(milliseconds=100)))
            t = step
    return out


def samples(end: datetime) -> list[Sample]:
    out = [
        # A fault from 08:50 to 09:30 spans the break: 25 planned minutes of 40.
        *machine(
            "press-1",
            [(at("05:30"), RUNNING, 0), (at("08:50"), FAULT, JAM), (at("09:30"), RUNNING, 0)],
            end,
        ),
        # Out of material from 13:50 until 14:20, past the end of the only shift: 10 of 30.
        *machine(
            "press-2",
            [
                (at("05:30"), RUNNING, 0),
                (at("13:50"), IDLE, NO_MATERIAL),
                (at("14:20"), RUNNING, 0),
            ],
            end,
        ),
        # Idle only inside the break (no planned second), then a fault across its end.
        *machine(
            "press-3",
            [
                (at("05:30"), RUNNING, 0),
                (at("09:02"), IDLE, NO_MATERIAL),
                (at("09:10"), RUNNING, 0),
                (at("09:12"), FAULT, JAM),
                (at("09:20"), RUNNING, 0),
            ],
            end,
        ),
        # Micro-stops under `performance`: one of 3 min wall clock with 1 planned minute
        # (judged on its full length: not a micro-stop), one of 90 s inside a shift.
        *machine(
            "press-4",
            [
                (at("05:30"), RUNNING, 0),
                (at("08:59"), FAULT, JAM),
                (at("09:02"), RUNNING, 0),
                (at("10:00"), FAULT, JAM),
                (at("10:01", 30), RUNNING, 0),
            ],
            end,
        ),
        # A fault after the shift that no later reading ends: its buckets stop at `end`.
        *machine("press-5", [(at("05:30"), RUNNING, 0), (at("15:50"), FAULT, JAM)], end),
    ]
    out.sort(key=lambda s: s.ts)
    return out


def seed(
    pg_url: str,
    pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    config: AgentConfig,
    history: list[Sample],
    end: datetime,
) -> None:
    enroll(pg_url, config.agent.id, config.agent.site, make_agent_keys(config.keys_dir, cloud_keys))
    runtime = AgentRuntime(config, AgentKeys.load(config.keys_dir), clock=lambda: end)
    assert runtime.record(history, end, flush_every_s=900) > 0
    store = BatchWriter(pool, cloud_keys, topic_prefix="test/")
    topic = batch_topic("test/", config.agent.site, config.agent.id)
    outbox = Outbox(config.outbox_path)
    try:
        for batch in outbox.pending(100_000):
            outcome = store.process(topic, batch.envelope)
            assert outcome.status == "stored", outcome.reason
    finally:
        outbox.close()


def stops(api: Any, eq: str, site: str, lo: datetime, hi: datetime, **extra: Any) -> list[Any]:
    response = api.get(
        "/v1/downtime/events",
        params={"scope": "equipment", "id": eq, "site": site, "from": lo.isoformat(),
                "to": hi.isoformat(), **extra},
    )  # fmt: skip
    assert response.status_code == 200, response.text
    return [
        (s["start"], s["end"], s["state"], s["reason"], s["duration_s"], s["wall_s"])
        for s in response.json()["stops"]
    ]


def iso(t: datetime) -> str:
    return t.isoformat()


def test_stops_through_a_break_and_past_the_shift_end_count_planned_time(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    config = parse_config(CONFIG.format(state=tmp_path / "agent"), "breaks.yaml", env={})
    end = at("16:00")
    seed(pg_url, pool, cloud_keys, config, samples(end), end)
    site = config.agent.site

    with api_client(pg_url, tmp_path / "views-keys") as api:
        check_views(api, pg_url)
        lo, hi = at("05:00"), at("16:00")
        assert stops(api, "press-1", site, lo, hi) == [
            (iso(at("08:50")), iso(at("09:30")), "fault", "jam", 25 * 60.0, 40 * 60.0)
        ]
        assert stops(api, "press-2", site, lo, hi) == [
            (iso(at("13:50")), iso(at("14:20")), "idle", "no material", 10 * 60.0, 30 * 60.0)
        ]
        # The idle stretch inside the break has no planned second: left out, as in the Pareto.
        assert stops(api, "press-3", site, lo, hi) == [
            (iso(at("09:12")), iso(at("09:20")), "fault", "jam", 5 * 60.0, 8 * 60.0)
        ]
        assert stops(api, "press-4", site, lo, hi) == [
            (iso(at("08:59")), iso(at("09:02")), "fault", "jam", 60.0, 180.0),
            (iso(at("10:00")), iso(at("10:01", 30)), "fault", "jam", 90.0, 90.0),
        ]
        # min_duration_s applies to the planned seconds: press-1's stop has 1500 of them.
        assert stops(api, "press-1", site, lo, hi, min_duration_s=1500)
        assert stops(api, "press-1", site, lo, hi, min_duration_s=1501) == []
        # press-5's fault lasts until its next state event (none): past the last bucket the
        # shift calendar the agent reported decides, 06:00 to 07:00 of the next day.
        next_day = at("07:00") + timedelta(days=1)
        assert stops(api, "press-5", site, lo, next_day) == [
            (iso(at("15:50")), iso(next_day), "fault", "jam", 3600.0, (15 * 60 + 10) * 60.0)
        ]
        # A window that cuts the stop: both its planned and wall-clock seconds are clipped.
        assert stops(api, "press-1", site, at("09:10"), hi) == [
            (iso(at("09:10")), iso(at("09:30")), "fault", "jam", 15 * 60.0, 20 * 60.0)
        ]


def test_the_demo_plant_with_its_breaks_passes_the_checker(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    text = DEMO.read_text(encoding="utf-8").replace("var/demo/agent", str(tmp_path / "agent"))
    config = parse_config(text, "demo.yaml", env={})
    # 06:00 to 22:00 Berlin on a Monday: four breaks the machines idle through.
    start = datetime(2026, 11, 2, 5, 0, tzinfo=UTC)
    end = start + timedelta(hours=16)
    history, _ = plant_history(config, start, end)
    seed(pg_url, pool, cloud_keys, config, history, end)
    with api_client(pg_url, tmp_path / "views-keys") as api:
        check_views(api, pg_url)
