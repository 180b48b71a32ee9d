"""The /v1 read API against a real PostgreSQL, with data sealed and stored by the real ingest
path (BatchWriter.process): pooled OEE, time zones and DST, shifts, cache and late data,
CSV, downtime, states, quality, events, hierarchy and fleet health."""

from __future__ import annotations

import csv
import io
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from psycopg_pool import ConnectionPool

from cloud_api import cli
from cloud_api.access.auth import TokenKeyring, generate_token_key, issue_token
from cloud_api.api.app import create_app
from cloud_api.api.cache import DataMarks
from cloud_api.config import CloudSettings, DatabaseSettings
from connectors.sample import Sample
from oee.components import Components, ratios
from oee.events import AgentEvent, CountEvent, OeeEvent
from sync.keys import CloudKeyring
from tests.cloud_api.ingestion import Agent, enrolled_agent, press_spec
from tests.conftest import free_port

T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)  # a Monday, closed window


@pytest.fixture
def api(pg_url: str, pool: ConnectionPool, tmp_path: Path) -> Iterator[ApiClient]:
    settings = CloudSettings(database=DatabaseSettings(url=pg_url), keys_dir=tmp_path / "api-keys")
    with served(settings, pool) as client:
        yield client


class ApiClient(httpx.Client):
    """A client of the API served in this process; `marks` is the app's change memo."""

    marks: DataMarks

    def changes_seen(self, before: int | None) -> None:
        """Wait until the API processed a change notification after the stamp `before`.

        Notifications reach the API asynchronously, a moment after the writer's commit; a
        test that reads its own write waits for that moment as a later reader would.
        """
        deadline = time.monotonic() + 20
        while self.marks.stamp() == before:
            assert time.monotonic() < deadline, "no change notification reached the API"
            time.sleep(0.005)


@contextmanager
def served(settings: CloudSettings, pool: ConnectionPool) -> Iterator[ApiClient]:
    """The API served by uvicorn on a free local port, in a thread; the client carries a
    service token that sees every site."""
    generate_token_key(settings.keys_dir)
    token, _ = issue_token(
        TokenKeyring.load(settings.keys_dir), settings.security, subject="query-tests",
        role="service", sites=["*"], ttl=timedelta(hours=1),
    )  # fmt: skip
    app = create_app(settings, pool=pool)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    with ApiClient(
        base_url=f"http://127.0.0.1:{port}",
        timeout=30,
        headers={"Authorization": f"Bearer {token}"},
    ) as client:
        client.marks = app.state.data_marks
        yield client
    server.should_exit = True
    thread.join(10)


def agent_at(
    pg_url: str, pool: ConnectionPool, ring: CloudKeyring, tmp_path: Path, agent: str, site: str
) -> Agent:
    return enrolled_agent(
        pg_url, pool, ring, tmp_path / agent, agent_id=agent, site_id=site
    )  # fmt: skip


def oee(api: httpx.Client, **params: Any) -> dict[str, Any]:
    r = api.get("/v1/oee", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def approx_components(got: dict[str, Any], want: Components) -> None:
    for name, value in want.as_dict().items():
        assert got[name] == pytest.approx(value, abs=1e-6), name


def test_oee_is_pooled_from_sums_and_agrees_with_ratios(
    api: httpx.Client, pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    """Cloud ratios over buckets, shifts, days and sites equal oee.components.ratios of the
    pooled components, and differ from the mean of per-machine ratios."""
    rng = random.Random(4)
    a = agent_at(pg_url, pool, cloud_keys, tmp_path, "edge-a", "plant-a")
    b = agent_at(pg_url, pool, cloud_keys, tmp_path, "edge-b", "plant-b")
    sent: dict[str, list[Components]] = {}
    for agent, eq, speed in ((a, "press-a", 0.9), (b, "press-b", 0.5)):
        events = []
        for minute in range(0, 16 * 60, 1):  # two 8-hour shifts of 1-minute buckets
            start = T0 + timedelta(minutes=minute)
            shift_start = T0 + timedelta(hours=8 * (minute // 480))
            # press-b is planned only every other minute, so the machines' planned busy
            # times differ and the mean of their ratios is not the pooled ratio.
            planned = 60.0 if eq == "press-a" or minute % 2 == 0 else 0.0
            production = min(planned, rng.choice([60.0, 60.0, 60.0, 45.0, 0.0]))
            produced = int(production * speed)
            scrap = rng.randint(0, min(2, produced))
            c = dict(
                planned_busy_s=planned,
                off_plan_s=60.0 - planned,
                production_s=production,
                downtime_s=planned - production,
                fault_s=planned - production,
                produced=produced,
                good=produced - scrap,
                scrap=scrap,
                ideal_produced_s=produced * 1.0,
                ideal_good_s=(produced - scrap) * 1.0,
            )
            sent.setdefault(eq, []).append(Components(**c))  # type: ignore[arg-type]
            events.append(
                agent.bucket(
                    eq, start, shift=("early", "late")[minute // 480], shift_start=shift_start,
                    reasons={"jam": planned - production} if production < planned else None, **c,
                )
            )  # fmt: skip
        for i in range(0, len(events), 200):
            assert agent.send(events[i : i + 200]) == "stored"
    window = {"from": T0.isoformat(), "to": (T0 + timedelta(hours=16)).isoformat()}
    everything = Components.pool(sent["press-a"] + sent["press-b"])

    for scope, ident, parts in (
        ("equipment", "press-a", sent["press-a"]),
        ("equipment", "press-b", sent["press-b"]),
        ("site", "plant-a", sent["press-a"]),
    ):
        for interval in ("1m", "15m", "1h", "shift", "1d"):
            body = oee(api, scope=scope, id=ident, interval=interval, **window)
            pooled = Components.pool(parts)
            approx_components(body["total"]["components"], pooled)
            want = ratios(pooled)
            for k in ("availability", "performance", "quality", "oee"):
                assert body["total"][k] == pytest.approx(getattr(want, k)), (interval, k)
            # every bucket's ratios are those of its own components
            for bucket in body["groups"][0]["buckets"]:
                own = ratios(Components(**bucket["components"]))
                assert bucket["oee"] == pytest.approx(own.oee)
            if interval == "shift":
                assert [x["shift"] for x in body["groups"][0]["buckets"]] == ["early", "late"]
                first = Components.pool(parts[:480])
                approx_components(body["groups"][0]["buckets"][0]["components"], first)

    # Two sites: the pooled OEE is the ratio of summed components, not a mean of ratios.
    per = {
        eq: oee(api, scope="equipment", id=eq, interval="1d", **window)["total"]["oee"]
        for eq in ("press-a", "press-b")
    }
    pooled_oee = ratios(everything).oee
    assert pooled_oee is not None
    mean = (per["press-a"] + per["press-b"]) / 2
    assert pooled_oee != pytest.approx(mean, abs=1e-4)  # the data makes the difference visible
    both = [
        oee(api, scope="site", id=site, interval="1d", **window)["total"]["components"]
        for site in ("plant-a", "plant-b")
    ]
    summed = Components.pool(Components(**c) for c in both)
    assert ratios(summed).oee == pytest.approx(pooled_oee)
    grouped = oee(api, scope="site", id="plant-a", interval="1h", group_by="equipment", **window)
    assert [g["equipment"] for g in grouped["groups"]] == ["press-a"]
    assert len(grouped["groups"][0]["buckets"]) == 16


def test_days_in_a_time_zone_follow_dst_and_half_hour_offsets(
    api: httpx.Client, pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    a = agent_at(pg_url, pool, cloud_keys, tmp_path, "edge-tz", "plant-tz")
    start = datetime(2026, 3, 27, 12, 0, tzinfo=UTC)  # across the 23-hour 2026-03-29 in Berlin
    hours = 4 * 24
    events = [
        a.bucket("press-tz", start + timedelta(minutes=m), planned_busy_s=60.0, production_s=30.0)
        for m in range(0, hours * 60, 10)  # one bucket every 10 minutes keeps the test small
    ]
    for i in range(0, len(events), 300):
        a.send(events[i : i + 300])
    window = {"from": "2026-03-28T00:00:00+01:00", "to": "2026-03-31T00:00:00+02:00"}
    body = oee(api, scope="equipment", id="press-tz", interval="1d", tz="Europe/Berlin", **window)
    days = body["groups"][0]["buckets"]
    assert [d["start"][:10] for d in days] == ["2026-03-28", "2026-03-29", "2026-03-30"]
    lengths = [
        (datetime.fromisoformat(d["end"]) - datetime.fromisoformat(d["start"])).total_seconds()
        / 3600
        for d in days
    ]
    assert lengths == [24, 23, 24]
    # six 60-second buckets per hour were sent: planned time follows the day's length
    assert [d["components"]["planned_busy_s"] for d in days] == [24 * 360, 23 * 360, 24 * 360]
    assert body["source"] == "rollups.oee_1h"

    kolkata = oee(
        api, scope="equipment", id="press-tz", interval="1d", tz="Asia/Kolkata",
        **{"from": "2026-03-28T00:00:00+05:30", "to": "2026-03-30T00:00:00+05:30"},
    )  # fmt: skip
    assert kolkata["source"] == "rollups.oee_1m"
    assert [d["start"] for d in kolkata["groups"][0]["buckets"]] == [
        "2026-03-28T00:00:00+05:30",
        "2026-03-29T00:00:00+05:30",
    ]
    assert kolkata["total"]["components"]["planned_busy_s"] == 48 * 360
    # A window that does not start on a whole hour mixes 1-minute edges with hourly rollups.
    edge = oee(
        api, scope="equipment", id="press-tz", interval="1d", tz="UTC",
        **{"from": "2026-03-28T00:25:00Z", "to": "2026-03-28T05:35:00Z"},
    )  # fmt: skip
    assert edge["source"] == "rollups.oee_1h+rollups.oee_1m+rollups.oee_1m"
    # buckets at :30, :40, :50 of hour 0, all of hours 1-4, :00 :10 :20 :30 of hour 5
    assert edge["total"]["components"]["planned_busy_s"] == (3 + 24 + 4) * 60


def test_late_data_changes_buckets_and_the_cached_result_etag_and_csv(
    api: ApiClient, pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    a = agent_at(pg_url, pool, cloud_keys, tmp_path, "edge-late", "plant-late")
    day1, day2 = T0, T0 + timedelta(days=1)
    a.send([a.bucket("m1", day1, planned_busy_s=60, production_s=60)])
    a.send([a.bucket("m1", day2, planned_busy_s=60, production_s=30)])
    q1 = {"scope": "equipment", "id": "m1", "interval": "1h",
          "from": day1.isoformat(), "to": (day1 + timedelta(hours=2)).isoformat()}  # fmt: skip
    q2 = {**q1, "from": day2.isoformat(), "to": (day2 + timedelta(hours=2)).isoformat()}
    first = api.get("/v1/oee", params=q1)
    assert 'cache;desc="miss"' in first.headers["server-timing"]
    assert "app;dur=" in first.headers["server-timing"]
    assert "db;dur=" in first.headers["server-timing"]
    assert first.json()["total"]["availability"] == 1.0
    again = api.get("/v1/oee", params=q1)
    assert 'cache;desc="hit"' in again.headers["server-timing"]
    assert again.headers["etag"] == first.headers["etag"]
    assert "max-age" in again.headers["cache-control"]
    recomputed = api.get("/v1/oee", params=q1, headers={"Cache-Control": "no-cache"})
    assert 'cache;desc="miss"' in recomputed.headers["server-timing"]
    assert recomputed.headers["etag"] == first.headers["etag"]
    not_modified = api.get("/v1/oee", params=q1, headers={"If-None-Match": first.headers["etag"]})
    assert not_modified.status_code == 304
    assert api.get("/v1/oee", params=q2).json()["total"]["availability"] == 0.5

    # Late data for day 1 (a bucket the agent sends later) changes day 1 only.
    before = api.marks.stamp()
    a.send([a.bucket("m1", day1 + timedelta(minutes=1), planned_busy_s=60, production_s=0)])
    api.changes_seen(before)
    late = api.get("/v1/oee", params=q1)
    assert 'cache;desc="miss"' in late.headers["server-timing"]
    assert late.json()["total"]["availability"] == 0.5
    assert late.json()["groups"][0]["buckets"][0]["components"]["planned_busy_s"] == 120
    assert late.headers["etag"] != first.headers["etag"]
    stale = api.get("/v1/oee", params=q1, headers={"If-None-Match": first.headers["etag"]})
    assert stale.status_code == 200
    untouched = api.get("/v1/oee", params=q2)
    assert 'cache;desc="hit"' in untouched.headers["server-timing"]

    as_csv = api.get("/v1/oee", params=q1, headers={"Accept": "text/csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert len(rows) == 1
    assert float(rows[0]["availability"]) == 0.5
    assert float(rows[0]["planned_busy_s"]) == 120
    assert rows[0]["start"] == day1.isoformat()

    counts = api.get("/v1/counts", params=q1, headers={"Accept": "text/csv"})
    header = "start,end,shift,produced,good,scrap,rework,off_plan_produced"
    assert counts.text.splitlines()[0] == header


def test_bad_input_is_a_4xx_naming_the_parameter(
    api: httpx.Client, pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    a = agent_at(pg_url, pool, cloud_keys, tmp_path, "edge-x", "plant-x")
    a.send([a.bucket("m1", T0, planned_busy_s=60, production_s=60)])
    ok = {"scope": "equipment", "id": "m1", "from": T0.isoformat(),
          "to": (T0 + timedelta(hours=1)).isoformat()}  # fmt: skip
    cases = [
        ({**ok, "tz": "Mars/Olympus"}, 422, "tz"),
        ({**ok, "to": ok["from"]}, 422, "to"),
        ({**ok, "from": "2026-01-05T06:00:00"}, 422, "from"),
        ({**ok, "from": "yesterday"}, 422, "from"),
        ({**ok, "interval": "2h"}, 422, "interval"),
        ({**ok, "scope": "planet"}, 422, "scope"),
        ({**ok, "id": "nope"}, 404, "nope"),
        ({**ok, "interval": "1m", "from": "2020-01-01T00:00:00Z"}, 422, "interval"),
    ]
    for params, status, word in cases:
        r = api.get("/v1/oee", params=params)
        assert r.status_code == status, (params, r.text)
        assert word in r.text
    r = api.get("/v1/events", params={**ok, "cursor": "!!"})
    assert r.status_code == 422
    assert "cursor" in r.text
    r = api.get("/v1/events", params={**ok, "kind": "photo"})
    assert r.status_code == 422
    assert "kind" in r.text
    assert api.get("/v1/agents/ghost").status_code == 404
    # no interval: chosen from max_points
    body = oee(api, **{**ok, "to": (T0 + timedelta(days=2)).isoformat()}, max_points=100)
    assert body["interval"] == "1h"


def test_downtime_states_quality_events_hierarchy_and_fleet(
    api: httpx.Client, pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    a = agent_at(pg_url, pool, cloud_keys, tmp_path, "edge-d", "plant-d")
    config = AgentEvent(
        agent_id="edge-d", site_id="plant-d", ts=T0, code="config", message="configuration",
        data={"timezone": "Europe/Berlin", "shifts": [{"name": "early"}],
              "equipment": [{"id": "press-1", "line": "line-1", "reasons": {"1": "jam"}},
                            {"id": "press-2", "line": "line-1"}]},
    )  # fmt: skip
    status = AgentEvent(
        agent_id="edge-d", site_id="plant-d", ts=T0 + timedelta(minutes=5), code="status",
        message="status",
        data={"version": "1.2.3", "outbox_depth": 4, "outbox_oldest_unacked_s": 12.5,
              "clock_offset_s": -0.25, "unrelated": 1},
    )  # fmt: skip
    m = timedelta(minutes=1)
    press_1, press_2 = press_spec("press-1"), press_spec("press-2")
    plc = [  # (minute, equipment, signal, raw value), as a PLC reports them
        (0, "press-1", "state", 1), (0, "press-1", "product", 1), (0, "press-1", "reason", 0),
        (0, "press-1", "total_count", 0), (0, "press-1", "scrap_count", 0),
        (0, "press-1", "rework_count", 0), (0, "press-2", "state", 1),
        (1, "press-1", "total_count", 10), (1, "press-1", "scrap_count", 1),
        (1.5, "press-1", "product", 2),
        (2, "press-1", "total_count", 20), (2, "press-1", "scrap_count", 2),
        (2, "press-1", "rework_count", 1), (2.5, "press-1", "product", 1),
        (3, "press-1", "total_count", 25),
        (10, "press-1", "state", 2), (10, "press-1", "reason", 1),  # state first, as shipped
        (15, "press-1", "state", 1), (15, "press-1", "reason", 0),
        (20, "press-1", "state", 0), (20, "press-1", "reason", 2), (20, "press-2", "state", 3),
        (21, "press-2", "state", 1), (22, "press-1", "state", 1), (22, "press-1", "reason", 0),
    ]  # fmt: skip
    samples = [Sample(eq, signal, value, T0 + minute * m) for minute, eq, signal, value in plc]
    made = a.engine_events([press_1, press_2], samples, T0, T0 + 30 * m)
    buckets = [e for e in made if isinstance(e, OeeEvent)]
    live = [e for e in made if not isinstance(e, OeeEvent)]  # states, counts, flags
    counts = [e for e in live if isinstance(e, CountEvent)]
    assert a.send([config, status]) == "stored"
    assert a.send(live) == "stored"
    sealed = a.sealed(buckets, seq=5)  # seqs 3 and 4 never arrive
    assert a.store.process(a.topic, sealed).status == "stored"
    assert a.store.process(a.topic, sealed).status == "duplicate"  # resent: stored once
    raw = a.sealed([status], seq=99)
    tampered = raw[:-1] + bytes([raw[-1] ^ 1])
    assert a.store.process(a.topic, tampered).reason == "bad_signature"

    window = {"from": T0.isoformat(), "to": (T0 + timedelta(hours=1)).isoformat()}
    site = {"scope": "site", "id": "plant-d", **window}

    pareto = api.get("/v1/downtime/pareto", params={**site, "by": "reason", "top": 1}).json()
    assert [(i["reason"], i["seconds"]) for i in pareto["items"]] == [("jam", 300.0)]
    assert pareto["other_s"] == 120.0
    assert pareto["items"][0]["share"] == pytest.approx(300 / 420)
    by_class = api.get("/v1/downtime/pareto", params={**site, "by": "class"}).json()
    assert [(i["class"], i["seconds"]) for i in by_class["items"]] == [
        ("fault", 300.0), ("idle", 120.0), ("setup", 60.0),
    ]  # fmt: skip

    stops = api.get("/v1/downtime/events", params=site).json()["stops"]
    assert [(s["state"], s["reason"], s["duration_s"]) for s in stops] == [
        ("fault", "jam", 300.0), ("idle", "no material", 120.0),
    ]  # fmt: skip
    long_only = api.get("/v1/downtime/events", params={**site, "min_duration_s": 200}).json()
    assert len(long_only["stops"]) == 1

    # A window starting inside the fault takes the state from the event before it.
    timeline = api.get(
        "/v1/equipment/press-1/states",
        params={"from": (T0 + 12 * m).isoformat(), "to": (T0 + 30 * m).isoformat()},
    ).json()
    assert [(i["state"], i["duration_s"]) for i in timeline["intervals"]] == [
        ("fault", 180.0), ("running", 300.0), ("idle", 120.0), ("running", 480.0),
    ]  # fmt: skip
    assert sum(timeline["seconds_by_state"].values()) == 18 * 60

    quality = api.get("/v1/quality", params=site).json()
    assert quality["total"] == {"produced": 25, "good": 22, "scrap": 2, "rework": 1}
    in_buckets = Components.pool(b.components for b in buckets)
    assert quality["total"] == {k: getattr(in_buckets, k) for k in quality["total"]}
    assert {(r["product"], r["scrap"]) for r in quality["by_product"]} == {("A", 1), ("B", 1)}

    page1 = api.get("/v1/events", params={**site, "limit": 4}).json()
    assert len(page1["events"]) == 4
    seen = [e["event_id"] for e in page1["events"]]
    cursor = page1["next_cursor"]
    while cursor:
        page = api.get("/v1/events", params={**site, "limit": 4, "cursor": cursor}).json()
        seen += [e["event_id"] for e in page["events"]]
        cursor = page["next_cursor"]
    assert len(seen) == len(set(seen)) == 2 + len(live) + len(buckets)
    only_counts = api.get("/v1/events", params={**site, "kind": "count"}).json()["events"]
    assert len(only_counts) == len(counts)

    sites = api.get("/v1/sites").json()["sites"]
    assert sites == [{"site_id": "plant-d", "name": None, "timezone": "Europe/Berlin",
                      "lines": 1, "equipment": 2, "agents": 1}]  # fmt: skip
    lines = api.get("/v1/lines", params={"site": "plant-d"}).json()["lines"]
    assert lines == [{"site_id": "plant-d", "line_id": "line-1", "equipment": 2}]
    press = api.get("/v1/equipment/press-1").json()
    assert press["line_id"] == "line-1"
    assert press["reasons"] == {"1": "jam"}
    assert press["config"]["id"] == "press-1"
    line_oee = oee(api, scope="line", id="line-1", interval="1h", group_by="equipment", **window)
    assert [g["equipment"] for g in line_oee["groups"]] == ["press-1", "press-2"]

    fleet = api.get("/v1/agents").json()["agents"]
    assert len(fleet) == 1
    agent = api.get("/v1/agents/edge-d").json()
    assert agent == fleet[0] | {"seconds_since_seen": agent["seconds_since_seen"]}
    assert agent["version"] == "1.2.3"
    assert agent["outbox_depth"] == 4
    assert agent["outbox_oldest_unacked_s"] == 12.5
    assert agent["clock_offset_s"] == -0.25
    assert agent["sequence_gaps"] == [{"epoch": a.epoch, "from_seq": 3, "to_seq": 4}]
    assert agent["missing_batches"] == 2
    assert agent["ingest_lag_s"] is not None
    assert agent["last_seen"] is not None
    shared = api.get("/v1/agents", headers={"Accept": "text/csv"}).text.splitlines()
    assert shared[0].startswith("agent_id,site_id,")
    # The tampered batch proves nothing about who sent it: it is not charged to the agent it
    # names; the resent duplicate, signed by the agent, is.
    assert agent["rejected_batches"] == {"replay": 1}
    assert api.get("/metrics").text.count("api_result_cache_total") >= 1


def test_readiness_needs_the_database_and_the_broker(
    pg_url: str, pool: ConnectionPool, tmp_path: Path
) -> None:
    settings = CloudSettings(database=DatabaseSettings(url=pg_url), keys_dir=tmp_path / "keys")
    with served(settings, pool) as client:
        assert client.get("/readyz").json() == {"status": "ready"}
    settings.mqtt.port = free_port()  # nothing listens there
    with served(settings, pool) as client:
        r = client.get("/readyz")
        assert (r.status_code, r.json()) == (503, {"status": "broker unavailable"})


def test_retention_drops_whole_old_partitions_only(
    pg_url: str, pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    def old_tables() -> int:
        with pool.connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relname ~ '_2020'"
            ).fetchone()
        assert row is not None
        return int(row[0])

    with pool.connection() as conn:
        for month in ("2020-01-15", "2020-02-15", "2020-03-15"):
            conn.execute("SELECT ops.ensure_month_partitions(%s::timestamptz)", (month,))
        conn.commit()
    monkeypatch.setenv("CLOUD_DATABASE_URL", pg_url)
    assert cli.main(["retention", "--keep-months", "1200"]) == 0
    assert "nothing to drop" in capsys.readouterr().out
    assert old_tables() == 6
    with pool.connection() as conn:
        dropped = [
            r[0]
            for r in conn.execute(
                "SELECT * FROM ops.drop_partitions_before('2020-02-01T00:00:00Z')"
            ).fetchall()
        ]
        conn.commit()
    assert sorted(dropped) == ["facts.events_202001", "facts.oee_buckets_202001"]
    assert old_tables() == 4
    assert cli.main(["retention", "--keep-months", "1"]) == 0
    assert "facts.oee_buckets_202003" in capsys.readouterr().out
    assert old_tables() == 0
