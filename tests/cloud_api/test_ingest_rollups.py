"""Rollups add each stored bucket exactly once, whatever batch carries it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

from sync.keys import CloudKeyring
from tests.cloud_api.ingestion import enrolled_agent


def test_a_bucket_sent_again_in_another_batch_is_rolled_up_once(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    agent = enrolled_agent(
        pg_url, pool, cloud_keys, tmp_path / "a", agent_id="edge-r", site_id="site-r"
    )
    start = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    bucket = agent.bucket(
        "press-9",
        start,
        planned_busy_s=60,
        production_s=45,
        produced=40,
        good=38,
        scrap=2,
        ideal_produced_s=40,
        ideal_good_s=38,
    )
    other = agent.bucket(
        "press-9", start.replace(minute=1), planned_busy_s=60, production_s=60, produced=10, good=10
    )
    assert agent.send([bucket]) == "stored"
    assert agent.send([bucket, other]) == "stored"  # a new batch key, one bucket already stored
    with psycopg.connect(pg_url) as conn:
        facts = conn.execute(
            "SELECT count(*) FROM facts.oee_buckets WHERE equipment_id = 'press-9'"
        ).fetchone()
        minute = conn.execute(
            "SELECT sum(produced), sum(planned_busy_s) FROM rollups.oee_1m "
            "WHERE equipment_id = 'press-9'"
        ).fetchone()
        hour = conn.execute(
            "SELECT produced, planned_busy_s FROM rollups.oee_1h WHERE equipment_id = 'press-9'"
        ).fetchone()
    assert facts == (2,)
    assert minute == (50, 120.0)
    assert hour == (50, 120.0)
