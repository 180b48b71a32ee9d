"""The per-request machinery made cheaper for the series routes keeps its behaviour: the
database threads' hop (`DbThreads`), the short way's parameter checks without pydantic, the
request statistics' minute rows, the trace id bound into logs, memoized metric children and
ratios computed without their model."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import pytest
import structlog
from prometheus_client import CollectorRegistry, Counter

from cloud_api import metrics, tracing
from cloud_api.api import fastpath
from cloud_api.api.app import create_app
from cloud_api.api.ops_stats import RequestStats
from cloud_api.api.routes.analytics import ratios_of
from cloud_api.api.routes.common import DbThreads
from cloud_api.config import CloudSettings, DatabaseSettings, HttpSettings
from cloud_api.db import make_pool
from oee.components import Components, ratios

_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_db_threads", default="unset")


def test_db_threads_run_in_the_callers_context_and_return_or_raise() -> None:
    threads = DbThreads(2)

    def read() -> tuple[str, str]:
        seen = _VAR.get()
        _VAR.set("changed in the thread")  # a copy: the caller keeps its own
        return seen, threading.current_thread().name

    async def main() -> None:
        _VAR.set("the caller's")
        seen, name = await threads.run(read)
        assert seen == "the caller's"
        assert name.startswith("api-db")
        assert _VAR.get() == "the caller's"
        with pytest.raises(KeyError, match="missing"):
            await threads.run(lambda: {}["missing"])
        # Still serving after an error.
        assert await threads.run(lambda: 7) == 7

    try:
        asyncio.run(main())
    finally:
        threads.close()


def test_db_threads_run_at_most_their_number_at_once_in_arrival_order() -> None:
    threads = DbThreads(2)
    release = threading.Event()
    lock = threading.Lock()
    running = 0
    most = 0
    started: list[int] = []

    def work(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            started.append(i)
        release.wait()
        with lock:
            running -= 1
        return i

    async def main() -> list[int]:
        tasks = [asyncio.ensure_future(threads.run(lambda i=i: work(i))) for i in range(6)]
        # Let every task queue its work before any is released.
        await asyncio.sleep(0)
        release.set()
        return list(await asyncio.gather(*tasks))

    try:
        assert asyncio.run(main()) == list(range(6))
    finally:
        threads.close()
    assert most <= 2
    assert sorted(started) == list(range(6))
    # Taken up in the order they came (two threads: a pair may start in either order).
    assert sorted(started[:2]) == [0, 1]


def test_db_threads_skip_work_whose_caller_was_cancelled_before_it_started() -> None:
    threads = DbThreads(1)
    release = threading.Event()
    ran: list[str] = []

    def blocking() -> str:
        release.wait()
        ran.append("first")
        return "first"

    async def main() -> None:
        first = asyncio.ensure_future(threads.run(blocking))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(threads.run(lambda: ran.append("second")))
        await asyncio.sleep(0)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        release.set()
        assert await first == "first"
        # The one thread takes work in order: the cancelled work came up before this.
        assert await threads.run(lambda: "third") == "third"

    try:
        asyncio.run(main())
    finally:
        threads.close()
    assert ran == ["first"]


def test_db_threads_start_again_after_close() -> None:
    threads = DbThreads(1)
    try:
        assert asyncio.run(threads.run(lambda: 1)) == 1
        threads.close()
        assert asyncio.run(threads.run(lambda: 2)) == 2
    finally:
        threads.close()


@pytest.mark.parametrize(("db_threads", "pool_max", "expected"), [(2, 10, 2), (8, 4, 4)])
def test_an_app_runs_http_db_threads_never_more_than_its_pool_has_connections(
    pg_url: str, db_threads: int, pool_max: int, expected: int
) -> None:
    settings = CloudSettings(
        database=DatabaseSettings(url=pg_url, pool_max=pool_max),
        http=HttpSettings(db_threads=db_threads),
    )
    assert create_app(settings).state.db_threads.threads == expected
    pool = make_pool(DatabaseSettings(url=pg_url, pool_min=0, pool_max=pool_max), name="t")
    try:
        assert create_app(settings, pool=pool).state.db_threads.threads == expected
    finally:
        pool.close()


@pytest.mark.parametrize(
    "value",
    [
        "site", "line", "equipment", "Site", "site ", " site", "none", "1d", "1h", "1mo",
        "shift", "1M", "2h", "x" * 200, "x" * 201, "é" * 64, "é" * 65, "ß" * 200, "\u00a0",
        "0", "line\n", "A" * 64, "A" * 65,
    ],
)  # fmt: skip
def test_plain_checks_of_the_short_way_agree_with_the_routes_validation(value: str) -> None:
    """Each parameter checked by membership or length is accepted, with the same value, or
    refused exactly when the route's declared type (pydantic) accepts or refuses it."""
    for name in (*fastpath._CHOICES, *fastpath._LENGTHS):
        try:
            expected: tuple[Any, ...] = (
                "accepted",
                fastpath._ADAPTERS[name].validate_python(value),
            )
        except ValueError:
            expected = ("refused",)
        base = b"scope=equipment&id=m1&from=2026-01-05T06:00:00Z&to=2026-01-06T00:00:00Z"
        query = b"&".join(
            [p for p in base.split(b"&") if not p.startswith(name.encode() + b"=")]
            + [f"{name}={quote(value, safe='')}".encode()]
        )
        parsed = fastpath.parse(query)
        got = ("refused",) if parsed is None else ("accepted", parsed[name])
        assert got == expected, (name, value)


def test_request_stats_count_each_minute_into_its_own_row() -> None:
    now = [datetime(2026, 3, 1, 10, 0, 5, tzinfo=UTC).timestamp()]
    stats = RequestStats(clock=lambda: now[0])
    stats.record("/v1/oee", "GET", 200, 3.0, cache_hit=False)
    stats.record("/v1/oee", "GET", 200, 5.0, cache_hit=True)
    now[0] += 60
    stats.record("/v1/oee", "GET", 503, 7.0, cache_hit=False)
    now[0] -= 120  # a clock set back counts into the minute it says
    stats.record("/v1/oee", "GET", 404, 1.0, cache_hit=False)
    rows = stats._rows
    by_minute = {minute.strftime("%H:%M"): row for (minute, _, _), row in rows.items()}
    assert set(by_minute) == {"09:59", "10:00", "10:01"}
    assert (by_minute["10:00"].requests, by_minute["10:00"].cache_hits) == (2, 1)
    assert by_minute["10:00"].total_ms == 8.0
    assert (by_minute["10:01"].requests, by_minute["10:01"].server_errors) == (1, 1)
    assert (by_minute["09:59"].requests, by_minute["09:59"].client_errors) == (1, 1)
    assert all(m.tzinfo is UTC for m, _, _ in rows)
    assert sum(sum(r.histogram) for r in rows.values()) == 4


def test_request_span_binds_the_trace_id_and_restores_what_was_bound() -> None:
    structlog.contextvars.clear_contextvars()
    with tracing.request_span("GET", "/v1/oee", {}) as (_, trace_id):
        assert structlog.contextvars.get_contextvars() == {"trace_id": trace_id}
    assert structlog.contextvars.get_contextvars() == {}
    structlog.contextvars.bind_contextvars(trace_id="outer", other="kept")
    try:
        with tracing.request_span("GET", "/v1/oee", {}) as (_, trace_id):
            assert structlog.contextvars.get_contextvars() == {
                "trace_id": trace_id,
                "other": "kept",
            }
        assert structlog.contextvars.get_contextvars() == {"trace_id": "outer", "other": "kept"}
    finally:
        structlog.contextvars.clear_contextvars()


def test_metric_children_are_the_labelled_ones() -> None:
    counter = Counter("overhead_test_total", "test", ["route"], registry=CollectorRegistry())
    metrics.child(counter, "/a").inc()
    metrics.child(counter, "/a").inc()
    metrics.child(counter, "/b").inc()
    assert metrics.child(counter, "/a") is counter.labels("/a")
    assert counter.labels("/a")._value.get() == 2
    assert counter.labels("/b")._value.get() == 1


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"planned_busy_s": 3600.0, "production_s": 3000.0, "ideal_produced_s": 2900.0,
         "ideal_good_s": 2800.0, "produced": 290, "good": 280},
        {"planned_busy_s": 10.0, "production_s": 0.0},
        {"planned_busy_s": 60.0, "production_s": 60.0, "produced": 7, "good": 5},
        {"planned_busy_s": 0.0, "production_s": 5.0, "ideal_produced_s": 9.0},
    ],
)  # fmt: skip
def test_ratios_of_a_series_are_the_models_ratios(values: dict[str, Any]) -> None:
    c = Components(**values)
    assert ratios_of(c) == ratios(c).as_dict()
