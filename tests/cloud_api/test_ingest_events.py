"""Events are stored from the batch's validated models, normalized, or not at all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from sync.envelope import EnvelopeHeader, seal
from sync.keys import CloudKeyring
from tests.cloud_api.ingestion import Agent, enrolled_agent


def send_raw(agent: Agent, events: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Seal hand-written event JSON (not pydantic's output) and ingest it."""
    agent.seq += 1
    header = EnvelopeHeader(
        agent_id=agent.agent_id, site_id=agent.site_id, epoch=agent.epoch, seq=agent.seq,
        count=len(events), signing_key_id=agent.keys.signing_key_id,
        cloud_key_id=agent.keys.cloud_public.key_id, suite=agent.keys.cloud_public.suite,
    )  # fmt: skip
    plaintext = json.dumps(events, indent=1).encode()
    raw = seal(plaintext, header, agent.keys.signing_key, agent.keys.cloud_public)
    outcome = agent.store.process(agent.topic, raw)
    return outcome.status, outcome.reason


def test_the_stored_body_is_the_validated_event_not_the_agents_text(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="edge-n", site_id="s-n")
    count = {
        "event_id": "01920000-0000-7000-8000-000000000001",
        "agent_id": "edge-n",
        "site_id": "s-n",
        "equipment_id": "press-1",
        "ts": "2026-03-02T10:00:00+02:00",  # not UTC; defaults (good, scrap, ...) left out
        "kind": "count",
        "produced": 3,
    }
    state = {
        "event_id": "01920000-0000-7000-8000-000000000002",
        "agent_id": "edge-n",
        "site_id": "s-n",
        "ts": "2026-03-02T08:00:01Z",
        "kind": "state",
        "state": "idle",
    }
    assert send_raw(agent, [count, state]) == ("stored", None)
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT ts = '2026-03-02T08:00:00Z', equipment_id, kind, body, epoch, seq "
            "FROM facts.events ORDER BY ts"
        ).fetchall()
    assert [r[:3] for r in rows] == [(True, "press-1", "count"), (False, None, "state")]
    body = rows[0][3]
    assert body["ts"] == "2026-03-02T08:00:00Z"
    assert (body["good"], body["scrap"], body["in_plan"], body["product"]) == (0, 0, True, None)
    assert rows[1][3]["previous"] is None
    assert {(r[4], r[5]) for r in rows} == {(agent.epoch, agent.seq)}


def test_one_invalid_event_rejects_the_whole_batch(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="edge-v", site_id="s-v")
    good = {"agent_id": "edge-v", "site_id": "s-v", "ts": "2026-03-02T08:00:00Z", "kind": "count"}
    bad = {**good, "ts": "2026-03-02T08:00:01"}  # no offset: not an aware timestamp
    assert send_raw(agent, [good, good, bad]) == ("rejected", "invalid_schema")
    with psycopg.connect(pg_url) as conn:
        events = conn.execute("SELECT count(*) FROM facts.events").fetchone()
        batches = conn.execute("SELECT count(*) FROM facts.batches").fetchone()
        kept = conn.execute(
            "SELECT count(*) FROM ops.quarantine WHERE reason = 'invalid_schema'"
        ).fetchone()
    assert (events, batches, kept) == ((0,), (0,), (1,))
