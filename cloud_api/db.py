"""PostgreSQL access: ordered plain-SQL migrations, the checked connection pool, retries."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any, TypeVar

import psycopg
import psycopg.sql
import structlog
from psycopg import errors
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

from cloud_api.config import DatabaseSettings
from common.retry import Backoff

T = TypeVar("T")
# A statement that starts a checkout and checks its connection (CheckedPool.getconn).
Opening = Callable[[psycopg.Connection[Any]], object]
log = structlog.get_logger("cloud_api.db")

TRANSIENT = (
    psycopg.OperationalError,
    errors.SerializationFailure,
    errors.DeadlockDetected,
)


def migrations() -> list[tuple[str, str]]:
    """(name, sql) of every migration, in order."""
    folder = resources.files("cloud_api") / "migrations"
    items = sorted(
        (f.name, f.read_text(encoding="utf-8")) for f in folder.iterdir() if f.name.endswith(".sql")
    )
    return items


def command_connection(settings: DatabaseSettings) -> psycopg.Connection[TupleRow]:
    """A connection for one `cloud-api` command. It names the database on stderr first, so
    an operator sees which one a command reads or changes (never the password)."""
    print(f"cloud-api: {settings.describe()}", file=sys.stderr)
    return psycopg.connect(settings.require_url())


def migrate(url: str) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; returns those applied.

    Idempotent and forward-only: an applied migration whose file changed is an error.
    """
    applied: list[str] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS ops")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS ops.schema_migrations ("
            " name text PRIMARY KEY, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        # One migrator at a time, even with several replicas starting together.
        conn.execute("SELECT pg_advisory_lock(727274)")
        try:
            done: dict[str, str] = dict(
                conn.execute("SELECT name, checksum FROM ops.schema_migrations").fetchall()
            )
            for name, sql in migrations():
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if name in done:
                    if done[name] != checksum:
                        raise RuntimeError(
                            f"migration {name} was changed after it was applied; "
                            "add a new migration instead"
                        )
                    continue
                with conn.transaction():
                    conn.execute(sql.encode())
                    conn.execute(
                        "INSERT INTO ops.schema_migrations(name, checksum) VALUES (%s, %s)",
                        (name, checksum),
                    )
                applied.append(name)
            conn.execute("SELECT ops.ensure_month_partitions(now() - interval '1 month')")
            conn.execute("SELECT ops.ensure_month_partitions(now())")
            conn.execute("SELECT ops.ensure_month_partitions(now() + interval '1 month')")
            # Grants and site policies for every table, including ones added by migrations
            # that came after the security migration (see 0010_security.sql).
            row = conn.execute("SELECT to_regprocedure('ops.apply_access_policies()')").fetchone()
            if row is not None and row[0] is not None:
                conn.execute("SELECT ops.apply_access_policies()")
        finally:
            conn.execute("SELECT pg_advisory_unlock(727274)")
    return applied


# After the pool is open, a connection attempt that keeps failing gives up after this long;
# the next checkout that finds no connection starts a new one at once. psycopg_pool's default
# (five minutes of attempts backing off to a minute apart) left the first requests after a
# database outage waiting for the next scheduled attempt, past their checkout timeout.
RECONNECT_SECONDS = 1.0
# Opening waits this long for the first connections (the database may still be starting).
OPEN_SECONDS = 30.0


class CheckedPool(ConnectionPool):
    """A connection pool that checks each connection before handing it out.

    A server restart or pg_terminate_backend kills every idle connection at once, and an
    unchecked pool hands them out one by one, each failing its request. psycopg_pool's own
    `check` callback finds them one per checkout too, sleeping a growing backoff (1 s, 2 s ...)
    after each. Here the first dead connection found makes the pool check all its idle ones in
    one pass (ConnectionPool.check, which replaces the dead), and the checkout goes on at once
    with a live or fresh connection, within its timeout.

    The check is an empty statement, one round trip; a caller that starts every checkout with
    a statement of its own passes it as `opening` (`connection(opening=...)`), which then is
    the check: a connection it finds lost counts as dead, as above, and any other error of it
    is the caller's.

    `check_idle_s`: only a connection that waited in the pool at least this long is checked
    (0, the default: every one). The check is a round trip; a busy ingest hands the same few
    connections out hundreds of times a second, and one killed while in use fails its
    transaction, which is retried on another (nothing is acked before its commit).
    """

    def __init__(self, *args: Any, check_idle_s: float = 0.0, **kwargs: Any) -> None:
        self.check_idle_s = check_idle_s
        # id(connection) -> when it last came back to the pool
        self._returned: dict[int, float] = {}
        super().__init__(*args, **kwargs)

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        self._returned[id(conn)] = time.monotonic()
        super().putconn(conn)

    def _needs_check(self, conn: psycopg.Connection[Any]) -> bool:
        if self.check_idle_s <= 0:
            return True
        returned = self._returned.pop(id(conn), None)
        return returned is None or time.monotonic() - returned >= self.check_idle_s

    def getconn(
        self, timeout: float | None = None, *, opening: Opening | None = None
    ) -> psycopg.Connection[Any]:
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        swept = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PoolTimeout(f"couldn't get a checked connection after {budget:.2f} sec")
            conn: psycopg.Connection[Any] = super().getconn(remaining)
            # The caller's opening statement always runs (it is the checkout's first statement).
            if not self._needs_check(conn) and opening is None:
                return conn
            try:
                if opening is None:
                    self.check_connection(conn)
                else:
                    opening(conn)
            except psycopg.Error as exc:
                lost = opening is None or conn.broken or isinstance(exc, psycopg.OperationalError)
                if not lost:
                    self.putconn(conn)
                    raise
                conn.close()  # returned closed, the pool replaces it
                self.putconn(conn)
                if not swept:
                    swept = True
                    self.check()
                continue
            return conn

    @contextmanager
    def connection(
        self, timeout: float | None = None, *, opening: Opening | None = None
    ) -> Iterator[psycopg.Connection[Any]]:
        """As ConnectionPool.connection, with the checkout's `opening` statement (see above)."""
        conn = self.getconn(timeout, opening=opening)
        try:
            with conn:
                yield conn
        finally:
            self.putconn(conn)


def make_pool(
    settings: DatabaseSettings,
    *,
    name: str,
    role: str | None = None,
    prepare: bool = False,
    timeout: float = 30.0,
    check_idle_s: float = 0.0,
    autocommit: bool = False,
) -> ConnectionPool:
    """A checked connection pool; with `role`, every connection runs as that database role.

    With `prepare` (the API's read pool and ingest's pool), queries run often are prepared
    on the server per `settings.prepare_threshold`; otherwise nothing is prepared. `timeout`
    bounds each checkout (PoolTimeout after it); `check_idle_s`: see CheckedPool.
    `autocommit`: the connections' mode (the API's pool, whose every checkout opens and closes
    its transaction itself: `SitePool`).
    """

    def configure(conn: psycopg.Connection[Any]) -> None:
        # Session-level, so commits inside a checkout keep the role.
        conn.execute(psycopg.sql.SQL("SET ROLE {}").format(psycopg.sql.Identifier(str(role))))
        conn.commit()

    pool = CheckedPool(
        settings.require_url(),
        min_size=settings.pool_min,
        max_size=settings.pool_max,
        kwargs={
            "autocommit": autocommit,
            "prepare_threshold": settings.prepare_threshold if prepare else None,
        },
        configure=configure if role else None,
        name=name,
        open=False,
        timeout=timeout,
        check_idle_s=check_idle_s,
    )
    pool.open(wait=True, timeout=OPEN_SECONDS)
    pool.reconnect_timeout = RECONNECT_SECONDS
    return pool


def with_retry(fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Run fn again after transient database errors, with exponential backoff (not after a
    PoolTimeout: the checkout already waited as long as its caller allows)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except PoolTimeout:
            raise  # the pool already waited its whole checkout timeout
        except TRANSIENT as exc:
            if attempt == attempts:
                raise
            delay = Backoff(base_delay, 5.0, jitter=False).delay(attempt - 1)
            log.warning(
                "transient database error, retrying",
                error=type(exc).__name__,
                attempt=attempt,
                delay=delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")
