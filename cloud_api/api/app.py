"""The HTTP API (FastAPI) put together: `create_app` is the one place that wires the routers,
the middlewares and the lifespan; health, readiness and metrics are served here too."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import psycopg
import structlog
from fastapi import FastAPI, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from starlette.types import ASGIApp

from cloud_api import problems, tracing
from cloud_api.access.security import (
    AuthMiddleware,
    SecurityHeadersMiddleware,
    SecurityState,
    add_security_schemes,
    require,
    scoped_pool,
)
from cloud_api.alerts.routes import router as alerts_router
from cloud_api.api import ops_stats
from cloud_api.api.cache import Answers, AnswersMiddleware, DataMarks
from cloud_api.api.dashboard import install_dashboard
from cloud_api.api.fastpath import SeriesFastPath, SeriesShortcut
from cloud_api.api.middleware import (
    RequestLimitsMiddleware,
    RequestStatsMiddleware,
    TimingMiddleware,
    TracingMiddleware,
    UnhandledErrorsMiddleware,
)
from cloud_api.api.ops_stats import RequestStats
from cloud_api.api.routes import analytics, install_routes
from cloud_api.api.routes.annotations import router as annotations_router
from cloud_api.api.routes.common import DbThreads
from cloud_api.api.routes.targets import router as targets_router
from cloud_api.config import CloudSettings
from cloud_api.db import make_pool, with_retry
from cloud_api.fleetconfig.routes import router as fleetconfig_router

log = structlog.get_logger("cloud_api.security")


def _broker_reachable(addresses: list[tuple[str, int]]) -> None:
    """Raises OSError unless the MQTT broker (one node of it) accepts a TCP connection within
    a second."""
    for host, port in addresses[:-1]:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            continue
    with socket.create_connection(addresses[-1], timeout=1.0):
        pass


def create_app(settings: CloudSettings, pool: ConnectionPool | None = None) -> FastAPI:
    """The API: routes, middlewares from the outside in (see cloud_api/api/middleware.py),
    and one lifespan that opens the pool, the data-change listener and the statistics
    flush, and closes them in the reverse order."""
    tracing.configure(settings.tracing)
    owns_pool = pool is None
    security = SecurityState(settings, lambda: app.state.pool)
    request_stats = RequestStats()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if app.state.pool is None:
                app.state.pool = await run_in_threadpool(
                    functools.partial(
                        make_pool,
                        settings.database,
                        name="api",
                        prepare=True,
                        timeout=settings.database.checkout_timeout_seconds,
                        # Every checkout goes through SitePool, which opens and closes
                        # the transaction itself.
                        autocommit=True,
                    )
                )
            if owns_pool:
                stack.callback(app.state.pool.close)
            # Closed before the pool: the database work still running ends first.
            stack.callback(app.state.db_threads.close)
            # Every checkout runs as the API's role with the caller's sites.
            app.state.pool = scoped_pool(app.state.pool, settings.security)
            # Until it listens (and whenever it does not), routes read watermarks from the
            # database.
            app.state.data_marks.start()
            stack.push_async_callback(run_in_threadpool, app.state.data_marks.stop)
            stack.push_async_callback(security.limiter.close)
            flusher = asyncio.create_task(_flush_loop(app, security, request_stats))
            stack.push_async_callback(_stop_flushing, app, flusher, request_stats)
            yield

    app = FastAPI(
        title="Factory edge gateway cloud API",
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's own /docs and /redoc load scripts from a CDN; /docs is served from the
        # package instead (cloud_api/api/dashboard.py).
        docs_url=None,
        redoc_url=None,
        # Request spans come from TracingMiddleware (cloud_api/tracing.py), which also puts
        # the trace id into logs and problem details; FastAPI's own would be a second span
        # per request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.pool = scoped_pool(pool, settings.security) if pool is not None else None
    # `http.db_threads`, never more than the pool has connections (routes/common.py).
    app.state.db_threads = DbThreads(
        min(
            settings.http.db_threads,
            pool.max_size if pool is not None else settings.database.pool_max,
        )
    )
    app.state.security = security
    app.state.request_stats = request_stats
    app.state.data_marks = DataMarks(
        settings.database.listen_url or settings.database.require_url()
    )
    app.state.answers = Answers(app.state.data_marks)
    # /v1/downtime/unexplained lists stops with none of these reasons as well as none at all.
    app.state.unknown_reasons = frozenset(settings.unknown_reasons)

    install_routes(app)
    # Configuration pushes publish with the app's MQTT settings and keys.
    app.state.fleetconfig_settings = settings
    app.include_router(fleetconfig_router)
    # Rule writes check receiver names against the alerts section of the settings.
    app.state.alert_receivers = frozenset(settings.alerts.receivers)
    app.include_router(alerts_router)
    install_dashboard(app)
    _health_routes(app, settings)
    problems.install(app)
    app.include_router(ops_stats.router(require("ops")))
    app.include_router(annotations_router)
    app.include_router(targets_router)
    _document_security(app)

    # add_middleware puts each one outside those added before it: innermost first.
    # Plainly valid /v1/oee and /v1/counts requests skip the router and FastAPI's parameter
    # validation (fastpath.py); everything else reaches them as before.
    app.add_middleware(SeriesFastPath, routes=analytics.router.routes)
    # Inner to the timing middleware, so answers served again are timed and counted too.
    app.add_middleware(AnswersMiddleware, answers=app.state.answers)
    app.add_middleware(TimingMiddleware)
    app.add_middleware(AuthMiddleware, state=security)
    app.add_middleware(UnhandledErrorsMiddleware)
    app.add_middleware(RequestLimitsMiddleware, max_body_bytes=settings.security.max_body_bytes)
    app.add_middleware(RequestStatsMiddleware, stats=request_stats)
    app.add_middleware(SecurityHeadersMiddleware, settings=settings.security)
    app.add_middleware(TracingMiddleware)
    # Outermost: a preflight carries no credentials, so it is answered before authentication.
    if settings.security.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.security.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "If-None-Match"],
            expose_headers=["ETag", "RateLimit", "RateLimit-Policy", "Retry-After", "X-Trace-Id"],
            max_age=600,
        )
    _install_shortcut(app, settings, security, request_stats)
    return app


def _install_shortcut(
    app: FastAPI, settings: CloudSettings, security: SecurityState, stats: RequestStats
) -> None:
    """Plainly valid series requests take the short way before the whole middleware stack
    (fastpath.SeriesShortcut), with the same layers' work done by their own code."""
    build = app.build_middleware_stack

    def build_middleware_stack() -> ASGIApp:
        stack = build()
        return SeriesShortcut(
            stack,
            owner=app,
            fast=SeriesFastPath(stack, analytics.router.routes),
            auth=AuthMiddleware(stack, security),
            security_headers=SecurityHeadersMiddleware(stack, settings.security),
            limits=RequestLimitsMiddleware(stack, settings.security.max_body_bytes),
            stats=RequestStatsMiddleware(stack, stats),
            answers=app.state.answers,
            cors=bool(settings.security.cors_origins),
        )

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]


def _health_routes(app: FastAPI, settings: CloudSettings) -> None:
    """`/healthz` (the process answers), `/readyz` (database and broker reachable) and the
    Prometheus `/metrics`: public, outside `/v1`."""

    def query(stmt: sql.Composable, params: dict[str, Any]) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            with app.state.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                cur.execute(stmt, params)
                rows: list[dict[str, Any]] = cur.fetchall()
                return rows

        return with_retry(run, attempts=3)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            await run_in_threadpool(query, sql.SQL("SELECT 1 AS ok"), {})
        except Exception:
            return JSONResponse({"status": "database unavailable"}, status_code=503)
        try:
            await run_in_threadpool(_broker_reachable, settings.mqtt.addresses)
        except OSError:
            return JSONResponse({"status": "broker unavailable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _document_security(app: FastAPI) -> None:
    """The OpenAPI document declares the credentials every `/v1` operation needs."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_security_schemes(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _flush_once(app: FastAPI, stats: RequestStats) -> None:
    try:
        stats.flush(app.state.pool)
    except psycopg.Error as exc:
        log.warning("request statistics not stored", error=type(exc).__name__)


async def _flush_loop(
    app: FastAPI, security: SecurityState, stats: RequestStats, every_s: float = 15.0
) -> None:
    while True:
        await asyncio.sleep(every_s)
        # On the event loop, where refusals are noted: the count of a quiet address is
        # logged even when no further request comes.
        security.failures.log.flush_due()
        await asyncio.to_thread(_flush_once, app, stats)


async def _stop_flushing(app: FastAPI, flusher: asyncio.Task[None], stats: RequestStats) -> None:
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flusher
    await asyncio.to_thread(_flush_once, app, stats)
