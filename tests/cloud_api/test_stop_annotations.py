"""Stops that people classify: an annotation on a stop's start gives it a reason in every view.

PLC samples -> the agent's engine and sealed outbox (`AgentRuntime.record`) -> the real
ingest (BatchWriter.process) -> PostgreSQL -> the HTTP API; each test ends with the
cross-view checker, which applies the live annotations itself."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from agent.config import AgentConfig, parse_config
from cloud_api.access.auth import TokenKeyring, issue_token
from cloud_api.config import SecuritySettings
from sync.keys import CloudKeyring
from tests.cloud_api.test_downtime_planned import machine, seed
from tests.invariants import Truth, api_client, check_views

CONFIG = """
agent: {{id: edge-notes, site: plant-notes, state_dir: {state}, bucket_seconds: 60}}
connections: [{{id: plc, type: modbus, host: 127.0.0.1, port: 5020}}]
mqtt: {{host: 127.0.0.1, port: 1883}}
shifts: [{{name: early, start: "06:00", end: "14:00"}}]
equipment:
  - id: press-1
    connection: plc
    ideal_cycle_time: 1s
    signals:
      state: {{address: "holding:0", type: uint16, map: {{0: idle, 1: running, 2: fault}}}}
      total_count: {{address: "holding:1", type: uint32, width: 32}}
      reason: {{address: "holding:5", type: uint16, map: {{1: no material, 3: jam}}}}
"""
DAY = datetime(2026, 11, 2, tzinfo=UTC)
RUNNING, IDLE, FAULT = 1, 0, 2
JAM = 3
SITE, EQ = "plant-notes", "press-1"
ANNOTATIONS = f"/v1/equipment/{EQ}/annotations"


def at(hh_mm: str) -> datetime:
    h, m = map(int, hh_mm.split(":"))
    return DAY + timedelta(hours=h, minutes=m)


LO, HI = at("05:00"), at("11:00")
WINDOW = {"from": LO.isoformat(), "to": HI.isoformat()}
SCOPE = {"scope": "equipment", "id": EQ, "site": SITE, **WINDOW}
# A fault without a reason (20 min), an idle stop without one (10 min), a jam (5 min).
FAULT_START, IDLE_START, JAM_START = at("07:00"), at("08:00"), at("10:00")


# What the PLC set, whatever people say afterwards: the checker compares `plc_reason` with it.
TRUTH = {EQ: Truth(stops=[("fault", None), ("idle", None), ("fault", "jam")])}


def settle(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp: Path, text: str = CONFIG
) -> None:
    """press-1's history (`text`: the agent's YAML, CONFIG or a variant of it) stored by the
    real ingest."""
    config: AgentConfig = parse_config(text.format(state=tmp / "agent"), "notes.yaml", env={})
    history = machine(
        EQ,
        [
            (at("05:30"), RUNNING, 0),
            (FAULT_START, FAULT, 0),
            (at("07:20"), RUNNING, 0),
            (IDLE_START, IDLE, 0),
            (at("08:10"), RUNNING, 0),
            (JAM_START, FAULT, JAM),
            (at("10:05"), RUNNING, 0),
        ],
        HI,
    )
    history.sort(key=lambda s: s.ts)
    seed(pg_url, pool, cloud_keys, config, history, HI)


def get(api: httpx.Client, path: str, **params: Any) -> Any:
    r = api.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def pareto(api: httpx.Client) -> dict[str, float]:
    body = get(api, "/v1/downtime/pareto", by="reason", top=100, **SCOPE)
    return {i["reason"]: i["seconds"] for i in body["items"]}


GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "oee-dashboard.json"


def grafana_pareto(pg_url: str) -> dict[str, float]:
    """The Grafana Pareto panel's SQL, its macros expanded as Grafana's PostgreSQL source does
    (tests/ops/test_grafana.py), in seconds by reason."""
    board = json.loads(GRAFANA.read_text(encoding="utf-8"))
    panel = next(p for p in board["panels"] if p["title"] == "Downtime Pareto by reason (hours)")
    query = (
        panel["targets"][0]["rawSql"]
        .replace("$__timeFrom()", f"'{LO.isoformat()}'")
        .replace("$__timeTo()", f"'{HI.isoformat()}'")
        .replace("${site:sqlstring}", f"'{SITE}'")
        .replace("${equipment:sqlstring}", f"'{EQ}'")
    )
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(query).fetchall()
    return {reason: hours * 3600 for reason, hours in rows}


def same_pareto(api: httpx.Client, pg_url: str, want: dict[str, float]) -> None:
    """The API's Pareto and Grafana's panel both say `want`."""
    assert pareto(api) == want
    assert grafana_pareto(pg_url) == pytest.approx(want, abs=1e-6)


def stops(api: httpx.Client) -> list[tuple[str, str | None, str | None, float]]:
    rows = get(api, "/v1/downtime/events", **SCOPE)["stops"]
    return [(r["start"], r["reason"], r["plc_reason"], r["duration_s"]) for r in rows]


def timeline_stops(api: httpx.Client) -> list[tuple[str, str | None, str | None, Any]]:
    rows = get(api, f"/v1/equipment/{EQ}/states", site=SITE, **WINDOW)["intervals"]
    return [
        (r["start"], r["reason"], r["plc_reason"], r["annotation"])
        for r in rows
        if r["state"] in ("fault", "idle")
    ]


def unexplained(api: httpx.Client) -> list[tuple[str, float]]:
    rows = get(api, "/v1/downtime/unexplained", **SCOPE)["stops"]
    return [(r["start"], r["duration_s"]) for r in rows]


def annotate(api: httpx.Client, start: datetime, reason: str, **extra: Any) -> httpx.Response:
    note = {"site": SITE, "ts": start.isoformat(), "kind": "downtime", "reason": reason, **extra}
    return api.post(ANNOTATIONS, json=note)


def iso(t: datetime) -> str:
    return t.isoformat()


def test_a_classified_stop_moves_to_its_reason_in_every_view(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    settle(pg_url, pool, cloud_keys, tmp_path)
    with api_client(pg_url, tmp_path / "views-keys") as api:
        check_views(api, pg_url, truths=TRUTH)
        same_pareto(api, pg_url, {"unspecified": 1800.0, "jam": 300.0})
        assert unexplained(api) == [(iso(FAULT_START), 1200.0), (iso(IDLE_START), 600.0)]
        with psycopg.connect(pg_url) as conn:
            before = conn.execute("SELECT max(version) FROM rollups.data_versions").fetchone()
        etag = api.get("/v1/downtime/pareto", params=SCOPE).headers["ETag"]

        r = annotate(api, FAULT_START, "tool change", note="swapped the die")
        assert r.status_code == 201, r.text
        first = r.json()
        first_trace = r.headers["X-Trace-Id"]
        assert first["trace_id"] == first_trace

        # The Pareto moves the stop's 1200 planned seconds from "no reason" to its new one.
        same_pareto(api, pg_url, {"tool change": 1200.0, "unspecified": 600.0, "jam": 300.0})
        assert stops(api) == [
            (iso(FAULT_START), "tool change", None, 1200.0),
            (iso(IDLE_START), None, None, 600.0),
            (iso(JAM_START), "jam", "jam", 300.0),
        ]
        (fault, idle, jam) = timeline_stops(api)
        assert fault[:3] == (iso(FAULT_START), "tool change", None)
        assert fault[3]["annotation_id"] == first["annotation_id"]
        assert fault[3]["note"] == "swapped the die"
        # No author and no operator beside the reason: they are personal data.
        assert set(fault[3]) == {"annotation_id", "note", "created_at"}
        assert idle == (iso(IDLE_START), None, None, None)
        assert jam == (iso(JAM_START), "jam", "jam", None)
        assert unexplained(api) == [(iso(IDLE_START), 600.0)]
        # CSV carries the effective reason beside the PLC's.
        r = api.get("/v1/downtime/events", params=SCOPE, headers={"Accept": "text/csv"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(r.text)))
        assert [(row["reason"], row["plc_reason"]) for row in table] == [
            ("tool change", ""),
            ("", ""),
            ("jam", "jam"),
        ]
        r = api.get("/v1/downtime/pareto", params=SCOPE, headers={"Accept": "text/csv"})
        assert "tool change,1200.0" in r.text
        # The data version of the stop's day moved (every cache forgets that day), and the
        # Pareto's old ETag no longer matches.
        with psycopg.connect(pg_url) as conn:
            after = conn.execute(
                "SELECT version FROM rollups.data_versions WHERE site_id = %s "
                "AND equipment_id = %s AND day = %s",
                (SITE, EQ, DAY.date()),
            ).fetchone()
        assert before is not None and after is not None and after[0] > before[0]
        r = api.get("/v1/downtime/pareto", params=SCOPE, headers={"If-None-Match": etag})
        assert r.status_code == 200
        check_views(api, pg_url, truths=TRUTH)

        # A later annotation supersedes the earlier one.
        r = annotate(api, FAULT_START, "no material")
        assert r.status_code == 201, r.text
        second = r.json()
        same_pareto(api, pg_url, {"no material": 1200.0, "unspecified": 600.0, "jam": 300.0})
        assert stops(api)[0] == (iso(FAULT_START), "no material", None, 1200.0)
        assert timeline_stops(api)[0][3]["annotation_id"] == second["annotation_id"]
        check_views(api, pg_url, truths=TRUTH)

        # Deleting it restores the one before; deleting that restores the PLC's reason.
        r = api.delete(f"{ANNOTATIONS}/{second['annotation_id']}", params={"site": SITE})
        assert r.status_code == 204, r.text
        delete_trace = r.headers["X-Trace-Id"]
        assert pareto(api) == {"tool change": 1200.0, "unspecified": 600.0, "jam": 300.0}
        r = api.delete(f"{ANNOTATIONS}/{second['annotation_id']}", params={"site": SITE})
        assert r.status_code == 404  # already deleted
        r = api.delete(f"{ANNOTATIONS}/{first['annotation_id']}", params={"site": SITE})
        assert r.status_code == 204, r.text
        same_pareto(api, pg_url, {"unspecified": 1800.0, "jam": 300.0})
        assert stops(api)[0] == (iso(FAULT_START), None, None, 1200.0)
        assert timeline_stops(api)[0][3] is None
        assert unexplained(api) == [(iso(FAULT_START), 1200.0), (iso(IDLE_START), 600.0)]
        listed = get(api, ANNOTATIONS, site=SITE, **WINDOW)
        assert listed == []

        # Every change is audited with its trace id.
        with psycopg.connect(pg_url) as conn:
            audit = conn.execute(
                "SELECT action, detail, trace_id FROM audit.records "
                "WHERE action LIKE 'annotation.%' ORDER BY id"
            ).fetchall()
        assert [a[0] for a in audit] == ["annotation.create"] * 2 + ["annotation.delete"] * 2
        assert audit[0][2] == first_trace and audit[2][2] == delete_trace
        assert audit[1][1]["supersedes"] == first["annotation_id"]
        assert audit[2][1]["restored_annotation"] == first["annotation_id"]
        assert audit[3][1]["restored_annotation"] is None
        assert all(a[1]["stop_start"] == iso(FAULT_START) for a in audit)

        # Both stops without a reason classified, the jam reclassified: the checker agrees.
        for start, reason in (
            (FAULT_START, "tool change"),
            (IDLE_START, "cleaning"),
            (JAM_START, "die broke"),
        ):
            assert annotate(api, start, reason).status_code == 201
        same_pareto(api, pg_url, {"tool change": 1200.0, "cleaning": 600.0, "die broke": 300.0})
        assert unexplained(api) == []
        check_views(api, pg_url, truths=TRUTH)


def test_annotations_of_no_stop_or_of_a_site_not_covered_are_refused(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    settle(pg_url, pool, cloud_keys, tmp_path)
    keys = tmp_path / "views-keys"
    with api_client(pg_url, keys) as api:
        # Not the start of a stop: a second into it, a running interval, another day.
        for ts in (FAULT_START + timedelta(seconds=1), at("07:30"), FAULT_START - timedelta(1)):
            r = annotate(api, ts, "tool change")
            assert r.status_code == 422, r.text
            assert r.json()["type"].endswith("no-such-stop")
        # A site the caller's token does not cover reads as unknown, for writes and deletes.
        token, _ = issue_token(
            TokenKeyring.load(keys), SecuritySettings(), subject="other-plant",
            role="engineer", sites=["elsewhere"], ttl=timedelta(minutes=5),
        )  # fmt: skip
        other = {"Authorization": f"Bearer {token}"}
        note = {"site": SITE, "ts": iso(FAULT_START), "kind": "downtime", "reason": "x"}
        r = api.post(ANNOTATIONS, json=note, headers=other)
        assert r.status_code == 404, r.text
        created = annotate(api, FAULT_START, "tool change").json()
        r = api.delete(
            f"{ANNOTATIONS}/{created['annotation_id']}", params={"site": SITE}, headers=other
        )
        assert r.status_code == 404, r.text
        r = api.get("/v1/downtime/unexplained", params=SCOPE, headers=other)
        assert r.status_code == 404
        # Nothing was written by the refused requests.
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute(
                "SELECT reason, deleted_at FROM facts.annotations ORDER BY created_at"
            ).fetchall()
            actions = conn.execute(
                "SELECT action FROM audit.records WHERE action LIKE 'annotation.%'"
            ).fetchall()
        assert rows == [("tool change", None)]
        assert actions == [("annotation.create",)]
        assert pareto(api) == {"tool change": 1200.0, "unspecified": 600.0, "jam": 300.0}
        check_views(api, pg_url, truths=TRUTH)
