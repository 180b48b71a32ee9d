"""Batches of one agent handled in the same round are stored in one transaction
(BatchWriter.store_group): exactly what storing them one by one stores, with replays and
reused keys answered per batch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from cloud_api.ingest.worker import Checked
from connectors.sample import Sample
from oee.events import Event
from sync.keys import CloudKeyring
from tests.cloud_api.ingestion import Agent, enrolled_agent, press_spec

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)


def shift_events(agent: Agent) -> list[Event]:
    """Twenty minutes of two presses: running, counting, a fault with a reason, scrap."""
    samples: list[Sample] = []
    for press in ("press-1", "press-2"):
        samples += [
            Sample(press, "product", 1, T0),
            Sample(press, "total_count", 0, T0),
            Sample(press, "scrap_count", 0, T0),
            Sample(press, "rework_count", 0, T0),
            Sample(press, "state", 1, T0),
        ]
    for i in range(1, 20 * 6):
        ts = T0 + timedelta(seconds=10 * i)
        for n, press in enumerate(("press-1", "press-2")):
            samples.append(Sample(press, "total_count", 8 * i + n, ts))
            if i % 25 == 0:
                samples.append(Sample(press, "scrap_count", i // 25, ts))
            if i == 40 + 10 * n:
                samples += [Sample(press, "reason", 1, ts), Sample(press, "state", 2, ts)]
            if i == 55 + 10 * n:
                samples.append(Sample(press, "state", 1, ts))
    samples.sort(key=lambda s: s.ts)
    specs = [press_spec("press-1"), press_spec("press-2")]
    return agent.engine_events(specs, samples, T0, T0 + timedelta(minutes=20))


def chunks(events: list[Event], size: int) -> list[list[Event]]:
    return [events[i : i + size] for i in range(0, len(events), size)]


def stored_state(pg_url: str, site: str) -> dict[str, Any]:
    """What ingest stored for one site, without the site and agent names."""
    with psycopg.connect(pg_url) as conn:

        def rows(query: str) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in conn.execute(query, (site,)).fetchall()]

        return {
            "events": rows(
                "SELECT kind, equipment_id, count(*) FROM facts.events WHERE site_id = %s "
                "GROUP BY 1, 2 ORDER BY 1, 2"
            ),
            "buckets": rows(
                "SELECT equipment_id, bucket_start, produced, good, scrap, planned_busy_s, "
                "production_s, fault_s FROM facts.oee_buckets WHERE site_id = %s ORDER BY 1, 2"
            ),
            "minute": rows(
                "SELECT equipment_id, bucket, produced, good, scrap, planned_busy_s, "
                "production_s, fault_s, fault_stops FROM rollups.oee_1m WHERE site_id = %s "
                "ORDER BY 1, 2"
            ),
            "hour": rows(
                "SELECT equipment_id, bucket, produced, good, scrap, planned_busy_s, "
                "production_s, fault_s, fault_stops FROM rollups.oee_1h WHERE site_id = %s "
                "ORDER BY 1, 2"
            ),
            "days": rows(
                "SELECT equipment_id, day FROM rollups.data_versions WHERE site_id = %s "
                "ORDER BY 1, 2"
            ),
            "batches": rows(
                "SELECT seq, event_count FROM facts.batches WHERE site_id = %s ORDER BY 1"
            ),
            "epochs": rows("SELECT max_seq, batches FROM ops.agent_epochs WHERE site_id = %s"),
            "gaps": rows("SELECT first_seq, last_seq FROM ops.seq_gaps WHERE site_id = %s"),
            "equipment": rows(
                "SELECT equipment_id, agent_id IS NOT NULL FROM registry.equipment "
                "WHERE site_id = %s ORDER BY 1"
            ),
        }


def checked(agent: Agent, raw: bytes) -> Checked:
    result = agent.store.check(agent.topic, raw)
    assert isinstance(result, Checked), result
    return result


def test_batches_stored_together_store_what_they_store_one_by_one(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    alone = enrolled_agent(pg_url, pool, cloud_keys, tmp_path / "a", agent_id="e-1", site_id="s-1")
    grouped = enrolled_agent(
        pg_url, pool, cloud_keys, tmp_path / "b", agent_id="e-2", site_id="s-2"
    )
    parts_alone = chunks(shift_events(alone), 40)
    parts_grouped = chunks(shift_events(grouped), 40)
    assert len(parts_alone) == len(parts_grouped) >= 4
    for part in parts_alone:
        assert alone.send(part) == "stored"
    # Out of seq order, as workers may take them off the queue.
    group = [checked(grouped, grouped.sealed(p)) for p in parts_grouped]
    group = group[1::2] + group[::2]
    outcomes = grouped.store.store_group(group)
    assert [o.status for o in outcomes] == ["stored"] * len(group)
    assert [o.header.seq for o in outcomes if o.header] == [c.header.seq for c in group]
    assert sum(o.events for o in outcomes) == sum(len(p) for p in parts_grouped)
    assert all(o.acked for o in outcomes)

    one_by_one = stored_state(pg_url, "s-1")
    together = stored_state(pg_url, "s-2")
    assert one_by_one["buckets"], "the shift closed no bucket"
    assert together == one_by_one


def test_a_group_answers_replays_and_reused_keys_per_batch(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="e-3", site_id="s-3")
    parts = chunks(shift_events(agent), 50)
    first = agent.sealed(parts[0])
    assert agent.store.process(agent.topic, first).status == "stored"
    reused = agent.sealed(parts[1], seq=1)  # seq 1 again, other content
    fresh = agent.sealed(parts[2])
    group = [checked(agent, first), checked(agent, fresh), checked(agent, reused)]
    group.append(checked(agent, fresh))  # the same batch twice in one round
    outcomes = agent.store.store_group(group)
    assert [(o.status, o.reason) for o in outcomes] == [
        ("duplicate", None),
        ("stored", None),
        ("rejected", "conflict"),
        ("duplicate", None),
    ]
    assert outcomes[0].acked and outcomes[3].acked
    assert outcomes[2].rejection is not None and not outcomes[2].acked
    with psycopg.connect(pg_url) as conn:
        events = conn.execute(
            "SELECT count(*), count(DISTINCT event_id) FROM facts.events WHERE site_id = 's-3'"
        ).fetchone()
        reasons = conn.execute(
            "SELECT reason, count(*) FROM ops.quarantine WHERE agent_id = 'e-3' "
            "GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert events == (len(parts[0]) + len(parts[2]),) * 2
    assert reasons == [("conflict", 1), ("replay", 2)]
