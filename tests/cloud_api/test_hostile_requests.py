"""Hostile requests through the real app and PostgreSQL: repeated headers, dates at the limits
of the calendar in every offset, cursors of any shape, huge numbers in every numeric parameter
of the OpenAPI schema, stored quantities beyond what JSON consumers hold, and the author of
an annotation per role. Each is a 4xx problem naming what is wrong, or a clear answer; never
a 500."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from cloud_api.access.auth import ROLES
from cloud_api.api.routes.common import EARLIEST, LATEST
from cloud_api.config import RateTier
from connectors.sample import Sample
from oee.events import CountEvent
from sync.keys import CloudKeyring
from tests.cloud_api.ingestion import enrolled_agent, press_spec
from tests.cloud_api.securitykit import T0, WINDOW, SecuredApi, secured_api, seed_two_sites

OEE_A = {"scope": "equipment", "id": "press-a", **WINDOW}
# Offsets from the most negative to the most positive a datetime can carry.
OFFSETS = [
    timedelta(hours=h, minutes=m)
    for h, m in ((-23, -59), (-15, -56), (-12, 0), (0, -1), (0, 0), (0, 1), (5, 30), (14, 0))
] + [timedelta(hours=23, minutes=59)]
# Zones with the most extreme offsets (Manila kept its local mean time of -15:56 until 1844).
EXTREME_ZONES = ["Etc/GMT+12", "Etc/GMT-14", "Pacific/Kiritimati", "Asia/Manila", "UTC"]


@pytest.fixture
def api(pg_url: str, pool: ConnectionPool, tmp_path: Path) -> SecuredApi:
    seed_two_sites(pg_url)
    # Hundreds of requests per test: a tier that does not get in the way.
    roomy = RateTier(per_hour=100_000, burst=10_000)
    return secured_api(pg_url, pool, tmp_path, rate_limits=dict.fromkeys(ROLES, roomy))


@asynccontextmanager
async def serving(api: SecuredApi) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running (the change listener that lets answers be served
    again from memory), and a client of it."""
    async with api.app.router.lifespan_context(api.app), api.client() as client:
        assert api.app.state.data_marks.connected.wait(10), "change listener not connected"
        yield client


def assert_invalid(r: httpx.Response, name: str) -> None:
    """A 422 problem whose invalid_params name `name`."""
    assert r.status_code == 422, (name, r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert name in [p["name"] for p in body["invalid_params"]], body


def iso(at: datetime) -> str:
    return at.isoformat()


# -- one parse of each header -----------------------------------------------------------------


async def test_repeated_accept_is_refused_and_cannot_poison_the_answers(api: SecuredApi) -> None:
    headers = api.headers("viewer", ["site-a"])
    auth = next(iter(headers.items()))
    async with serving(api) as client:
        for pair in (["text/csv", "application/json"], ["application/json", "text/csv"]):
            r = await client.get(
                "/v1/oee", params=OEE_A, headers=[auth, ("Accept", pair[0]), ("Accept", pair[1])]
            )
            assert r.status_code == 400, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["type"] == "/problems/duplicate-header"
            assert "accept" in r.json()["detail"]
        # Later callers get what they ask for, from the route and again from memory.
        for _ in range(2):
            as_json = await client.get("/v1/oee", params=OEE_A, headers=headers)
            assert as_json.status_code == 200
            assert as_json.headers["content-type"] == "application/json"
            assert as_json.json()["total"]["components"]["produced"] == 10
            as_csv = await client.get(
                "/v1/oee", params=OEE_A, headers={**headers, "Accept": "text/csv"}
            )
            assert as_csv.headers["content-type"].startswith("text/csv")
        assert 'cache;desc="hit"' in as_json.headers["server-timing"]
        assert 'cache;desc="hit"' in as_csv.headers["server-timing"]
        # One header naming both: JSON, wherever it is read.
        both = {**headers, "Accept": "text/csv, application/json"}
        for _ in range(2):
            r = await client.get("/v1/oee", params=OEE_A, headers=both)
            assert r.headers["content-type"] == "application/json"

        etag = as_json.headers["etag"]
        repeated = [
            [("Cache-Control", "no-cache"), ("Cache-Control", "max-age=60")],
            [("If-None-Match", etag), ("If-None-Match", '"other"')],
            [("Authorization", auth[1]), ("X-API-Key", "fgw_x"), ("X-API-Key", "fgw_y")],
            [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")] * 2,
        ]
        for extra in repeated:
            pairs = extra if extra[0][0] == "Authorization" else [auth, *extra]
            r = await client.get("/v1/oee", params=OEE_A, headers=pairs)
            assert r.status_code == 400, (extra, r.text)
            assert extra[-1][0].lower() in r.json()["detail"]
        r = await client.get("/v1/oee", params=OEE_A, headers=[auth, auth])
        assert r.status_code == 400
        # Headers the API does not read may repeat.
        r = await client.get(
            "/v1/oee",
            params=OEE_A,
            headers=[auth, ("X-Forwarded-For", "a"), ("X-Forwarded-For", "b")],
        )
        assert r.status_code == 200


# -- parameters -------------------------------------------------------------------------------


def operations(api: SecuredApi) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
    """(method, path with valid path parameters, parameters) of every /v1 operation."""
    schema = api.app.openapi()
    for path, items in schema["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, operation in items.items():
            concrete = path.replace("{equipment_id}", "press-a").replace("{agent_id}", "edge-a")
            yield method.upper(), concrete, operation.get("parameters", [])


def valid_query(params: list[dict[str, Any]]) -> dict[str, str]:
    """Values for the required query parameters that make a valid request."""
    known = {"scope": "site", "id": "site-a", "site": "site-a", **WINDOW}
    return {p["name"]: known[p["name"]] for p in params if p["in"] == "query" and p["required"]}


def kind_of(param: dict[str, Any]) -> str | None:
    schema = param["schema"]
    for option in [schema, *schema.get("anyOf", [])]:
        if option.get("type") in ("integer", "number"):
            return "number"
        if option.get("format") == "date-time":
            return "date-time"
    return None


HUGE = ["1" + "0" * 40, "-1" + "0" * 40, "1e400", "-1e400", "inf", "nan", "99999999999999999999"]


async def test_every_numeric_and_date_parameter_of_the_schema(api: SecuredApi) -> None:
    headers = api.headers("admin", ["*"])
    checked: set[tuple[str, str]] = set()
    async with api.client() as client:
        for method, path, params in operations(api):
            if method != "GET":
                continue
            base = valid_query(params)
            r = await client.get(path, params=base, headers=headers)
            assert r.status_code in (200, 404), (path, r.text[:300])
            for param in params:
                name, kind = param["name"], kind_of(param)
                if kind == "number":
                    for value in HUGE:
                        r = await client.get(path, params={**base, name: value}, headers=headers)
                        assert_invalid(r, name)
                elif kind == "date-time":
                    for offset in OFFSETS:
                        tz = timezone(offset)
                        beyond = {
                            "from": iso(datetime(1, 1, 1, tzinfo=tz)),
                            "to": iso(datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=tz)),
                        }[name]
                        r = await client.get(path, params={**base, name: beyond}, headers=headers)
                        assert_invalid(r, name)
                        # Just inside the calendar the API accepts, in the same offset.
                        inside = {**base, "from": iso(EARLIEST.astimezone(tz))}
                        inside["to"] = iso((EARLIEST + timedelta(days=40)).astimezone(tz))
                        if name == "to":
                            inside["from"] = iso((LATEST - timedelta(days=40)).astimezone(tz))
                            inside["to"] = iso(LATEST.astimezone(tz))
                        r = await client.get(path, params=inside, headers=headers)
                        assert r.status_code in (200, 404), (path, inside, r.text[:300])
                    for bad in ("2026-01-05T06:00:00", "2026-01-05T06:00:00+24:00", "0000-01-01"):
                        r = await client.get(path, params={**base, name: bad}, headers=headers)
                        assert_invalid(r, name)
                else:
                    continue
                checked.add((path, name))
    # Every numeric and time parameter of every read operation was tried.
    assert ("/v1/oee", "max_points") in checked
    assert ("/v1/downtime/events", "min_duration_s") in checked
    assert ("/v1/ops/performance", "minutes") in checked
    assert ("/v1/equipment/press-a/annotations", "from") in checked
    assert ("/v1/equipment/press-a/oee", "to") in checked
    assert len(checked) >= 25


async def test_windows_at_the_calendar_edges_in_extreme_zones(api: SecuredApi) -> None:
    headers = api.headers("admin", ["*"])
    edges = [(EARLIEST, EARLIEST + timedelta(days=62)), (LATEST - timedelta(days=62), LATEST)]
    async with api.client() as client:
        for path in ("/v1/oee", "/v1/counts"):
            for zone in EXTREME_ZONES:
                for start, end in edges:
                    for interval in (None, "1d", "1w", "1mo"):
                        params = {"scope": "site", "id": "site-a", "from": iso(start),
                                  "to": iso(end), "tz": zone}  # fmt: skip
                        if interval:
                            params["interval"] = interval
                        r = await client.get(path, params=params, headers=headers)
                        assert r.status_code == 200, (path, params, r.text[:300])
                        assert r.json()["tz"] == zone
            for zone in ("Mars/Olympus", "../../etc/passwd", "a" * 5000, "", "UTC/.."):
                params = {"scope": "site", "id": "site-a", **WINDOW, "tz": zone}
                assert_invalid(await client.get(path, params=params, headers=headers), "tz")
        # The whole calendar the API accepts is one window, refused only for its bucket count.
        whole = {"scope": "site", "id": "site-a", "from": iso(EARLIEST), "to": iso(LATEST)}
        assert_invalid(await client.get("/v1/oee", params=whole, headers=headers), "interval")
        r = await client.get("/v1/quality", params=whole, headers=headers)
        assert r.status_code == 200
        # A request body's time is bounded the same way.
        note = {"site": "site-a", "kind": "downtime", "reason": "jam"}
        for ts in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
            r = await client.post(
                "/v1/equipment/press-a/annotations",
                json={**note, "ts": ts},
                headers=api.headers("engineer", ["site-a"]),
            )
            assert_invalid(r, "ts")


def cursor_of(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


async def test_cursors_of_any_shape(api: SecuredApi) -> None:
    headers = api.headers("admin", ["*"])
    ts, event_id = "2026-01-05T06:00:00+00:00", str(uuid.uuid4())
    cursors = [
        "!!",
        "====",
        "é",
        "A" * 5000,
        base64.urlsafe_b64encode(b"\xff\xfe\x00garbage").decode(),
        cursor_of([ts, "not-a-uuid"]),
        cursor_of([ts, "00000000-0000-0000-0000-00000000000g"]),
        cursor_of(["yesterday", event_id]),
        cursor_of(["2026-01-05T06:00:00", event_id]),  # no offset
        cursor_of(["0001-01-01T00:00:00+01:00", event_id]),
        cursor_of(["9999-12-31T23:59:59-01:00", event_id]),
        cursor_of([1, 2]),
        cursor_of([None, None]),
        cursor_of([ts, event_id, "extra"]),
        cursor_of([[ts], {"id": event_id}]),
        cursor_of({"ts": ts}),
        cursor_of(ts),
        cursor_of(10**30),
        cursor_of([ts, "x" * 150]),
    ]
    async with api.client() as client:
        for cursor in cursors:
            r = await client.get(
                "/v1/events", params={**OEE_A, "scope": "site", "id": "site-a", "cursor": cursor},
                headers=headers,
            )  # fmt: skip
            assert_invalid(r, "cursor")
        # A well-formed cursor of this API's shape is used as given.
        r = await client.get(
            "/v1/events",
            params={"scope": "site", "id": "site-a", **WINDOW, "cursor": cursor_of([ts, event_id])},
            headers=headers,
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"events": [], "next_cursor": None}


# -- stored integers beyond what JSON consumers hold --------------------------------------------


async def test_quantities_beyond_json_range_are_flagged_not_a_500(
    api: SecuredApi, pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    agent = enrolled_agent(
        pg_url, pool, cloud_keys, tmp_path / "edge-a", agent_id="edge-a", site_id="site-a"
    )
    m = timedelta(minutes=1)
    plc = [(0, "state", 1), (0, "product", 1), (0, "total_count", 0), (0, "scrap_count", 0),
           (1, "total_count", 10), (1, "scrap_count", 1), (2, "total_count", 11),
           (3, "total_count", 12)]  # fmt: skip
    samples = [Sample("press-a", signal, value, T0 + minute * m) for minute, signal, value in plc]
    made = agent.engine_events([press_spec("press-a")], samples, T0, T0 + 4 * m)
    counts = [e for e in made if isinstance(e, CountEvent)]
    assert agent.send(counts) == "stored"
    # Ingest refuses such values now; until it did, a signed batch could carry them and they
    # were stored as sent. These rows stand for those: the events the engine made and ingest
    # stored, then given the values an old ingest let through.
    with psycopg.connect(pg_url) as conn:
        for event, patch in ((counts[2], {"produced": 10**30}), (counts[3], {"scrap": 1.5})):
            conn.execute(
                "UPDATE facts.events SET body = body || %s::jsonb WHERE event_id = %s",
                (json.dumps(patch), event.event_id),
            )
    headers = api.headers("viewer", ["site-a"])
    site = {"scope": "site", "id": "site-a", **WINDOW}
    async with api.client() as client:
        r = await client.get("/v1/quality", params=site, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["total"] == {"produced": 10, "good": 9, "scrap": 1, "rework": 0}
        assert body["out_of_range_events"] == 2
        r = await client.get("/v1/quality", params=site, headers={**headers, "Accept": "text/csv"})
        assert r.status_code == 200 and r.text.startswith("site_id,equipment_id,product")

        r = await client.get("/v1/events", params=site, headers=headers)
        assert r.status_code == 200, r.text
        by_id = {e["event_id"]: e for e in r.json()["events"]}
        huge = by_id[str(counts[2].event_id)]
        assert huge["body"]["produced"] == str(10**30)
        assert huge["out_of_range"] == ["produced"]
        assert by_id[str(counts[3].event_id)]["body"]["scrap"] == 1.5
        assert "out_of_range" not in by_id[str(counts[0].event_id)]
        r = await client.get("/v1/events", params=site, headers={**headers, "Accept": "text/csv"})
        assert r.status_code == 200 and str(10**30) in r.text
        # Windows without the row are unaffected.
        later = {**site, "from": iso(T0 + 3 * m)}
        r = await client.get("/v1/quality", params=later, headers=headers)
        assert r.json()["out_of_range_events"] == 1
        assert r.json()["total"]["produced"] == 0


# -- personal data ------------------------------------------------------------------------------


async def test_annotation_author_only_for_roles_allowed_personal_data(api: SecuredApi) -> None:
    # Quality: a downtime annotation must name a stop, and this site has no state events.
    note = {"site": "site-a", "ts": "2026-01-05T06:10:00Z", "kind": "quality", "reason": "jam"}
    path = "/v1/equipment/press-a/annotations"
    async with api.client() as client:
        r = await client.post(path, json=note, headers=api.headers("engineer", ["site-a"]))
        assert r.status_code == 201, r.text
        assert r.json()["created_by"] == "user-engineer"
        r = await client.post(path, json=note, headers=api.headers("service", ["site-a"]))
        assert r.status_code == 201, r.text
        assert r.json()["created_by"] is None  # its own, yet a service sees no personal data
        seen = {}
        for role in ("viewer", "service", "engineer", "admin"):
            r = await client.get(path, params=WINDOW, headers=api.headers(role, ["site-a"]))
            assert r.status_code == 200, r.text
            seen[role] = sorted(str(a["created_by"]) for a in r.json())
            assert all(a["reason"] == "jam" for a in r.json())
    assert seen["viewer"] == seen["service"] == ["None", "None"]
    assert seen["engineer"] == seen["admin"] == ["user-engineer", "user-service"]
