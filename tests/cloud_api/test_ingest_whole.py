"""A batch without configuration reports or loss records is stored by one call that is its
own transaction (ops.ingest_batch, migration 0041): exactly what the statements of a
transaction store (store_group's path), status reports included; batches with
configuration reports or loss records take the statements."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from oee.components import COMPONENT_FIELDS
from oee.events import AgentEvent, Event
from sync.keys import CloudKeyring
from tests.cloud_api.ingestion import Agent, enrolled_agent
from tests.cloud_api.test_ingest_groups import T0, checked, chunks, shift_events, stored_state


def status(agent: Agent, minute: int, depth: int) -> AgentEvent:
    return AgentEvent(
        agent_id=agent.agent_id,
        site_id=agent.site_id,
        ts=T0 + timedelta(minutes=minute),
        code="status",
        message="status",
        data={"version": f"1.{minute}", "outbox_depth": depth, "not_kept": True},
    )


def with_status(agent: Agent, parts: list[list[Event]]) -> list[list[Event]]:
    """The parts with a status report each, the last one older than the one before (the
    newest report must stay)."""
    out = [[*p, status(agent, 10 + i, i)] for i, p in enumerate(parts)]
    out[-1][-1] = status(agent, 0, 99)
    return out


def agent_row(pg_url: str, agent_id: str) -> tuple[Any, ...]:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT status, version, status_reported_at, last_batch_created IS NOT NULL "
            "FROM registry.agents WHERE agent_id = %s",
            (agent_id,),
        ).fetchone()
    assert row is not None
    return tuple(row)


def test_one_call_stores_what_the_statements_store(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    whole = enrolled_agent(pg_url, pool, cloud_keys, tmp_path / "a", agent_id="w-1", site_id="s-1")
    statements = enrolled_agent(
        pg_url, pool, cloud_keys, tmp_path / "b", agent_id="w-2", site_id="s-2"
    )
    parts_whole = with_status(whole, chunks(shift_events(whole), 40))
    parts_statements = with_status(statements, chunks(shift_events(statements), 40))
    # One batch at a time: each its own call (no configuration report, no loss record).
    raws = [whole.sealed(part) for part in parts_whole]
    for raw in raws:
        assert whole.store.process(whole.topic, raw).status == "stored"
    # The same together: store_group's transaction, statement by statement.
    group = [checked(statements, statements.sealed(part)) for part in parts_statements]
    assert [o.status for o in statements.store.store_group(group)] == ["stored"] * len(group)

    assert stored_state(pg_url, "s-1")["buckets"], "the shift closed no bucket"
    assert stored_state(pg_url, "s-1") == stored_state(pg_url, "s-2")
    row = agent_row(pg_url, "w-1")
    assert row == agent_row(pg_url, "w-2")
    newest = len(parts_whole) - 2
    assert row[0] == {"version": f"1.{10 + newest}", "outbox_depth": newest}
    assert row[1] == f"1.{10 + newest}"
    assert row[2] == T0 + timedelta(minutes=10 + newest)
    assert row[3]

    # Sent again: a duplicate, nothing stored twice, no rollup added twice.
    before = stored_state(pg_url, "s-1")
    assert whole.store.process(whole.topic, raws[0]).status == "duplicate"
    assert stored_state(pg_url, "s-1") == before


def test_a_batch_with_a_configuration_report_takes_the_statements(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="w-3", site_id="s-3")
    config = AgentEvent(
        agent_id="w-3",
        site_id="s-3",
        ts=T0,
        code="config",
        message="configuration",
        data={"timezone": "Europe/Berlin", "equipment": [{"id": "press-9", "line": "l-1"}]},
    )
    assert agent.send([status(agent, 1, 7), config]) == "stored"
    with psycopg.connect(pg_url) as conn:
        timezone = conn.execute("SELECT timezone FROM registry.sites WHERE site_id = 's-3'")
        line = conn.execute(
            "SELECT line_id FROM registry.equipment WHERE equipment_id = 'press-9'"
        ).fetchone()
        assert timezone.fetchone() == ("Europe/Berlin",)
    assert line == ("l-1",)
    assert agent_row(pg_url, "w-3")[:2] == ({"version": "1.1", "outbox_depth": 7}, "1.1")


def test_the_bucket_function_names_every_component(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT pg_get_functiondef('ops.store_buckets(jsonb)'::regprocedure)"
        ).fetchone()
    assert row is not None
    # Each component is read from the JSON, inserted, and summed into both rollups.
    missing = [c for c in COMPONENT_FIELDS if row[0].count(f"sum({c})") != 2]
    assert missing == []
    assert all(f"'{c}')" in row[0] for c in COMPONENT_FIELDS)
