"""What every read route shares: the caller's visible sites, window and time zone parsing,
database access off the event loop, and rendering (JSON or CSV, ETag, Cache-Control, 304,
Server-Timing parts)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import csv
import functools
import hashlib
import io
import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, date, datetime
from typing import Any, NamedTuple, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from fastapi import Request, Response
from psycopg_pool import ConnectionPool

from cloud_api import metrics
from cloud_api.access import headers as request_headers
from cloud_api.access.security import SitePool
from cloud_api.api.cache import etag_matches
from cloud_api.api.queries import Ambiguous, Conn, NotFound
from cloud_api.db import with_retry
from cloud_api.problems import Problem, invalid_parameter

T = TypeVar("T")


def allowed_sites(request: Request) -> list[str] | None:
    """The sites the caller may see; None = all. Authentication sets `request.state.sites`."""
    sites = getattr(request.state, "sites", None)
    return None if sites is None else list(sites)


# The instants a window may name: Python's calendar (years 1 to 9999) less a year on each
# side, so that a bound can be shown in any time zone and the bucket holding it aligned to
# its week or month without leaving the calendar (beyond it, conversions raise OverflowError).
EARLIEST = datetime(2, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
# The longest IANA zone names have about 30 characters.
MAX_ZONE_NAME = 64


def outside_calendar(value: datetime) -> str | None:
    """Why an aware `value` cannot be used as a bound, or None. Compared, not converted:
    converting 0001-01-01T00:00+01:00 to UTC overflows."""
    if EARLIEST <= value <= LATEST:
        return None
    return f"must lie between {EARLIEST.isoformat()} and {LATEST.isoformat()}"


def instant(name: str, value: datetime) -> datetime:
    """`value` in UTC; 422 naming the parameter when it has no offset or is out of range."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise invalid_parameter(name, "needs a time zone offset, e.g. 2026-01-05T06:00:00Z")
    reason = outside_calendar(value)
    if reason is not None:
        raise invalid_parameter(name, reason)
    return value.astimezone(UTC)


def window(from_: datetime, to: datetime) -> tuple[datetime, datetime]:
    """The half-open UTC window [from, to); 422 naming the parameter when unusable."""
    start, end = instant("from", from_), instant("to", to)
    if end <= start:
        raise invalid_parameter("to", "must be after `from`")
    return start, end


def zone(name: str) -> ZoneInfo:
    if len(name) > MAX_ZONE_NAME:
        raise invalid_parameter("tz", f"longer than {MAX_ZONE_NAME} characters")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise invalid_parameter("tz", f"unknown IANA time zone {name!r}") from None


class DbThreads:
    """The threads the read routes' database work runs on: `http.db_threads`, never more
    than the pool has connections, so that a request waits for a thread in the queue here
    (no time limit, in arrival order) rather than for a connection in the pool, whose
    checkout timeout answers 503. With anyio's 40 threads and 10 connections, 1,000 clients
    made some threads wait out the timeout while the threads holding connections waited for
    the GIL; with 10 threads for 10 connections, the answers' p99 at 32 clients was three
    times that with 2 (python -m bench.api): the threads take turns at the GIL.

    The hop is an asyncio future, a C queue and one `call_soon_threadsafe` back: anyio's
    `run_in_threadpool` (its capacity limiter, cancel scope and Condition-based queue) was a
    fifth of the loop's time per uncached answer (py-spy --gil), and `run_in_executor` still
    chains a concurrent.futures future to an asyncio one under their locks on every call.
    Work whose caller was cancelled before a thread took it up is not run, as with an
    executor."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _start(self) -> None:
        with self._lock:
            while len(self._workers) < self.threads:
                worker = threading.Thread(
                    target=self._work, name=f"api-db_{len(self._workers)}", daemon=True
                )
                worker.start()
                self._workers.append(worker)

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on one of the threads, in a copy of the caller's context (the caller's
        database scope is a context variable, cloud_api/access/security.py)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if len(self._workers) < self.threads:
            self._start()
        self._queue.put(_Work(contextvars.copy_context(), fn, loop, future))
        return await future

    def _work(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            _do(work)
            del work  # nothing of a request outlives it here

    def close(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
        for _ in workers:
            self._queue.put(None)
        for worker in workers:
            worker.join()


class _Work(NamedTuple):
    context: contextvars.Context
    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def _do(work: _Work) -> None:
    if work.future.cancelled():
        return
    try:
        result = work.context.run(work.fn)
    except BaseException as exc:
        _settle(work, _failed, exc)
    else:
        _settle(work, _succeeded, result)


def _settle(work: _Work, settle: Callable[[asyncio.Future[Any], Any], None], value: Any) -> None:
    # A closed loop raises RuntimeError: nobody waits any more.
    with contextlib.suppress(RuntimeError):
        work.loop.call_soon_threadsafe(settle, work.future, value)


def _succeeded(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _failed(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


async def db(request: Request, fn: Callable[[Conn], T], *, generic_plans: bool = False) -> T:
    """Run `fn` with a pooled connection on a worker thread, retrying transient errors
    (reads only, so a retry is safe); adds the time to the request's Server-Timing.
    `generic_plans`: the checkout's prepared statements run their generic plan
    (`SitePool.connection`)."""
    pool: ConnectionPool = request.app.state.pool
    checkout: Callable[[], AbstractContextManager[Conn]] = (
        functools.partial(pool.connection, generic_plans=True)
        if generic_plans and isinstance(pool, SitePool)
        else pool.connection
    )

    def call() -> T:
        with checkout() as conn:
            return fn(conn)

    started = time.perf_counter()
    try:
        threads: DbThreads = request.app.state.db_threads
        return await threads.run(functools.partial(with_retry, call, attempts=3))
    except NotFound as exc:
        raise Problem(404, str(exc)) from None
    except Ambiguous as exc:
        raise Problem(409, str(exc)) from None
    finally:
        timings = request.state.__dict__.setdefault("timings", {})
        timings["db"] = timings.get("db", 0.0) + (time.perf_counter() - started) * 1000
        stats = pool.get_stats()
        metrics.child(metrics.DB_POOL, "size").set(stats.get("pool_size", 0))
        metrics.child(metrics.DB_POOL, "available").set(stats.get("pool_available", 0))
        metrics.child(metrics.DB_POOL, "waiting").set(stats.get("requests_waiting", 0))


def _default(value: object) -> object:
    # orjson writes datetimes and dates itself (ISO 8601, as isoformat() does); anything else
    # in a payload is a bug.
    raise TypeError(f"cannot encode {type(value).__name__}")


def wants_csv(request: Request) -> bool:
    return request_headers.of(request.scope).csv


def _csv_body(rows: Sequence[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                k: v.isoformat()
                if isinstance(v, datetime | date)
                else ("" if v is None else json.dumps(v) if isinstance(v, dict | list) else v)
                for k, v in row.items()
            }
        )
    return out.getvalue().encode()


def respond(
    request: Request,
    payload: dict[str, Any],
    table: Sequence[dict[str, Any]] | None = None,
    *,
    closed: bool = False,
    cache: str | None = None,
    encoded: bytes | None = None,
) -> Response:
    """Render JSON (or CSV when asked and the result is a table) with a strong ETag.
    `encoded`: `payload` already encoded as JSON (by orjson, as here).

    Closed windows may be reused briefly and revalidated; open ones always revalidate.
    """
    if table is not None and wants_csv(request):
        body, media = _csv_body(table), f"{request_headers.CSV}; charset=utf-8"
    else:
        body = encoded if encoded is not None else orjson.dumps(payload, default=_default)
        media = "application/json"
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {
        "ETag": etag,
        "Cache-Control": "private, max-age=60" if closed else "private, no-cache",
        "Vary": "Accept, Authorization",
    }
    timings = getattr(request.state, "timings", {})
    parts = [f"db;dur={timings['db']:.1f}"] if "db" in timings else []
    if cache is not None:
        parts.append(f'cache;desc="{cache}"')
    if parts:
        headers["Server-Timing"] = ", ".join(parts)
    if etag_matches(request_headers.of(request.scope).if_none_match, etag.encode()):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media, headers=headers)
