"""Prometheus metrics of the cloud side (ingest and HTTP)."""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)
# The children of labelled metrics that the API's busiest paths count into, by metric and
# label values: `labels()` validates, converts and looks its child up under a lock on every
# call (a few microseconds, several times per request).
_CHILDREN: dict[tuple[Any, tuple[str, ...]], Any] = {}


def child(metric: M, *labels: str) -> M:
    """`metric.labels(*labels)`, looked up once per label values (children of these metrics
    are never removed)."""
    key = (metric, labels)
    found: M | None = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


INGEST_BATCHES = Counter("ingest_batches_total", "Batches handled by outcome", ["outcome"])
INGEST_EVENTS = Counter("ingest_events_total", "Events stored")
INGEST_REJECTS = Counter("ingest_rejects_total", "Messages refused by reason", ["reason"])
INGEST_LAG = Histogram(
    "ingest_lag_seconds",
    "From batch creation at the edge to commit in PostgreSQL",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
HTTP_REQUESTS = Counter("http_requests_total", "HTTP requests", ["route", "method", "status"])
HTTP_LATENCY = Histogram("http_request_duration_seconds", "HTTP latency", ["route"])
DB_LATENCY = Histogram("db_query_duration_seconds", "Database query latency", ["query"])
SERIES_FAST_PATH = Counter(
    "api_series_fast_path_total",
    "Series requests answered without FastAPI's routing and validation (api/fastpath.py)",
    ["route"],
)
CACHE_REQUESTS = Counter("api_result_cache_total", "Result cache lookups by outcome", ["outcome"])
DB_POOL = Gauge("db_pool_connections", "API connection pool use", ["state"])
AUTH_FAILURES = Counter(
    "api_auth_failures_total", "Refused credentials by kind (token, api_key, none)", ["credential"]
)
AUTH_THROTTLED = Counter(
    "api_auth_throttled_total",
    "Requests refused unread: their client address failed to authenticate too often",
)
