"""Failed authentications are limited per client address before any credential is read,
counted in /metrics and logged once per address and period; with Redis the bucket is shared
by API processes."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from psycopg_pool import ConnectionPool
from structlog.testing import capture_logs

from cloud_api.config import FailureLimit
from tests.cloud_api.securitykit import WINDOW, SecuredApi, secured_api, seed_two_sites

OEE_A = "/v1/equipment/press-a/oee"
REDIS_URL = "redis://127.0.0.1:6379/0"
# Five failures, then one more a minute: a test never waits for the refill.
FIVE = FailureLimit(per_minute=1, burst=5)


def client_from(api: SecuredApi, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(
        app=api.app, raise_app_exceptions=False, client=(address, 40000)
    )
    return httpx.AsyncClient(transport=transport, base_url="http://api")


def metric(text: str, sample: str) -> float:
    """The value of `sample` (name and labels as Prometheus prints them) in /metrics text."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"test:{secrets.token_hex(4)}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


async def test_failures_are_limited_counted_and_logged_per_address(
    pg_url: str, pool: ConnectionPool, tmp_path: Path
) -> None:
    seed_two_sites(pg_url)
    api = secured_api(pg_url, pool, tmp_path, auth_failures=FIVE)
    async with api.client() as public:
        before = (await public.get("/metrics")).text
    bad = {"Authorization": "Bearer not.a.token"}
    wrong_key = {"X-API-Key": "fgw_0123456789ab_" + "A" * 43}
    with capture_logs() as logs:
        async with client_from(api, "10.0.0.1") as attacker:
            tokens = [await attacker.get(OEE_A, params=WINDOW, headers=bad) for _ in range(12)]
        async with client_from(api, "10.0.0.2") as other:
            keys = [await other.get(OEE_A, params=WINDOW, headers=wrong_key) for _ in range(9)]
        async with client_from(api, "10.0.0.3") as bystander:
            # A valid credential from an address that has not failed is unaffected.
            good = await bystander.get(OEE_A, params=WINDOW, headers=api.headers("viewer"))
        async with client_from(api, "10.0.0.1") as attacker:
            # A blocked address is refused whatever it sends, a valid token too.
            blocked = await attacker.get(OEE_A, params=WINDOW, headers=api.headers("viewer"))
        api.app.state.security.failures.log.flush()
    assert [r.status_code for r in tokens] == [401] * 5 + [429] * 7
    assert [r.status_code for r in keys] == [401] * 5 + [429] * 4
    assert good.status_code == 200, good.text
    assert blocked.status_code == 429
    refused = tokens[-1]
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["type"].endswith("too-many-failures")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # Counted in /metrics.
    async with api.client() as public:
        after = (await public.get("/metrics")).text
    for kind in ("token", "api_key"):
        sample = f'api_auth_failures_total{{credential="{kind}"}}'
        assert metric(after, sample) - metric(before, sample) == 5
    throttled = metric(after, "api_auth_throttled_total") - metric(
        before, "api_auth_throttled_total"
    )
    assert throttled == 7 + 4 + 1
    # Logged in a bounded way: one line at the first refusal of each address, one line with
    # the count at the end of the period; never the credential itself.
    first = [e for e in logs if e["event"] == "authentication refused"]
    counts = {e["client"]: e["count"] for e in logs if e["event"] == "authentication refusals"}
    assert sorted(e["client"] for e in first) == ["10.0.0.1", "10.0.0.2"]
    assert counts == {"10.0.0.1": 13, "10.0.0.2": 9}
    assert "not.a.token" not in repr(logs) and "A" * 43 not in repr(logs)


async def test_refusal_log_is_bounded_under_a_flood_from_many_addresses(
    pg_url: str, pool: ConnectionPool, tmp_path: Path
) -> None:
    seed_two_sites(pg_url)
    api = secured_api(pg_url, pool, tmp_path, auth_failures=FIVE)
    log = api.app.state.security.failures.log
    log.max_addresses = 3
    with capture_logs() as logs:
        for i in range(10):
            async with client_from(api, f"10.0.1.{i}") as flood:
                for _ in range(2):
                    await flood.get(OEE_A, headers={"Authorization": "Bearer x"})
        log.flush()
    events = [e["event"] for e in logs]
    assert events.count("authentication refused") == 3
    assert events.count("authentication refusals") == 3
    (rest,) = [e for e in logs if e["event"] == "authentication refusals from further addresses"]
    assert rest["count"] == 14


async def test_failure_bucket_is_shared_through_redis(
    pg_url: str, pool: ConnectionPool, tmp_path: Path, redis_prefix: str
) -> None:
    seed_two_sites(pg_url)
    shared = {"auth_failures": FIVE, "redis_url": REDIS_URL, "redis_prefix": redis_prefix}
    one = secured_api(pg_url, pool, tmp_path, **shared)
    two = secured_api(pg_url, pool, tmp_path, **shared)
    codes: list[int] = []
    for i in range(20):
        async with client_from(one if i % 2 else two, "10.0.0.9") as client:
            r = await client.get(OEE_A, headers={"Authorization": "Bearer x"})
            codes.append(r.status_code)
    # Five failures in all, plus the one attempt the second process lets through before its
    # own charge tells it the bucket is empty (not five per process).
    assert codes.count(401) == 6, codes
    assert set(codes) == {401, 429}
    assert redis.Redis.from_url(REDIS_URL).exists(f"{redis_prefix}authfail:10.0.0.9")
