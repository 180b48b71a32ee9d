"""`GET /v1/kpis` against a real PostgreSQL, with events made by the engine from PLC samples
and stored by the real ingest path: the KPIs of oee.kpis from the components `/v1/oee`
serves, per bucket, group and window, with failures counted where each stop starts, `kpi=`,
CSV, 422 for an unknown KPI and site scoping; the cross-view checker last."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from psycopg_pool import ConnectionPool

from cloud_api.access.auth import TokenKeyring, issue_token
from cloud_api.config import CloudSettings, DatabaseSettings
from connectors.sample import Sample
from oee.components import Components
from oee.events import Event, OeeEvent
from oee.kpis import KPI_NAMES, kpis
from sync.keys import CloudKeyring
from tests.cloud_api.ingestion import enrolled_agent, press_spec
from tests.cloud_api.test_query_api import ApiClient, api  # noqa: F401 (the api fixture)
from tests.invariants import check_views

T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)  # a Monday, closed window
T1 = T0 + timedelta(hours=2)
RUNNING, FAULT, IDLE, SETUP = 1, 2, 0, 3


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def press_samples(equipment: str, states: list[tuple[float, int, int | None]]) -> list[Sample]:
    """States (minute, state, reason) and every 10 minutes 500 parts, 10 scrap, 5 rework."""
    samples = [Sample(equipment, c, 0, T0) for c in ("total_count", "scrap_count", "rework_count")]
    timeline: list[tuple[float, Sample]] = []
    for minute, state, reason in states:
        if reason is not None:
            timeline.append((minute, Sample(equipment, "reason", reason, at(minute))))
        timeline.append((minute, Sample(equipment, "state", state, at(minute))))
    for n in range(1, 12):
        minute = n * 10 + 0.5
        timeline += [
            (minute, Sample(equipment, "total_count", 500 * n, at(minute))),
            (minute, Sample(equipment, "scrap_count", 10 * n, at(minute))),
            (minute, Sample(equipment, "rework_count", 5 * n, at(minute))),
        ]
    return samples + [s for _, s in sorted(timeline, key=lambda item: item[0])]


# press-1: a 5 min fault at 06:10, a 90 s fault at 06:50:30, a 5 min idle stop at 07:10.
PRESS_1 = [
    (0, RUNNING, None), (10, FAULT, 1), (15, RUNNING, None), (50.5, FAULT, 2), (52, RUNNING, None),
    (70, IDLE, 2), (75, RUNNING, None),
]  # fmt: skip
# press-2: one fault of an hour from 06:30 (across the 07:00 edge), 10 min setup at 07:40.
PRESS_2 = [(0, RUNNING, None), (30, FAULT, 1), (90, RUNNING, None), (100, SETUP, None),
           (110, RUNNING, None)]  # fmt: skip


def get(client: httpx.Client, path: str, **params: Any) -> Any:
    r = client.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def window(**extra: Any) -> dict[str, Any]:
    return {"from": T0.isoformat(), "to": T1.isoformat(), **extra}


def same_kpis(got: dict[str, Any], want: dict[str, Any]) -> None:
    for name, value in want.items():
        if value is None:
            assert got[name] is None, name
        else:
            assert got[name] == pytest.approx(value, rel=1e-9), name


@pytest.fixture
def stored(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> dict[str, Components]:
    """Two presses at plant-a and one at plant-b, through the engine and the real ingest;
    returns each equipment's components as the engine made them."""
    made: dict[str, Components] = {}
    plants = {
        ("edge-a", "plant-a"): {"press-1": PRESS_1, "press-2": PRESS_2},
        ("edge-b", "plant-b"): {"press-9": PRESS_1},
    }
    for (agent_id, site), presses in plants.items():
        agent = enrolled_agent(
            pg_url, pool, cloud_keys, tmp_path / agent_id, agent_id=agent_id, site_id=site
        )
        events: list[Event] = []
        for eq, states in presses.items():
            out = agent.engine_events([press_spec(eq)], press_samples(eq, states), T0, T1)
            made[eq] = Components.pool(e.components for e in out if isinstance(e, OeeEvent))
            events += out
        assert agent.send(events) == "stored"
    return made


def test_kpis_from_summed_components_with_failures_where_stops_start(
    api: ApiClient,  # noqa: F811
    stored: dict[str, Components],
    pg_url: str,
    tmp_path: Path,
) -> None:
    press_1, press_2 = stored["press-1"], stored["press-2"]
    # By hand: press-1 fails twice (300 s + 90 s of faults; its idle stop is no failure),
    # press-2 once (3,600 s).
    assert (press_1.fault_stops, press_1.fault_s) == (2, pytest.approx(390))
    assert (press_2.fault_stops, press_2.fault_s) == (1, pytest.approx(3_600))

    scope = window(scope="site", id="plant-a", interval="1h", group_by="equipment")
    body = get(api, "/v1/kpis", **scope)
    oee = get(api, "/v1/oee", **scope)
    assert body["kpis"] == list(KPI_NAMES)
    total = body["total"]
    for name, value in oee["total"]["components"].items():
        assert total["components"][name] == pytest.approx(value, abs=1e-6), name
    assert total["calendar_s"] == 2 * 7_200  # two presses over two hours
    same_kpis(total, kpis(press_1 + press_2, 2 * 7_200))
    assert total["failures"] == 3
    assert total["mttr_s"] == pytest.approx(3_990 / 3)
    assert total["oee"] == pytest.approx(oee["total"]["oee"])
    assert total["loading"] == pytest.approx(1.0)  # the shift runs around the clock

    groups = {g["equipment"]: g for g in body["groups"]}
    assert set(groups) == {"press-1", "press-2"}
    same_kpis(groups["press-1"]["total"], kpis(press_1, 7_200))
    assert groups["press-1"]["total"]["mtbf_s"] == pytest.approx(press_1.production_s / 2)
    # press-2's hour-long fault starts at 06:30: counted in the 06:00 hour only, so the 07:00
    # hour has 30 min of fault time and no failure (MTTR undefined there).
    hours = {b["start"][11:16]: b for b in groups["press-2"]["buckets"]}
    assert hours["06:00"]["failures"] == 1 and hours["06:00"]["mttr_s"] == pytest.approx(1_800)
    assert hours["07:00"]["failures"] == 0 and hours["07:00"]["mttr_s"] is None
    assert hours["07:00"]["components"]["fault_s"] == pytest.approx(1_800)
    assert all(b["calendar_s"] == 3_600 for b in hours.values())
    # The window's MTTR pools the hours: 3,600 s / 1 failure, not a mean over hours.
    assert groups["press-2"]["total"]["mttr_s"] == pytest.approx(3_600)

    # Minute buckets pool to the same window KPIs.
    minutes = get(api, "/v1/kpis", **window(scope="site", id="plant-a", interval="1m"))
    same_kpis(minutes["total"], {k: total[k] for k in KPI_NAMES})
    assert sum(b["failures"] for b in minutes["groups"][0]["buckets"]) == 3

    # Shift buckets have no calendar of their own; the window does.
    shifts = get(api, "/v1/kpis", **window(scope="equipment", id="press-1", interval="shift"))
    assert all(b["calendar_s"] is None and b["loading"] is None
               for b in shifts["groups"][0]["buckets"])  # fmt: skip
    assert shifts["total"]["calendar_s"] == 7_200

    check_views(api, pg_url)


def test_kpi_selection_csv_errors_and_site_scoping(
    api: ApiClient,  # noqa: F811
    stored: dict[str, Components],
    pg_url: str,
    tmp_path: Path,
) -> None:
    scope = window(scope="equipment", id="press-1", interval="1h")
    picked = api.get("/v1/kpis", params=[*scope.items(), ("kpi", "mttr_s"), ("kpi", "failures")])
    assert picked.status_code == 200, picked.text
    assert list(picked.json()["total"]) == [
        "calendar_s", "failures", "mttr_s", "components", "targets", "against_targets"
    ]  # fmt: skip
    commas = get(api, "/v1/kpis", kpi="oee,mtbf_s", **scope)
    assert commas["kpis"] == ["oee", "mtbf_s"]
    assert commas["total"]["mtbf_s"] == pytest.approx(stored["press-1"].production_s / 2)

    bad = api.get("/v1/kpis", params={**scope, "kpi": "mtbf"})
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("application/problem+json")
    assert [p["name"] for p in bad.json()["invalid_params"]] == ["kpi"]
    assert "mtbf_s" in bad.json()["detail"]

    as_csv = api.get("/v1/kpis", params=scope, headers={"Accept": "text/csv"})
    assert as_csv.status_code == 200
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [r["start"][11:16] for r in rows] == ["06:00", "07:00"]
    assert {"calendar_s", *KPI_NAMES, "fault_stops", "micro_stops"} <= set(rows[0])
    # Both faults start in the 06:00 hour: 390 s over 2 failures there, none after.
    assert [r["failures"] for r in rows] == ["2", "0"]
    assert [r["mttr_s"] for r in rows] == [str(195.0), ""]

    # A caller who sees plant-b only: plant-a does not exist for it, plant-b does.
    keys = tmp_path / "api-keys"
    token, _ = issue_token(
        TokenKeyring.load(keys),
        CloudSettings(database=DatabaseSettings(url=pg_url), keys_dir=keys).security,
        subject="viewer-b",
        role="viewer", sites=["plant-b"], ttl=timedelta(hours=1),
    )  # fmt: skip
    viewer = {"Authorization": f"Bearer {token}"}
    hidden = api.get("/v1/kpis", params=window(scope="site", id="plant-a"), headers=viewer)
    assert hidden.status_code == 404
    seen = api.get("/v1/kpis", params=window(scope="site", id="plant-b"), headers=viewer)
    assert seen.status_code == 200
    assert seen.json()["total"]["failures"] == stored["press-9"].fault_stops == 2
    unauthenticated = httpx.get(
        str(api.base_url.join("/v1/kpis")), params=window(scope="site", id="plant-b")
    )
    assert unauthenticated.status_code == 401

    check_views(api, pg_url)
