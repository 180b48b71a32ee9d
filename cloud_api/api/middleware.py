"""The HTTP API's small ASGI middlewares, one job each; `create_app` stacks them.

From the outside in (the security ones are in cloud_api/access/security.py):

    TracingMiddleware          trace span and id (X-Trace-Id, problem details, logs)
    SecurityHeadersMiddleware  CSP, HSTS, nosniff and the like on every answer
    RequestStatsMiddleware     per-route statistics for `GET /v1/ops/performance`
    RequestLimitsMiddleware    repeated headers, body size, NUL in the URL: 400 / 413
    UnhandledErrorsMiddleware  problem+json (500, or 503 for a lost database) for what escapes
    AuthMiddleware             authentication, rate limits, the default permission
    TimingMiddleware           Prometheus counts and latencies, Server-Timing
    AnswersMiddleware          answers served again without running the route (cache.py)
    SeriesFastPath             plainly valid /v1/oee and /v1/counts without the router and
                               FastAPI's parameter validation (fastpath.py)

Such a plainly valid series request takes a shorter way still: `SeriesShortcut`
(fastpath.py) sits before the whole stack and does each layer's work with the layer's own
code (`traced`, `served_again`, `RequestStatsMiddleware.record`, `unhandled`, `timed`, ...),
with one `send` instead of a wrapper per layer; a request any layer would refuse before
authentication goes through the stack.

Each is a plain ASGI callable rather than `@app.middleware("http")`: Starlette's
BaseHTTPMiddleware runs the rest of the app in a separate task and pipes the response through
memory streams, which cost about a fifth of a cached request's time.

A layer outside another sees its final answer: the statistics and the span count the 413 that
replaced a route's answer to an oversized body and the 500 that replaced an exception.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import unquote

import psycopg
import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_api import metrics, tracing
from cloud_api.access import headers as request_headers
from cloud_api.api.ops_stats import RequestStats
from cloud_api.problems import Problem, database_unavailable, problem_response

log = structlog.get_logger("cloud_api.security")


def _state(scope: Scope) -> MutableMapping[str, Any]:
    state: MutableMapping[str, Any] = scope.setdefault("state", {})
    return state


def _trace_id(scope: Scope) -> str | None:
    value = _state(scope).get("trace_id")
    return value if isinstance(value, str) else None


class TracingMiddleware:
    """One server span per request (continuing a caller's `traceparent`) and its trace id:
    in the request's state for problem details and logs, and in the X-Trace-Id header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        headers = request_headers.of(scope).values
        status = 500
        with tracing.request_span(method, path, headers) as (span, trace_id):
            _state(scope)["trace_id"] = trace_id
            own = (b"x-trace-id", trace_id.encode("latin-1"))

            async def send_traced(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message = {**message, "headers": traced(message.get("headers", []), own)}
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            finally:
                span.set_attribute("http.response.status_code", status)


def traced(headers: Any, own: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """An answer's headers with the request's X-Trace-Id (`own`), unless it has one."""
    raw = list(headers)
    if all(k.lower() != b"x-trace-id" for k, _ in raw):
        raw.append(own)
    return raw


def served_again(status: int, headers: Any) -> bool:
    """Whether an answer came from a cache: a 304, or `Server-Timing: cache;desc="hit"`."""
    return status == 304 or any(
        k.lower() == b"server-timing" and b'desc="hit"' in v for k, v in headers
    )


class RequestStatsMiddleware:
    """Counts each request into `stats` by route, method, status, duration and cache outcome
    (a 304, or an answer with `Server-Timing: cache;desc="hit"`)."""

    def __init__(self, app: ASGIApp, stats: RequestStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        cache_hit = False

        async def send_counted(message: Message) -> None:
            nonlocal status, cache_hit
            if message["type"] == "http.response.start":
                status = message["status"]
                cache_hit = served_again(status, message.get("headers", []))
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.record(scope, status, started, cache_hit)

    def record(self, scope: Scope, status: int, started: float, cache_hit: bool) -> None:
        route = scope.get("route")
        self.stats.record(
            getattr(route, "path", "unmatched"),
            scope.get("method", "GET"),
            status,
            (time.perf_counter() - started) * 1000,
            cache_hit=cache_hit,
        )


class BodyTooLarge(Exception):
    pass


class RequestLimitsMiddleware:
    """Refuses what no route should see: a header the API reads sent twice (400, see
    cloud_api/access/headers.py), a body over `max_body_bytes` (413, by its Content-Length or
    while it is read), and NUL in the URL (400: PostgreSQL text cannot hold it)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        refusal = self.refusal(scope, path)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        box = {"started": False, "too_large": False}

        async def send_limited(message: Message) -> None:
            if box["too_large"]:
                # The body outgrew the limit while a route read it; whatever the route made
                # of that (FastAPI answers 400), the answer is 413.
                if message["type"] == "http.response.start" and not box["started"]:
                    box["started"] = True
                    await self._too_large(scope, path)(scope, receive, send)
                return
            if message["type"] == "http.response.start":
                box["started"] = True
            await send(message)

        try:
            await self.app(scope, self._limited(receive, box), send_limited)
        except BodyTooLarge:
            if box["started"]:
                raise
            await self._too_large(scope, path)(scope, receive, send_limited)

    def refusal(self, scope: Scope, path: str) -> ASGIApp | None:
        """The answer that refuses the request before any route sees it, or None."""
        parsed = request_headers.of(scope)
        duplicate = parsed.duplicate_of
        if duplicate is not None:
            return _refuse(
                scope,
                path,
                Problem(
                    400,
                    f"the {duplicate!r} header is repeated; send it once",
                    slug="duplicate-header",
                ),
            )
        length = parsed.values.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large(scope, path)
        raw_query = scope.get("query_string", b"").decode("latin-1")
        if "\x00" in path or "%00" in raw_query or "\x00" in unquote(raw_query):
            nul = Problem(400, "NUL characters are not allowed in the URL", slug="bad-url")
            return _refuse(scope, path, nul)
        return None

    def _too_large(self, scope: Scope, path: str) -> ASGIApp:
        return problem_response(
            413,
            f"the request body exceeds {self.max_body_bytes} bytes",
            slug="body-too-large",
            instance=path,
            trace_id=_trace_id(scope),
        )

    def _limited(self, receive: Receive, box: dict[str, bool]) -> Receive:
        limit = self.max_body_bytes
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    box["too_large"] = True
                    raise BodyTooLarge
            return message

        return wrapped


def _refuse(scope: Scope, path: str, problem: Problem) -> ASGIApp:
    return problem_response(
        problem.status,
        problem.detail,
        slug=problem.slug,
        instance=path,
        trace_id=_trace_id(scope),
        headers=problem.headers,
    )


class UnhandledErrorsMiddleware:
    """problem+json for an exception no route handled: 503 with Retry-After for a database
    that could not be reached (authentication reads API keys and revocations outside any
    route), 500 for anything else, logged; nothing when the answer had already begun."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_watched)
        except BodyTooLarge:
            raise
        except Exception as exc:
            answer = unhandled(scope, exc, started)
            await answer(scope, receive, send_watched)


def unhandled(scope: Scope, exc: Exception, started: bool) -> ASGIApp:
    """The answer to an exception no route handled (call it in the `except` block: it logs
    the traceback); re-raises it when the answer had already begun."""
    path: str = scope.get("path", "")
    if isinstance(exc, psycopg.OperationalError):
        if started:
            raise exc
        return database_unavailable(path, _trace_id(scope))
    log.exception("unhandled error in a request", path=path[:200], method=scope.get("method"))
    if started:
        raise exc
    return problem_response(
        500,
        "the server failed to answer this request; quote the trace id to support",
        slug="internal-error",
        instance=path,
        trace_id=_trace_id(scope),
    )


class TimingMiddleware:
    """Request counts and latencies by route for Prometheus, and the `app` part of the
    Server-Timing header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = timed(scope, message, started)
            await send(message)

        await self.app(scope, receive, timed_send)


def timed(scope: Scope, message: Message, started: float) -> Message:
    """The start of an answer counted and timed (Prometheus) and its Server-Timing header
    with the `app` part first."""
    elapsed = time.perf_counter() - started
    # The router has put the matched route into the (shared) scope by now.
    path = getattr(scope.get("route"), "path", "unmatched")
    status = message["status"]
    metrics.child(metrics.HTTP_REQUESTS, path, scope["method"], str(status)).inc()
    metrics.child(metrics.HTTP_LATENCY, path).observe(elapsed)
    # Routes may already have added their own parts (db time, cache outcome).
    own = f"app;dur={elapsed * 1000:.1f}".encode()
    headers = []
    for name, value in message.get("headers", []):
        if name.lower() == b"server-timing":
            own = own + b", " + value
        else:
            headers.append((name, value))
    headers.append((b"server-timing", own))
    return {**message, "headers": headers}
