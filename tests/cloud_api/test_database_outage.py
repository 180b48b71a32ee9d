"""The API across database failures, with the real PostgreSQL: connections dropped under it
(pg_terminate_backend) and a database that refuses connections (ALLOW_CONNECTIONS false on
this test's own database, so the shared server keeps serving the other tests)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from cloud_api.access.auth import generate_token_key
from cloud_api.api.app import create_app
from cloud_api.config import CloudSettings, DatabaseSettings, SecuritySettings
from cloud_api.db import make_pool
from tests.cloud_api.securitykit import WINDOW, SecuredApi, seed_two_sites
from tests.conftest import PG_ADMIN

# A guard against a hanging request, not a timing assertion.
GUARD_S = 15.0


def drop_connections(database: str) -> int:
    """Terminate every session of `database`; returns how many there were."""
    with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
        # Wait until they are gone, so no request is served by a session still ending.
        for _ in range(500):
            left = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                "pg_backend_pid() AND backend_start < now()",
                (database,),
            ).fetchone()
            if left is not None and left[0] == 0:
                break
            conn.execute("SELECT pg_sleep(0.01)")
    return len(rows)


@contextmanager
def refusing_connections(database: str) -> Iterator[None]:
    """`database` refuses new sessions and has none left, until the block ends."""
    name = sql.Identifier(database)
    with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(name))
    try:
        drop_connections(database)
        yield
    finally:
        with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name))


@asynccontextmanager
async def api_with_its_own_pool(
    pg_url: str, tmp_path: Path, revocation_refresh_s: float
) -> AsyncIterator[SecuredApi]:
    """The app as `cloud-api serve` runs it: its own pool (created in its lifespan) with the
    default checkout timeout."""
    keys_dir = tmp_path / "cloud-keys"
    generate_token_key(keys_dir)
    settings = CloudSettings(
        database=DatabaseSettings(url=pg_url, pool_min=2, pool_max=4),
        keys_dir=keys_dir,
        security=SecuritySettings(revocation_refresh_seconds=revocation_refresh_s),
    )
    api = SecuredApi(create_app(settings), settings, keys_dir)
    async with api.app.router.lifespan_context(api.app):
        yield api


async def sites(api: SecuredApi, client: httpx.AsyncClient) -> httpx.Response:
    headers = api.headers("viewer", ["site-a"])
    return await asyncio.wait_for(client.get("/v1/sites", headers=headers), GUARD_S)


# 0: every request re-reads the revocation list, so authentication meets the database first
# (it used to fail on a dead connection without retrying); 10: the list in memory serves and
# the routes meet it.
REFRESH = pytest.mark.parametrize("revocation_refresh_s", [0.0, 10.0], ids=["auth", "routes"])


@REFRESH
async def test_first_request_after_dropped_connections_succeeds(
    pg_url: str, tmp_path: Path, revocation_refresh_s: float
) -> None:
    seed_two_sites(pg_url)
    database = pg_url.rsplit("/", 1)[1]
    async with (
        api_with_its_own_pool(pg_url, tmp_path, revocation_refresh_s) as api,
        api.client() as client,
    ):
        # Several connections in the pool, all of which the drop below kills.
        answers = await asyncio.gather(*(sites(api, client) for _ in range(8)))
        assert {r.status_code for r in answers} == {200}
        assert api.app.state.pool.get_stats()["pool_size"] >= 2

        assert drop_connections(database) >= 2
        r = await sites(api, client)
        assert r.status_code == 200, r.text
        assert [s["site_id"] for s in r.json()["sites"]] == ["site-a"]
        r = await client.get("/v1/equipment/press-a/oee", params=WINDOW,
                             headers=api.headers("viewer", ["site-a"]))  # fmt: skip
        assert r.status_code == 200, r.text


@REFRESH
async def test_an_outage_answers_503_with_retry_after_and_the_first_request_after_succeeds(
    pg_url: str, tmp_path: Path, revocation_refresh_s: float
) -> None:
    seed_two_sites(pg_url)
    database = pg_url.rsplit("/", 1)[1]
    async with (
        api_with_its_own_pool(pg_url, tmp_path, revocation_refresh_s) as api,
        api.client() as client,
    ):
        assert (await sites(api, client)).status_code == 200
        with refusing_connections(database):
            for path in ("/v1/sites", "/v1/equipment/press-a/oee", "/v1/sites"):
                r = await asyncio.wait_for(
                    client.get(path, params=WINDOW, headers=api.headers("viewer", ["site-a"])),
                    GUARD_S,
                )
                assert r.status_code == 503, r.text
                assert r.headers["content-type"].startswith("application/problem+json")
                assert r.json()["type"] == "/problems/database-unavailable"
                assert int(r.headers["Retry-After"]) > 0
                assert r.headers["X-Trace-Id"] == r.json()["trace_id"]
            r = await asyncio.wait_for(client.get("/readyz"), GUARD_S)
            assert r.status_code == 503

        r = await sites(api, client)
        assert r.status_code == 200, r.text
        assert (await client.get("/readyz")).status_code == 200


def test_a_checkouts_opening_statement_checks_the_connection(pg_url: str) -> None:
    """A checkout that starts with a statement of its own (the API's scoped checkouts) has it
    checked instead of an empty one: a connection it finds dropped is replaced within the
    checkout, any other error of it is the caller's and leaves the pool serving."""
    database = pg_url.rsplit("/", 1)[1]
    pool = make_pool(DatabaseSettings(url=pg_url, pool_min=2, pool_max=2), name="opening")

    def opening(conn: psycopg.Connection[object]) -> None:
        conn.execute("SELECT 1")

    try:
        with pool.connection(opening=opening) as conn:
            first = conn.info.backend_pid
        assert drop_connections(database) >= 1
        with pool.connection(opening=opening) as conn:
            assert conn.info.backend_pid != first
            assert conn.execute("SELECT 2").fetchone() == (2,)
        with (
            pytest.raises(psycopg.errors.UndefinedTable),
            pool.connection(opening=lambda c: c.execute("SELECT * FROM no_such_table")),
        ):
            pass
        with pool.connection(opening=opening) as conn:
            assert conn.execute("SELECT 3").fetchone() == (3,)
    finally:
        pool.close()
