"""Stop reasons in the cloud: the timeline's stops carry the reason the PLC set, and their
durations by reason are the Pareto's, also when the reason changes during a stop."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from psycopg_pool import ConnectionPool

from cloud_api.api import queries
from common.checks import validate
from connectors.sample import Sample
from oee.config import EquipmentSpec
from sync.keys import CloudKeyring
from tests.cloud_api.ingestion import enrolled_agent

T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)


@pytest.mark.parametrize("state_first", [True, False])
def test_downtime_events_by_reason_equal_the_pareto(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path, state_first: bool
) -> None:
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="edge-r", site_id="p-r")
    press = validate(
        EquipmentSpec,
        {
            "id": "press-1",
            "ideal_cycle_time": 1.0,
            "state_map": {0: "idle", 1: "running", 2: "fault"},
            "reason_map": {1: "jam", 2: "no material"},
            "counters": {"total_count": {}},
        },
    )
    m = timedelta(minutes=1)

    def scan(minute: float, state: int, reason: int) -> list[Sample]:
        both = [
            Sample("press-1", "state", state, T0 + minute * m),
            Sample("press-1", "reason", reason, T0 + minute * m),
        ]
        return both if state_first else both[::-1]

    samples = scan(0, 1, 0) + scan(5, 2, 1) + scan(12, 1, 0) + scan(20, 0, 2)
    samples += [Sample("press-1", "reason", 1, T0 + 23 * m)]  # the cause turns out to be a jam
    samples += scan(26, 1, 0)
    assert agent.send(agent.engine_events([press], samples, T0, T0 + 30 * m)) == "stored"

    window = (T0, T0 + 30 * m)
    with pool.connection() as conn:
        members = queries.resolve_scope(conn, "site", "p-r", None, None)
        pareto = dict(queries.pareto(conn, members, *window, by="reason"))
        stops = queries.state_intervals(conn, members, *window, states=("fault", "idle"))
    by_reason: dict[str, float] = {}
    for stop in stops:
        by_reason[stop["reason"]] = by_reason.get(stop["reason"], 0.0) + stop["duration_s"]
    assert [(s["state"], s["reason"], s["duration_s"]) for s in stops] == [
        ("fault", "jam", 420.0),
        ("idle", "no material", 180.0),
        ("idle", "jam", 180.0),
    ]
    assert by_reason == pareto == {"jam": 600.0, "no material": 180.0}
