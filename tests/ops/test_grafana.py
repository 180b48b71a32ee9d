"""deploy/grafana/oee-dashboard.json: every panel's SQL runs against a migrated database (with
Grafana's macros expanded as its PostgreSQL data source does) and the OEE it reads equals
the ratio of summed components."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "oee-dashboard.json"


def expand(sql: str, start: datetime, end: datetime) -> str:
    """The macros of Grafana's PostgreSQL data source, for one time range and one site."""
    sql = re.sub(
        r"\$__timeFilter\(([\w.]+)\)",
        lambda m: f"{m.group(1)} BETWEEN '{start.isoformat()}' AND '{end.isoformat()}'",
        sql,
    )
    sql = sql.replace("$__timeFrom()", f"'{start.isoformat()}'")
    sql = sql.replace("$__timeTo()", f"'{end.isoformat()}'")
    sql = re.sub(
        r"\$__timeGroupAlias\(([\w.]+), '1h'\)",
        lambda m: f"date_trunc('hour', {m.group(1)}) AS time",
        sql,
    )
    return sql.replace("${site:sqlstring}", "'s1'").replace("${equipment:sqlstring}", "'m1','m2'")


def test_every_panel_query_runs_and_oee_is_pooled(pg_url: str) -> None:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    end = datetime(2026, 1, 6, tzinfo=UTC)
    start = end - timedelta(days=1)
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO registry.sites(site_id) VALUES ('s1')")
        for eq, pbt, ideal_good in (("m1", 3600.0, 3000.0), ("m2", 7200.0, 3600.0)):
            conn.execute(
                "INSERT INTO rollups.oee_1h(site_id, equipment_id, bucket, planned_busy_s, "
                "production_s, ideal_produced_s, ideal_good_s, produced, good, fault_s) "
                "VALUES ('s1', %s, %s, %s, %s, %s, %s, 10, 9, 60)",
                (eq, end - timedelta(hours=3), pbt, pbt * 0.9, ideal_good * 1.05, ideal_good),
            )
        queries = [t["rawSql"] for p in board["panels"] for t in p["targets"]]
        queries += [v["query"] for v in board["templating"]["list"]]
        assert len(queries) >= 10
        results = {}
        for sql in queries:
            rows = conn.execute(expand(sql, start, end)).fetchall()  # type: ignore[call-overload]
            results[sql] = rows
    oee_stat = next(p for p in board["panels"] if p["title"] == "OEE")["targets"][0]["rawSql"]
    # pooled: (3000 + 3600) / (3600 + 7200), not the mean of 0.833 and 0.5
    assert results[oee_stat][0][0] == pytest.approx(6600 / 10800)
