"""Request statistics per route and minute: collected in process, added into
monitoring.request_stats, and served to admins at `GET /v1/ops/performance`.

Durations are counted in log-spaced buckets (each bound 10 % above the previous, 0.1 ms to
about a minute), so percentiles of any window and any number of replicas come from summed
counts; a reported percentile is the upper bound of its bucket (at most 10 % above the true
value). Errors are 5xx answers; 4xx answers are counted apart as client errors. A cache hit is
a 304 (the client's copy was still valid) or an answer served from the result cache
(`Server-Timing: cache;desc="hit"`), counted against the GET requests.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from psycopg_pool import ConnectionPool

BOUNDS_MS: tuple[float, ...] = tuple(0.1 * 1.1**i for i in range(140))
BUCKETS = len(BOUNDS_MS) + 1  # the last one counts everything slower than the last bound


@dataclass
class _Minute:
    requests: int = 0
    server_errors: int = 0
    client_errors: int = 0
    cacheable: int = 0
    cache_hits: int = 0
    total_ms: float = 0.0
    histogram: list[int] = field(default_factory=lambda: [0] * BUCKETS)


Key = tuple[datetime, str, str]

UPSERT = """
INSERT INTO monitoring.request_stats AS s (minute, route, method, requests, server_errors,
    client_errors, cacheable, cache_hits, total_ms, histogram)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (minute, route, method) DO UPDATE SET
    requests = s.requests + excluded.requests,
    server_errors = s.server_errors + excluded.server_errors,
    client_errors = s.client_errors + excluded.client_errors,
    cacheable = s.cacheable + excluded.cacheable,
    cache_hits = s.cache_hits + excluded.cache_hits,
    total_ms = s.total_ms + excluded.total_ms,
    histogram = ARRAY(
        SELECT coalesce(a, 0) + coalesce(b, 0)
        FROM unnest(s.histogram, excluded.histogram) WITH ORDINALITY AS u(a, b, i)
        ORDER BY i)
"""


class RequestStats:
    """Thread-safe per-minute counters; `flush(pool)` adds them into the database."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._rows: dict[Key, _Minute] = {}
        self._lock = threading.Lock()
        # The last minute counted into, by its start in seconds since the epoch.
        self._minute: tuple[float, datetime] = (-1.0, datetime.min.replace(tzinfo=UTC))

    def record(
        self, route: str, method: str, status: int, duration_ms: float, *, cache_hit: bool
    ) -> None:
        start = self.clock() // 60 * 60
        known, minute = self._minute
        if start != known:
            minute = datetime.fromtimestamp(start, UTC)
            self._minute = (start, minute)
        key = (minute, route, method)
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = _Minute()
            row.requests += 1
            row.server_errors += status >= 500
            row.client_errors += 400 <= status < 500
            if method == "GET":
                row.cacheable += 1
                row.cache_hits += cache_hit
            row.total_ms += duration_ms
            row.histogram[bisect.bisect_left(BOUNDS_MS, duration_ms)] += 1

    def flush(self, pool: ConnectionPool) -> int:
        """Add the collected minutes to monitoring.request_stats; returns rows written."""
        with self._lock:
            rows, self._rows = self._rows, {}
        if not rows:
            return 0
        try:
            with pool.connection() as conn, conn.cursor() as cur:
                cur.executemany(
                    UPSERT,
                    [
                        (m, route, method, r.requests, r.server_errors, r.client_errors,
                         r.cacheable, r.cache_hits, r.total_ms, r.histogram)
                        for (m, route, method), r in sorted(rows.items())
                    ],
                )  # fmt: skip
        except BaseException:
            self._merge_back(rows)
            raise
        return len(rows)

    def _merge_back(self, rows: dict[Key, _Minute]) -> None:
        with self._lock:
            for key, old in rows.items():
                row = self._rows.setdefault(key, _Minute())
                row.requests += old.requests
                row.server_errors += old.server_errors
                row.client_errors += old.client_errors
                row.cacheable += old.cacheable
                row.cache_hits += old.cache_hits
                row.total_ms += old.total_ms
                row.histogram = [a + b for a, b in zip(row.histogram, old.histogram, strict=True)]


def percentile(histogram: list[int], q: float) -> float | None:
    total = sum(histogram)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(histogram):
        seen += count
        if seen >= rank and count:
            return round(BOUNDS_MS[min(i, len(BOUNDS_MS) - 1)], 3)
    return round(BOUNDS_MS[-1], 3)


def _summary(
    counts: list[int],
    total_ms: float,
    histogram: list[int],
) -> dict[str, Any]:
    requests, server_errors, client_errors, cacheable, cache_hits = counts
    return {
        "requests": requests,
        "error_rate": server_errors / requests if requests else None,
        "client_error_rate": client_errors / requests if requests else None,
        "cache_hit_ratio": cache_hits / cacheable if cacheable else None,
        "mean_ms": round(total_ms / requests, 3) if requests else None,
        "p50_ms": percentile(histogram, 0.50),
        "p95_ms": percentile(histogram, 0.95),
        "p99_ms": percentile(histogram, 0.99),
    }


def performance(
    pool: ConnectionPool, start: datetime, end: datetime
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per route and method over [start, end), and over all routes: counts, ratios and
    percentiles."""
    with pool.connection() as conn:
        totals = conn.execute(
            "SELECT route, method, sum(requests), sum(server_errors), sum(client_errors), "
            "sum(cacheable), sum(cache_hits), sum(total_ms) FROM monitoring.request_stats "
            "WHERE minute >= %s AND minute < %s GROUP BY 1, 2 ORDER BY 1, 2",
            (start, end),
        ).fetchall()
        buckets = conn.execute(
            "SELECT route, method, u.i, sum(u.n) FROM monitoring.request_stats, "
            "unnest(histogram) WITH ORDINALITY AS u(n, i) "
            "WHERE minute >= %s AND minute < %s GROUP BY 1, 2, 3",
            (start, end),
        ).fetchall()
    hist: dict[tuple[str, str], list[int]] = {}
    for route, method, i, n in buckets:
        hist.setdefault((route, method), [0] * BUCKETS)[int(i) - 1] += int(n)
    routes = []
    overall = [0, 0, 0, 0, 0, 0.0]
    overall_hist = [0] * BUCKETS
    for route, method, *sums in totals:
        counts = [int(v) for v in sums[:5]]
        total_ms = float(sums[5])
        h = hist.get((route, method), [0] * BUCKETS)
        routes.append({"route": route, "method": method, **_summary(counts, total_ms, h)})
        for i, v in enumerate(counts):
            overall[i] += v
        overall[5] += total_ms
        overall_hist = [a + b for a, b in zip(overall_hist, h, strict=True)]
    o = [int(v) for v in overall[:5]]
    return routes, _summary(o, float(overall[5]), overall_hist)


def router(require_ops: Callable[..., Any]) -> APIRouter:
    """`GET /v1/ops/performance` (admins): the last `minutes` of request statistics."""
    api = APIRouter(prefix="/v1/ops", tags=["ops"])

    @api.get(
        "/performance",
        summary="Request statistics per route: p50/p95/p99, error rate, cache hit ratio",
        dependencies=[Depends(require_ops)],
    )
    async def ops_performance(
        request: Request,
        minutes: Annotated[int, Query(ge=1, le=10080, description="window, minutes")] = 60,
    ) -> dict[str, Any]:
        pool = request.app.state.pool
        stats: RequestStats = request.app.state.request_stats
        # Include what this replica collected so far.
        await run_in_threadpool(stats.flush, pool)
        end = datetime.fromtimestamp(stats.clock() // 60 * 60, UTC) + timedelta(minutes=1)
        start = end - timedelta(minutes=minutes)
        routes, total = await run_in_threadpool(performance, pool, start, end)
        return {"from": start.isoformat(), "to": end.isoformat(), "total": total, "routes": routes}

    return api
