"""Count events and buckets tell the same quantities, for new events and for events stored by
agents before count events carried every quantity (migration 0030)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from cloud_api.api import queries
from cloud_api.db import migrations
from common.checks import validate
from connectors.sample import Sample
from oee.components import Components
from oee.config import EquipmentSpec
from oee.events import CountEvent, Event, OeeEvent
from sync.keys import CloudKeyring
from tests.cloud_api.ingestion import enrolled_agent

T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)
QUANTITIES = ("produced", "good", "scrap", "rework")
MIGRATION = "0030_count_quantities.sql"


def spec(equipment: str, counters: tuple[str, ...]) -> EquipmentSpec:
    return validate(
        EquipmentSpec,
        {
            "id": equipment,
            "ideal_cycle_time": 1.0,
            "state_map": {0: "idle", 1: "running"},
            "counters": {name: {} for name in counters},
        },
    )


def plc_samples(equipment: str, counters: tuple[str, ...]) -> list[Sample]:
    """Ten minutes of a running machine: 12 parts a minute, 1 scrap, 1 rework, 10 good."""
    per_minute = {"total_count": 12, "good_count": 10, "scrap_count": 1, "rework_count": 1}
    samples = [Sample(equipment, "state", 1, T0)]
    for minute in range(11):
        at = T0 + timedelta(minutes=minute, seconds=30)
        samples += [Sample(equipment, c, per_minute[c] * minute, at) for c in counters]
    return samples


def old_shape(event: CountEvent) -> CountEvent:
    """The count event an agent before 0030 sent for the same increment: the increment of the
    counter that moved, in that counter's field only. This is the one hand-built stored event
    of these tests: no engine of this code base emits that shape any more, and the migration
    exists for events in it."""
    moved = "produced" if event.produced else next(q for q in QUANTITIES if getattr(event, q) > 0)
    update: dict[str, Any] = dict.fromkeys(QUANTITIES, 0) | {moved: getattr(event, moved)}
    return dataclasses.replace(event, **update)


def stored_counts(pg_url: str) -> dict[str, tuple[int, ...]]:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT event_id::text, body FROM facts.events WHERE kind = 'count'"
        ).fetchall()
    return {event_id: tuple(body[q] for q in QUANTITIES) for event_id, body in rows}


def quality_total(pool: ConnectionPool, site: str) -> dict[str, int]:
    with pool.connection() as conn:
        members = queries.resolve_scope(conn, "site", site, None, None)
        rows = queries.quality(conn, members, T0, T0 + timedelta(hours=1))
    return {q: sum(r[q] for r in rows) for q in QUANTITIES}


def test_count_events_stored_in_the_old_shape_are_rewritten_to_what_the_engine_sends(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    machines = {
        "press-t": ("total_count", "scrap_count", "rework_count"),
        "press-g": ("total_count", "good_count", "rework_count"),
    }
    old = enrolled_agent(pg_url, pool, cloud_keys, tmp_path / "o", agent_id="edge-o", site_id="p-o")
    new = enrolled_agent(pg_url, pool, cloud_keys, tmp_path / "n", agent_id="edge-n", site_id="p-n")
    expected: dict[str, tuple[int, ...]] = {}
    buckets: dict[str, Components] = {}
    for agent in (old, new):
        made: list[Event] = []
        for equipment, counters in machines.items():
            samples = plc_samples(equipment, counters)
            made += agent.engine_events(
                [spec(equipment, counters)], samples, T0, T0 + timedelta(minutes=12)
            )
        counts = [e for e in made if isinstance(e, CountEvent)]
        expected |= {e.event_id: tuple(getattr(e, q) for q in QUANTITIES) for e in counts}
        buckets[agent.site_id] = Components.pool(
            e.components for e in made if isinstance(e, OeeEvent)
        )
        others = [e for e in made if not isinstance(e, CountEvent)]
        sent = [old_shape(e) for e in counts] if agent is old else counts
        assert agent.send(others + sent) == "stored"
    assert stored_counts(pg_url) != expected  # the old agent's events are in the old shape
    want = {q: getattr(buckets["p-n"], q) for q in QUANTITIES}
    assert want == {"produced": 240, "good": 200, "scrap": 20, "rework": 20}
    assert quality_total(pool, "p-n") == want
    assert quality_total(pool, "p-o") != want

    sql = dict(migrations())[MIGRATION]
    for _ in range(2):  # a second run changes nothing
        with psycopg.connect(pg_url) as conn:
            conn.execute(sql.encode())
        assert stored_counts(pg_url) == expected
        assert quality_total(pool, "p-o") == want
        assert {q: getattr(buckets["p-o"], q) for q in QUANTITIES} == want
