"""Rate limits (in process, shared through the machine's Redis, and degraded when Redis is
unreachable), and the perimeter: problem+json everywhere, security headers, CORS, body size,
SQL metacharacters in every parameter of every route."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from fastapi import FastAPI
from psycopg_pool import ConnectionPool

from cloud_api.config import RateTier
from tests.cloud_api.securitykit import WINDOW, SecuredApi, secured_api, seed_two_sites
from tests.conftest import free_port

OEE_A = "/v1/equipment/press-a/oee"
REDIS_URL = "redis://127.0.0.1:6379/0"
TIGHT = {"viewer": RateTier(per_hour=3600, burst=3)}  # one token a second, bursts of 3


class Clock:
    """Wall-clock seconds that the test moves forward (no sleeping)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def limited(api: SecuredApi) -> Clock:
    clock = Clock()
    api.app.state.security.limiter.clock = clock
    return clock


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"test:{secrets.token_hex(4)}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


async def burst(api: SecuredApi, headers: dict[str, str], n: int) -> list[httpx.Response]:
    async with api.client() as client:
        return [await client.get(OEE_A, params=WINDOW, headers=headers) for _ in range(n)]


def assert_limited(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert int(r.headers["Retry-After"]) >= 1
    assert r.headers["RateLimit"].endswith(";r=0;t=3") or ";r=0;" in r.headers["RateLimit"]
    assert "q=3600" in r.headers["RateLimit-Policy"]


async def test_rate_limit_exceeded_and_recovered(
    pg_url: str, pool: ConnectionPool, tmp_path: Path
) -> None:
    seed_two_sites(pg_url)
    api = secured_api(pg_url, pool, tmp_path, rate_limits=TIGHT)
    clock = limited(api)
    headers = api.headers("viewer", ["site-a"])
    first = await burst(api, headers, 4)
    assert [r.status_code for r in first] == [200, 200, 200, 429]
    assert [r.headers["RateLimit"].split(";")[1] for r in first[:3]] == ["r=2", "r=1", "r=0"]
    assert_limited(first[3])
    # Another token of the same role has its own bucket.
    other = await burst(api, api.headers("viewer", ["site-a"]), 1)
    assert other[0].status_code == 200
    clock.now += int(first[3].headers["Retry-After"])
    assert [r.status_code for r in await burst(api, headers, 2)] == [200, 429]
    clock.now += 3600
    assert [r.status_code for r in await burst(api, headers, 4)] == [200, 200, 200, 429]
    # Public endpoints are not limited.
    async with api.client() as client:
        assert all([(await client.get("/healthz")).status_code == 200 for _ in range(10)])


async def test_tiers_by_role(pg_url: str, pool: ConnectionPool, tmp_path: Path) -> None:
    seed_two_sites(pg_url)
    api = secured_api(pg_url, pool, tmp_path)
    policies = {}
    for role in ("viewer", "engineer", "admin", "service"):
        (r,) = await burst(api, api.headers(role, ["*"]), 1)
        assert r.status_code == 200
        policies[role] = r.headers["RateLimit-Policy"]
    assert policies["viewer"].startswith('"viewer";q=1000;')
    assert policies["service"].startswith('"service";q=100000;')


async def test_redis_store_is_shared_by_replicas(
    pg_url: str, pool: ConnectionPool, tmp_path: Path, redis_prefix: str
) -> None:
    seed_two_sites(pg_url)
    settings: dict[str, Any] = {
        "rate_limits": TIGHT,
        "redis_url": REDIS_URL,
        "redis_prefix": redis_prefix,
    }
    one = secured_api(pg_url, pool, tmp_path, **settings)
    two = secured_api(pg_url, pool, tmp_path, **settings)  # same key dir: same tokens
    clock_one, clock_two = limited(one), limited(two)
    headers = one.headers("viewer", ["site-a"])
    assert [r.status_code for r in await burst(one, headers, 2)] == [200, 200]
    assert [r.status_code for r in await burst(two, headers, 2)] == [200, 429]
    assert two.app.state.security.limiter.using_redis
    clock_one.now += 1
    clock_two.now += 1
    assert [r.status_code for r in await burst(one, headers, 2)] == [200, 429]
    assert redis.Redis.from_url(REDIS_URL).exists(f"{redis_prefix}token:" + _jti(headers)), (
        "the bucket lives in Redis"
    )


def _jti(headers: dict[str, str]) -> str:
    import jwt

    token = headers["Authorization"].split()[1]
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


async def test_redis_down_degrades_to_in_process(
    pg_url: str, pool: ConnectionPool, tmp_path: Path
) -> None:
    seed_two_sites(pg_url)
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    api = secured_api(pg_url, pool, tmp_path, rate_limits=TIGHT, redis_url=nowhere)
    limited(api)
    responses = await burst(api, api.headers("viewer", ["site-a"]), 4)
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert_limited(responses[3])
    assert not api.app.state.security.limiter.using_redis


# --- the perimeter --------------------------------------------------------------------------


@pytest.fixture
def api(pg_url: str, pool: ConnectionPool, tmp_path: Path) -> SecuredApi:
    seed_two_sites(pg_url)
    return secured_api(pg_url, pool, tmp_path, max_body_bytes=4096)


async def test_security_headers(api: SecuredApi) -> None:
    async with api.client() as client:
        for path, headers in (
            ("/healthz", {}),
            (OEE_A, api.headers("viewer", ["site-a"])),
            ("/v1/nowhere", api.headers("viewer", ["site-a"])),
            (OEE_A, {}),
        ):
            r = await client.get(path, params=WINDOW, headers=headers)
            assert r.headers["Strict-Transport-Security"].startswith("max-age=63072000")
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            assert r.headers["X-Frame-Options"] == "DENY"
            assert len(r.headers["X-Trace-Id"]) == 32
        page = await client.get("/")
    if page.status_code == 200 and page.headers["content-type"].startswith("text/html"):
        csp = page.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp


async def test_cors_closed_unless_configured(
    api: SecuredApi, pg_url: str, pool: ConnectionPool, tmp_path: Path
) -> None:
    origin = {"Origin": "https://evil.example"}
    async with api.client() as client:
        r = await client.get(OEE_A, params=WINDOW, headers={**api.headers(), **origin})
        assert "access-control-allow-origin" not in r.headers
        pre = await client.options(
            OEE_A, headers={**origin, "Access-Control-Request-Method": "GET"}
        )
        assert "access-control-allow-origin" not in pre.headers
    opened = secured_api(pg_url, pool, tmp_path / "b", cors_origins=["https://dash.example"])
    async with opened.client() as client:
        ok = await client.options(
            OEE_A,
            headers={"Origin": "https://dash.example", "Access-Control-Request-Method": "GET"},
        )
        assert ok.headers["access-control-allow-origin"] == "https://dash.example"
        evil = await client.options(
            OEE_A, headers={**origin, "Access-Control-Request-Method": "GET"}
        )
        assert "access-control-allow-origin" not in evil.headers


async def test_oversized_body(api: SecuredApi) -> None:
    headers = api.headers("engineer", ["site-a"])
    big = {"site": "site-a", "ts": "2026-01-05T06:10:00Z", "kind": "downtime", "reason": "x",
           "note": "n" * 10_000}  # fmt: skip
    async with api.client() as client:
        r = await client.post("/v1/equipment/press-a/annotations", json=big, headers=headers)
        assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"

        async def chunks() -> Any:  # no Content-Length: counted while read
            for _ in range(10):
                yield b"x" * 1000

        r = await client.post(
            "/v1/equipment/press-a/annotations", content=chunks(), headers=headers
        )
        assert r.status_code == 413, r.text


async def test_validation_errors_name_the_parameter(api: SecuredApi) -> None:
    async with api.client() as client:
        r = await client.get(OEE_A, params={"to": WINDOW["to"]}, headers=api.headers())
        body = r.json()
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        assert body["invalid_params"][0]["name"] == "from"
        assert "from" in body["detail"]
        r = await client.get("/v1/ops/performance", params={"minutes": "abc"},
                             headers=api.headers("admin", ["*"]))  # fmt: skip
        assert r.json()["invalid_params"][0]["name"] == "minutes"


async def test_internal_errors_leak_nothing(api: SecuredApi) -> None:
    app: FastAPI = api.app

    @app.get("/v1/test-broken")
    async def broken() -> None:
        raise RuntimeError("SELECT secret FROM /srv/cloud/keys at cloud_api/secret.py:12")

    async with api.client() as client:
        r = await client.get("/v1/test-broken", headers=api.headers())
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert set(body) == {"type", "title", "status", "detail", "instance", "trace_id"}
    for leak in ("SELECT", "/srv", ".py", "Traceback", "RuntimeError"):
        assert leak not in r.text
    assert body["trace_id"] == r.headers["X-Trace-Id"]
    assert r.headers["X-Content-Type-Options"] == "nosniff"


SQL_PAYLOADS = [
    "' OR '1'='1",
    "press-a'; DROP TABLE registry.sites; --",
    '" OR 1=1 --',
    "%",
    "_",
    "\\",
    "press-a\x00",
    "*",
    "site-a,site-b",
    "1; SELECT pg_sleep(0)",
]


def _example(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return str(schema["enum"][0])
    options = schema.get("anyOf", [schema])
    kinds = {o.get("type") for o in options}
    if "integer" in kinds:
        return "10"
    if "boolean" in kinds:
        return "false"
    fmt = {o.get("format") for o in options}
    if "date-time" in fmt:
        return "2026-01-05T06:00:00Z"
    return "site-a"


async def test_sql_metacharacters_in_every_parameter(api: SecuredApi, pg_url: str) -> None:
    """Every parameter of every GET route, one at a time, carries SQL metacharacters: no 5xx,
    every error is problem+json, and the database is unchanged."""
    headers = api.headers("admin", ["*"])
    async with api.client() as client:
        schema = (await client.get("/openapi.json")).json()
        checked = 0
        for path, operations in schema["paths"].items():
            get = operations.get("get")
            if not path.startswith("/v1/") or get is None:
                continue
            params = get.get("parameters", [])
            base = {p["name"]: _example(p.get("schema", {})) for p in params}
            if "from" in base and "to" in base:
                base["from"], base["to"] = WINDOW["from"], WINDOW["to"]
            for target in params:
                for payload in SQL_PAYLOADS:
                    values = {**base, target["name"]: payload}
                    url = path
                    for p in params:
                        if p["in"] == "path":
                            url = url.replace("{" + p["name"] + "}", _quote(values[p["name"]]))
                    query = {p["name"]: values[p["name"]] for p in params if p["in"] == "query"}
                    r = await client.get(url, params=query, headers=headers)
                    assert r.status_code < 500, (path, target["name"], payload, r.text)
                    if r.status_code >= 400:
                        assert r.headers["content-type"].startswith("application/problem+json"), (
                            path,
                            r.text,
                        )
                    checked += 1
    assert checked > 50
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM registry.sites").fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM rollups.oee_1m").fetchone() == (2,)


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")
