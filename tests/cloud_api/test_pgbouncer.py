"""The API's site scope behind a real PgBouncer in transaction mode.

PgBouncer hands each transaction the next free server connection, so whatever a caller left
on a server connection (a role, `app.sites`, a prepared statement) would be met by the next
caller on it. The API logs in as a NOINHERIT member of gateway_api (as deployed), and callers
of two sites take turns on the same server connections: with a pool of 1 server connection
(forced sharing) and with the documented pool of 25.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, sql

from cloud_api.access.auth import Principal, generate_token_key
from cloud_api.access.security import SitePool, database_scope
from cloud_api.api.app import create_app
from cloud_api.config import CloudSettings, DatabaseSettings
from cloud_api.db import make_pool
from tests.cloud_api.securitykit import T0, WINDOW, SecuredApi, secured_api, seed_two_sites
from tests.conftest import PG_ADMIN, free_port

PGBOUNCER = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
SITES = ("site-a", "site-b")

pytestmark = pytest.mark.skipif(
    PGBOUNCER is None, reason="pgbouncer is needed (bash scripts/test-tools.sh installs it)"
)


def pgbouncer_version() -> tuple[int, int]:
    version = [str(PGBOUNCER), "--version"]
    out = subprocess.run(version, check=True, capture_output=True, text=True).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    assert match is not None, out
    return int(match[1]), int(match[2])


# PgBouncer keeps prepared statements apart per client from 1.21 on (max_prepared_statements);
# before that the API must prepare nothing (`database.prepare_threshold: null`).
PREPARED = PGBOUNCER is not None and pgbouncer_version() >= (1, 21)


@dataclass
class Bouncer:
    url: str  # the API's login through PgBouncer
    login: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture(params=[1, 25], ids=["one-server-connection", "pool-of-25"])
def bouncer(request: pytest.FixtureRequest, pg_url: str) -> Iterator[Bouncer]:
    """PgBouncer on a free port in front of the test database, transaction mode, with
    `default_pool_size` from the parameter; the API's login role, created for the test."""
    login = f"t_api_{secrets.token_hex(4)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOINHERIT IN ROLE gateway_api").format(
            sql.Identifier(login)))  # fmt: skip
    # PgBouncer refuses to run as root; its own user must reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    shutil.chown(folder, "postgres")
    port = free_port()
    (folder / "userlist.txt").write_text(f'"{login}" ""\n', encoding="utf-8")
    ini = folder / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        f"gateway = host=127.0.0.1 port={pg_url.rsplit(':', 1)[1].split('/', maxsplit=1)[0]} "
        f"dbname={pg_url.rsplit('/', 1)[1]}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'userlist.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {request.param}\nmax_client_conn = 200\n"
        + ("max_prepared_statements = 200\n" if PREPARED else "")
        + f"logfile = {folder / 'pgbouncer.log'}\npidfile = {folder / 'pgbouncer.pid'}\n",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [str(PGBOUNCER), "-u", "postgres", str(ini)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host = PG_ADMIN.split("@", 1)[1].split(":")[0]
    b = Bouncer(
        f"postgresql://{login}@{host}:{port}/gateway", login, proc, folder / "pgbouncer.log"
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            psycopg.connect(b.url, connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start: {b.log_text()[-2000:]}") from None
            time.sleep(0.05)
    yield b
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    shutil.rmtree(folder, ignore_errors=True)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(login)))


def caller(site: str) -> Principal:
    return Principal(f"user-{site}", "viewer", (site,), "token", secrets.token_hex(4))


def settings(bouncer: Bouncer, clients: int) -> DatabaseSettings:
    return DatabaseSettings(
        url=bouncer.url,
        pool_min=clients,
        pool_max=clients,
        prepare_threshold=2 if PREPARED else None,
    )


def test_callers_of_two_sites_share_server_connections_and_see_only_their_own(
    bouncer: Bouncer, pg_url: str
) -> None:
    seed_two_sites(pg_url)
    clients = 8
    pool = SitePool(make_pool(settings(bouncer, clients), name="api", prepare=True), "gateway_api")

    def checkout(site: str) -> tuple[str, int, set[object]]:
        """One caller's request: two statements that name no site."""
        with database_scope(caller(site)), pool.connection() as conn:
            first = conn.execute(
                "SELECT pg_backend_pid(), array_agg(DISTINCT site_id) FROM registry.equipment"
            ).fetchone()
            second = conn.execute(
                "SELECT pg_backend_pid(), current_user, current_setting('app.sites', true), "
                "(SELECT array_agg(DISTINCT site_id) FROM rollups.oee_1m)"
            ).fetchone()
        assert first is not None and second is not None
        assert first[0] == second[0], "one transaction, one server connection"
        assert second[1:3] == ("gateway_api", site)
        return site, int(first[0]), {*first[1], *second[3]}

    def unscoped() -> tuple[object, ...] | None:
        """A client of the same pooler that is not the API meets nothing of the last caller."""
        with psycopg.connect(bouncer.url, autocommit=True) as conn:
            state = conn.execute(
                "SELECT current_user, coalesce(current_setting('app.sites', true), '')"
            ).fetchone()
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("SELECT count(*) FROM registry.equipment")
            return state

    try:
        # Turn by turn first (PgBouncer reuses the server connection released last), then
        # all clients at once.
        served = [checkout(SITES[i % 2]) for i in range(20)]
        with ThreadPoolExecutor(clients) as threads:
            served += list(threads.map(checkout, [SITES[i % 2] for i in range(400)]))
        assert unscoped() == (bouncer.login, "")
    finally:
        pool.close()

    for site, _, seen in served:
        assert seen == {site}, f"a caller of {site} saw {seen}"
    sites_per_backend: dict[int, set[str]] = {}
    for site, pid, _ in served:
        sites_per_backend.setdefault(pid, set()).add(site)
    shared = [pid for pid, sites in sites_per_backend.items() if sites == set(SITES)]
    assert shared, f"no server connection served both sites: {sites_per_backend}"
    assert len(sites_per_backend) <= 25
    if len(sites_per_backend) == 1:
        assert shared == list(sites_per_backend)


async def test_the_api_through_pgbouncer(bouncer: Bouncer, pg_url: str, tmp_path: Path) -> None:
    """The whole app on a pool through PgBouncer: interleaved requests of both sites get
    their own numbers and never the other site's equipment."""
    seed_two_sites(pg_url)
    pool = make_pool(settings(bouncer, 6), name="api", prepare=True)
    api = secured_api(pg_url, pool, tmp_path)
    headers = {site: api.headers("viewer", [site]) for site in SITES}
    try:
        async with api.client() as client:

            async def ask(site: str, equipment_site: str) -> tuple[str, str, int, object]:
                press = f"press-{equipment_site[-1]}"
                r = await client.get(
                    f"/v1/equipment/{press}/oee", params=WINDOW, headers=headers[site]
                )
                body = r.json()
                produced = body["components"]["produced"] if r.status_code == 200 else None
                sites = await client.get("/v1/sites", headers=headers[site])
                assert sites.status_code == 200, sites.text
                listed = sorted(s["site_id"] for s in sites.json()["sites"])
                return site, equipment_site, r.status_code, (produced, listed)

            asks = [ask(s, e) for _ in range(15) for s in SITES for e in SITES]
            answers = await asyncio.gather(*asks)
    finally:
        pool.close()
    for site, equipment_site, status, (produced, listed) in answers:
        assert listed == [site]
        if site == equipment_site:
            assert (status, produced) == (200, 10)
        else:
            assert status == 404, (site, equipment_site, status)


async def test_a_data_change_reaches_the_answers_of_an_api_behind_pgbouncer(
    bouncer: Bouncer, pg_url: str, tmp_path: Path
) -> None:
    """The app's own pool goes through PgBouncer, its data-change listener straight to
    PostgreSQL (`database.listen_url`): a LISTEN through a transaction pooler hears nothing,
    and the answers cache would serve the numbers from before a change for ever."""
    seed_two_sites(pg_url)
    keys_dir = tmp_path / "cloud-keys"
    generate_token_key(keys_dir)
    cloud = CloudSettings(database=settings(bouncer, 4), keys_dir=keys_dir)
    cloud.database.listen_url = pg_url
    api = SecuredApi(create_app(cloud), cloud, keys_dir)
    headers = api.headers("viewer", ["site-a"])
    async with api.app.router.lifespan_context(api.app), api.client() as client:
        assert await asyncio.to_thread(api.app.state.data_marks.connected.wait, 20)

        async def produced() -> int:
            r = await client.get("/v1/oee", params=query, headers=headers)
            assert r.status_code == 200, r.text
            hits.append('cache;desc="hit"' in r.headers["server-timing"])
            return int(r.json()["total"]["components"]["produced"])

        query = {"scope": "equipment", "id": "press-a", **WINDOW}
        hits: list[bool] = []
        assert await produced() == await produced() == 10
        assert hits == [False, True]  # the second answer was served again
        with psycopg.connect(pg_url) as conn, conn.transaction():
            conn.execute(
                "INSERT INTO rollups.oee_1m(site_id, equipment_id, bucket, planned_busy_s, "
                "production_s, produced, good, ideal_produced_s, ideal_good_s) "
                "VALUES ('site-a', 'press-a', %s, 60, 50, 10, 9, 40, 36)",
                (T0 + timedelta(minutes=1),),
            )
            conn.execute(
                "INSERT INTO rollups.data_versions(site_id, equipment_id, day, version) "
                "VALUES ('site-a', 'press-a', %s, nextval('rollups.data_version_seq')) "
                "ON CONFLICT (site_id, equipment_id, day) DO UPDATE SET version = excluded.version",
                (T0.date(),),
            )
        # The notification arrives just after the commit; the limit only ends a broken test.
        deadline = time.monotonic() + 10
        while (now := await produced()) != 20:
            assert time.monotonic() < deadline, f"the API still answers {now} parts"
            await asyncio.sleep(0.25)  # well inside the viewer tier's burst of 60
