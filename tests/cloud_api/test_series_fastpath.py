"""The short way of /v1/oee and /v1/counts (cloud_api/api/fastpath.py) answers exactly as
the FastAPI route does: same status, body, ETag and headers, same errors, same route in the
metrics; and what it does not take goes the usual way."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from prometheus_client import REGISTRY
from psycopg_pool import ConnectionPool

from cloud_api.api.fastpath import parse
from sync.keys import CloudKeyring
from tests.cloud_api.test_query_api import agent_at, api  # noqa: F401 (fixture)

T0 = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)


def test_parse_takes_plain_parameters_only() -> None:
    base = "scope=equipment&id=m1&from=2026-01-05T06:00:00Z&to=2026-01-05T08:00:00%2B01:00"
    values = parse(base.encode())
    assert values == {
        "scope": "equipment",
        "id": "m1",
        "from": datetime(2026, 1, 5, 6, 0, tzinfo=UTC),
        "to": datetime.fromisoformat("2026-01-05T08:00:00+01:00"),
        "site": None,
        "interval": None,
        "max_points": 1000,
        "tz": "UTC",
        "group_by": "none",
    }
    full = parse(
        (base + "&site=s1&interval=1mo&max_points=7&tz=Europe/Berlin&group_by=line").encode()
    )
    assert full is not None
    assert (full["site"], full["interval"], full["max_points"], full["tz"], full["group_by"]) == (
        "s1", "1mo", 7, "Europe/Berlin", "line",
    )  # fmt: skip
    # Each of these goes the usual way (FastAPI's validation and its answer).
    for other in (
        base + "&id=m2",  # repeated
        base + "&extra=1",  # unknown
        base + "&site=",  # empty
        base.replace("scope=equipment", "scope=planet"),
        base.replace("id=m1", "id=" + "x" * 201),
        base + "&max_points=0",
        base + "&max_points=100001",
        base + "&interval=2h",
        base + "&group_by=shift",
        base + "&tz=" + "A" * 65,
        base.replace("from=2026-01-05T06:00:00Z", "from=yesterday"),
        "scope=equipment&id=m1&from=2026-01-05T06:00:00Z",  # `to` missing
    ):
        assert parse(other.encode()) is None, other


def _requests_counted(route: str, status: int) -> float:
    value = REGISTRY.get_sample_value(
        "http_requests_total", {"route": route, "method": "GET", "status": str(status)}
    )
    return value or 0.0


def _short_way(route: str) -> float:
    value = REGISTRY.get_sample_value("api_series_fast_path_total", {"route": route})
    return value or 0.0


def _comparable(r: httpx.Response) -> tuple[int, Any, dict[str, str | None]]:
    body: Any = r.json() if r.content and "json" in r.headers["content-type"] else r.text
    if isinstance(body, dict):
        body.pop("trace_id", None)  # one per request
    headers = {
        k: r.headers.get(k)
        for k in ("etag", "cache-control", "vary", "content-type", "content-length")
    }
    return r.status_code, body, headers


# Different in every answer: the trace id, the times, the rate limit's remaining requests.
_PER_REQUEST = frozenset(("x-trace-id", "server-timing", "ratelimit", "date"))


def _all_headers(r: httpx.Response) -> tuple[list[str], dict[str, str]]:
    """Every header's name in order, and the values of those not made per request; the
    parts of Server-Timing without their durations."""
    values = {k: v for k, v in r.headers.items() if k not in _PER_REQUEST}
    timing = r.headers.get("server-timing", "")
    values["server-timing"] = ", ".join(part.split(";dur=")[0] for part in timing.split(", "))
    return list(r.headers.keys()), values


def test_answers_equal_the_routes_own(
    api: httpx.Client,  # noqa: F811
    pg_url: str,
    pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    tmp_path: Path,
) -> None:
    a = agent_at(pg_url, pool, cloud_keys, tmp_path, "edge-fast", "plant-fast")
    a.send(
        [
            a.bucket(eq, T0 + timedelta(minutes=m), planned_busy_s=60.0, production_s=45.0)
            for eq in ("m1", "m2")
            for m in range(0, 36 * 60, 30)
        ]
    )
    ok = {
        "scope": "equipment",
        "id": "m1",
        "from": T0.isoformat(),
        "to": (T0 + timedelta(days=1)).isoformat(),
    }
    cases: list[dict[str, Any]] = [
        ok,
        {**ok, "interval": "1h", "tz": "Europe/Berlin"},
        {**ok, "scope": "site", "id": "plant-fast", "interval": "1d", "group_by": "equipment"},
        {**ok, "scope": "site", "id": "plant-fast", "group_by": "line", "max_points": 3},
        {**ok, "interval": "shift"},
        {**ok, "site": "plant-fast", "interval": "15m", "tz": "Asia/Kolkata"},
        {**ok, "to": "2026-01-05T06:25:00+00:00"},  # minutes only
        # errors the route itself raises, after validation
        {**ok, "id": "nope"},
        {**ok, "tz": "Mars/Olympus"},
        {**ok, "to": ok["from"]},
        {**ok, "from": "2026-01-05T06:00:00"},
        {**ok, "interval": "1m", "from": "2020-01-01T00:00:00Z"},
        {**ok, "from": "0001-01-01T00:00:00+00:00"},
    ]
    fresh = {"Cache-Control": "no-cache"}
    for path in ("/v1/oee", "/v1/counts"):
        for params in cases:
            query = urlencode(params)
            assert parse(query.encode()) is not None, params  # the short way takes it
            status = api.get(f"{path}?{query}", headers=fresh).status_code
            before, taken = _requests_counted(path, status), _short_way(path[4:])
            short = api.get(f"{path}?{query}", headers=fresh)
            assert _short_way(path[4:]) == taken + 1, params
            assert _requests_counted(path, status) == before + 1, params
            # An unknown parameter: FastAPI ignores it, the short way leaves it to FastAPI.
            usual = api.get(f"{path}?{query}&ignored=1", headers=fresh)
            assert _short_way(path[4:]) == taken + 1, params
            assert _comparable(short) == _comparable(usual), (path, params)
            assert _all_headers(short) == _all_headers(usual), (path, params)
            for r in (short, usual):
                assert "app;dur=" in r.headers["server-timing"]
                assert r.headers["x-content-type-options"] == "nosniff"
                assert "ratelimit" in r.headers
            if short.status_code == 200:
                assert 'cache;desc="miss"' in short.headers["server-timing"]
                again = api.get(f"{path}?{query}", headers={"If-None-Match": short.headers["etag"]})
                assert again.status_code == 304
            csv = api.get(f"{path}?{query}", headers={**fresh, "Accept": "text/csv"})
            csv_usual = api.get(
                f"{path}?{query}&ignored=1", headers={**fresh, "Accept": "text/csv"}
            )
            assert _comparable(csv) == _comparable(csv_usual), (path, params)
    # Validation errors are FastAPI's own answer, whichever way.
    taken = _short_way("oee")
    bad = api.get("/v1/oee?" + urlencode({**ok, "scope": "planet"}))
    assert _short_way("oee") == taken
    assert bad.status_code == 422
    assert bad.json()["invalid_params"][0]["name"] == "scope"


def test_refusals_equal_the_stacks_own(api: httpx.Client) -> None:  # noqa: F811
    """A plainly valid series request that authentication refuses (no credential, a bad
    token, a token without the site's rights is not a refusal but an empty scope) gets the
    same answer and headers on the short way before the stack as through it."""
    query = urlencode(
        {"scope": "equipment", "id": "m1", "from": T0.isoformat(),
         "to": (T0 + timedelta(days=1)).isoformat()}
    )  # fmt: skip
    fresh = {"Cache-Control": "no-cache"}
    with httpx.Client(base_url=api.base_url) as anonymous:
        for headers in (fresh, {**fresh, "Authorization": "Bearer not-a-token"}):
            for path in ("/v1/oee", "/v1/counts"):
                taken = _short_way(path[4:])
                short = anonymous.get(f"{path}?{query}", headers=headers)
                usual = anonymous.get(f"{path}?{query}&ignored=1", headers=headers)
                assert short.status_code == 401, short.text
                assert _short_way(path[4:]) == taken  # refused before the route
                assert _comparable(short) == _comparable(usual)
                assert _all_headers(short) == _all_headers(usual)
                assert short.json()["trace_id"] == short.headers["x-trace-id"]
