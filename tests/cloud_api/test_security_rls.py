"""Row-level security and database roles, checked directly in SQL as the API's role
(gateway_api) and the ingest role (gateway_ingest)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import errors
from psycopg_pool import ConnectionPool

from cloud_api.access.auth import Principal
from cloud_api.access.security import ScopeLost, SitePool, database_scope
from cloud_api.config import DatabaseSettings
from cloud_api.db import make_pool, migrate
from oee.events import dump_events
from sync.envelope import EnvelopeHeader, seal
from sync.keys import AgentKeys, CloudKeyring
from tests.cloud_api.ingestion import enrolled_agent
from tests.cloud_api.securitykit import T0, seed_two_sites


def site_tables(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    rows = conn.execute(
        "SELECT format('%I.%I', c.table_schema, c.table_name) FROM information_schema.columns c "
        "JOIN information_schema.tables t USING (table_schema, table_name) "
        "JOIN pg_class k ON k.oid = format('%I.%I', c.table_schema, c.table_name)::regclass "
        "WHERE c.column_name = 'site_id' AND c.table_schema IN ('registry', 'facts', 'rollups') "
        "AND t.table_type = 'BASE TABLE' AND NOT k.relispartition ORDER BY 1"
    ).fetchall()
    return [str(r[0]) for r in rows]


def as_api(conn: psycopg.Connection[tuple[object, ...]], sites: str | None) -> None:
    conn.execute("SET ROLE gateway_api")
    if sites is not None:
        conn.execute("SELECT set_config('app.sites', %s, false)", (sites,))


def test_every_site_table_has_a_policy(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        tables = site_tables(conn)
        assert {"registry.equipment", "facts.events", "rollups.oee_1m", "facts.annotations"} <= set(
            tables
        )
        for table in tables:
            schema, name = table.split(".")
            row = conn.execute(
                "SELECT c.relrowsecurity, EXISTS (SELECT 1 FROM pg_policies p WHERE "
                "p.schemaname = %s AND p.tablename = %s AND p.policyname = 'site_scope') "
                "FROM pg_class c WHERE c.oid = %s::regclass",
                (schema, name, table),
            ).fetchone()
            assert row == (True, True), table


def test_api_role_sees_only_its_sites(pg_url: str) -> None:
    seed_two_sites(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        tables = site_tables(conn)
        as_api(conn, "site-a")
        for table in tables:
            sites = {r[0] for r in conn.execute(f"SELECT DISTINCT site_id FROM {table}")}
            assert sites <= {"site-a"}, table
        # A query that forgets its site filter still sees only site-a.
        rows = conn.execute("SELECT site_id, equipment_id FROM registry.equipment").fetchall()
        assert rows == [("site-a", "press-a")]
        assert conn.execute("SELECT count(*) FROM rollups.oee_1m").fetchone() == (1,)
        # Even asking for site-b by name.
        assert conn.execute(
            "SELECT count(*) FROM rollups.oee_1m WHERE site_id = 'site-b'"
        ).fetchone() == (0,)
        conn.execute("SELECT set_config('app.sites', 'site-a,site-b', false)")
        assert conn.execute("SELECT count(*) FROM rollups.oee_1m").fetchone() == (2,)
        conn.execute("SELECT set_config('app.sites', '*', false)")
        assert conn.execute("SELECT count(*) FROM registry.sites").fetchone() == (2,)
        # Unset or empty shows nothing (fail closed); a pattern is not a wildcard.
        for scope in ("", "site-%", "site-a site-b", "'*'"):
            conn.execute("SELECT set_config('app.sites', %s, false)", (scope,))
            assert conn.execute("SELECT count(*) FROM rollups.oee_1m").fetchone() == (0,), scope
        conn.execute("RESET app.sites")
        assert conn.execute("SELECT count(*) FROM registry.equipment").fetchone() == (0,)


def test_api_role_cannot_write_or_bypass(pg_url: str) -> None:
    seed_two_sites(pg_url)
    month = T0.strftime("%Y%m")
    with psycopg.connect(pg_url) as conn:
        conn.execute("SELECT ops.ensure_month_partitions(%s)", (T0,))
        conn.commit()
    statements = [
        "UPDATE rollups.oee_1m SET produced = 0",
        "DELETE FROM registry.equipment",
        "INSERT INTO registry.sites(site_id) VALUES ('site-x')",
        f"SELECT count(*) FROM facts.events_{month}",  # a partition read around its parent
        "SELECT count(*) FROM ops.quarantine",
        "SELECT count(*) FROM ops.reject_counts",
        "ALTER TABLE rollups.oee_1m DISABLE ROW LEVEL SECURITY",
        "SELECT count(*) FROM ops.schema_migrations",
    ]
    for statement in statements:
        with psycopg.connect(pg_url) as conn:
            as_api(conn, "site-a")
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(statement)


def test_login_role_of_the_api_cannot_escape(pg_url: str) -> None:
    """Deployed, the API logs in as a member of gateway_api (not as a superuser), so neither
    SET ROLE nor RESET ROLE leads out of the site policies."""
    seed_two_sites(pg_url)
    login = f"t_api_{secrets.token_hex(4)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {login} LOGIN NOINHERIT IN ROLE gateway_api")
    try:
        user_url = pg_url.replace("postgresql://postgres@", f"postgresql://{login}@")
        with psycopg.connect(user_url, autocommit=True) as conn:
            conn.execute("SET ROLE gateway_api")
            conn.execute("SELECT set_config('app.sites', 'site-a', false)")
            assert conn.execute("SELECT count(*) FROM registry.equipment").fetchone() == (1,)
            for statement in ("SET ROLE postgres", "SET ROLE gateway_ingest"):
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(statement)
            conn.execute("RESET ROLE")  # back to the login role, which has no grants itself
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("SELECT count(*) FROM registry.equipment")
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {login}")


def test_annotations_write_only_into_visible_sites(pg_url: str) -> None:
    seed_two_sites(pg_url)
    insert = (
        "INSERT INTO facts.annotations(site_id, annotation_id, equipment_id, ts, kind, reason, "
        "created_by) VALUES (%s, gen_random_uuid(), 'press-b', now(), 'downtime', 'jam', 't')"
    )
    with psycopg.connect(pg_url) as conn:
        as_api(conn, "site-a")
        with pytest.raises(errors.InsufficientPrivilege, match="row-level security"):
            conn.execute(insert, ("site-b",))
    with psycopg.connect(pg_url) as conn:
        as_api(conn, "site-b")
        conn.execute(insert, ("site-b",))
        conn.commit()


def test_audit_rows_are_append_only(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        as_api(conn, None)
        conn.execute(
            "INSERT INTO audit.records(actor, actor_kind, action) VALUES ('u', 'token', 'x.y')"
        )
        conn.commit()
        assert conn.execute("SELECT count(*) FROM audit.records").fetchone() == (1,)
    for statement in (
        "UPDATE audit.records SET actor = 'someone else'",
        "DELETE FROM audit.records",
        "TRUNCATE audit.records",
    ):
        for role in ("gateway_api", "gateway_ingest"):
            with psycopg.connect(pg_url) as conn:
                conn.execute(f"SET ROLE {role}")
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(statement)
        # Not even the owner changes a row without first dropping the trigger.
        with psycopg.connect(pg_url) as conn, pytest.raises(errors.InsufficientPrivilege):
            conn.execute(statement)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT actor FROM audit.records").fetchall() == [("u",)]


def test_tables_added_later_get_policies_on_migrate(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE rollups.later_thing (site_id text NOT NULL, v int)")
        conn.execute("INSERT INTO rollups.later_thing VALUES ('site-a', 1), ('site-b', 2)")
        conn.commit()
    migrate(pg_url)  # no migration pending: the policies are still applied
    with psycopg.connect(pg_url) as conn:
        as_api(conn, "site-b")
        assert conn.execute("SELECT v FROM rollups.later_thing").fetchall() == [(2,)]


def test_ingest_role_stores_batches_of_every_site(
    pg_url: str, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    """Ingest through a pool that runs as gateway_ingest (as `cloud-api ingest` does)."""
    settings = DatabaseSettings(url=pg_url, pool_min=1, pool_max=2)
    ingest_pool: ConnectionPool = make_pool(settings, name="ingest", role="gateway_ingest")
    try:
        with ingest_pool.connection() as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("gateway_ingest",)
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        for site in ("site-a", "site-b"):
            agent = enrolled_agent(
                pg_url, ingest_pool, cloud_keys, tmp_path / site, agent_id=f"edge-{site}",
                site_id=site,
            )  # fmt: skip
            trace_id = secrets.token_hex(16)
            events = [agent.bucket(f"press-{site}", now - timedelta(minutes=2), production_s=60)]
            keys = AgentKeys.load(tmp_path / site)
            header = EnvelopeHeader(
                agent_id=agent.agent_id,
                site_id=site,
                epoch=agent.epoch,
                seq=1,
                count=len(events),
                signing_key_id=keys.signing_key_id,
                cloud_key_id=keys.cloud_public.key_id,
                suite=keys.cloud_public.suite,
                trace_id=trace_id,
            )
            raw = seal(dump_events(events), header, keys.signing_key, keys.cloud_public)
            outcome = agent.store.process(agent.topic, raw)
            assert outcome.status == "stored", outcome.reason
            with psycopg.connect(pg_url) as conn:
                stored = conn.execute(
                    "SELECT b.trace_id, array_agg(DISTINCT e.trace_id) FROM facts.batches b "
                    "JOIN facts.events e USING (site_id, agent_id, epoch, seq) "
                    "WHERE b.site_id = %s GROUP BY 1",
                    (site,),
                ).fetchone()
            assert stored == (trace_id, [trace_id])
    finally:
        ingest_pool.close()


def test_the_apis_own_pool_switches_scope_per_caller(pg_url: str) -> None:
    """Each checkout of a SitePool is one transaction with the caller's role and sites; a
    caller with other sites (or none) never sees the previous caller's, and nothing of a
    caller stays on the connection afterwards."""
    seed_two_sites(pg_url)
    settings = DatabaseSettings(url=pg_url, pool_min=1, pool_max=1)
    pool = SitePool(make_pool(settings, name="scoped"), "gateway_api")

    def visible(principal: Principal | None) -> list[tuple[object, ...]]:
        with database_scope(principal), pool.connection() as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("gateway_api",)
            return conn.execute("SELECT site_id FROM registry.sites ORDER BY 1").fetchall()

    def caller(*sites: str) -> Principal:
        return Principal("t", "viewer", sites or None, "token", secrets.token_hex(4))

    def left_on_the_connection() -> tuple[object, ...] | None:
        with pool.pool.connection() as conn:
            return conn.execute(
                "SELECT current_user, current_setting('app.sites', true)"
            ).fetchone()

    try:
        assert visible(caller("site-a")) == [("site-a",)]
        assert left_on_the_connection() in {("postgres", None), ("postgres", "")}
        assert visible(caller("site-a")) == [("site-a",)]
        assert visible(caller("site-b")) == [("site-b",)]
        assert visible(caller()) == [("site-a",), ("site-b",)]  # every site
        assert visible(None) == []  # no caller: nothing
        # A failed statement rolls back; the next caller still gets exactly its own sites.
        with (
            pytest.raises(errors.UndefinedTable),
            database_scope(caller("site-a")),
            pool.connection() as conn,
        ):
            conn.execute("SELECT * FROM no_such_table")
        assert visible(caller("site-b")) == [("site-b",)]
        # A block that ends the transaction itself would go on unscoped: refused.
        with pytest.raises(ScopeLost), database_scope(caller("site-a")), pool.connection() as conn:
            conn.commit()
            conn.execute("SELECT site_id FROM registry.sites").fetchall()
        assert left_on_the_connection() in {("postgres", None), ("postgres", "")}
        assert visible(caller("site-a")) == [("site-a",)]
        # A checkout with generic plans is scoped the same way, and its plan cache mode ends
        # with it as well.
        with database_scope(caller("site-b")), pool.connection(generic_plans=True) as conn:
            assert conn.execute(
                "SELECT current_user, current_setting('plan_cache_mode')"
            ).fetchone() == ("gateway_api", "force_generic_plan")
            assert conn.execute("SELECT site_id FROM registry.sites").fetchall() == [("site-b",)]
        with pool.pool.connection() as conn:
            assert conn.execute("SELECT current_setting('plan_cache_mode')").fetchone() == ("auto",)
        assert left_on_the_connection() in {("postgres", None), ("postgres", "")}
    finally:
        pool.close()
