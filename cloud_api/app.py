"""The HTTP API (FastAPI): OEE and its components, computed from sums, and health."""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_api import metrics, security
from cloud_api.alerts import routes as alert_routes
from cloud_api.answers import Answers, AnswersMiddleware
from cloud_api.config import CloudSettings
from cloud_api.dashboard import install_dashboard
from cloud_api.db import make_pool, with_retry
from cloud_api.marks import DataMarks
from cloud_api.routes import install_routes
from cloud_api.routes.common import window
from oee.components import COMPONENT_FIELDS, Components

SUMS = sql.SQL(", ").join(
    sql.SQL("COALESCE(sum({c}), 0) AS {c}").format(c=sql.Identifier(c)) for c in COMPONENT_FIELDS
)


def _broker_reachable(host: str, port: int) -> None:
    """Raises OSError unless the MQTT broker accepts a TCP connection within a second."""
    with socket.create_connection((host, port), timeout=1.0):
        pass


def oee_payload(c: Components) -> dict[str, Any]:
    r = c.ratios()
    return {
        "availability": r.availability,
        "performance": r.performance,
        "quality": r.quality,
        "oee": r.oee,
        "components": c.model_dump(),
    }


class TimingMiddleware:
    """Request counts and latencies by route for Prometheus, and the `app` part of the
    Server-Timing header.

    A plain ASGI middleware rather than `@app.middleware("http")`: Starlette's
    BaseHTTPMiddleware runs the rest of the app in a separate task and pipes the response
    through memory streams, which cost about a fifth of a cached request's time.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed = time.perf_counter() - started
                # The router has put the matched route into the (shared) scope by now.
                path = getattr(scope.get("route"), "path", "unmatched")
                status = message["status"]
                metrics.HTTP_REQUESTS.labels(path, scope["method"], str(status)).inc()
                metrics.HTTP_LATENCY.labels(path).observe(elapsed)
                # Routes may already have added their own parts (db time, cache outcome).
                own = f"app;dur={elapsed * 1000:.1f}".encode()
                headers = []
                for name, value in message.get("headers", []):
                    if name.lower() == b"server-timing":
                        own = own + b", " + value
                    else:
                        headers.append((name, value))
                headers.append((b"server-timing", own))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)


def create_app(settings: CloudSettings, pool: ConnectionPool | None = None) -> FastAPI:
    owns_pool = pool is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if app.state.pool is None:
            app.state.pool = await run_in_threadpool(
                functools.partial(
                    make_pool,
                    settings.database,
                    name="api",
                    prepare=True,
                    timeout=settings.database.checkout_timeout_seconds,
                )
            )
        # Until it listens (and whenever it does not), routes read watermarks from the database.
        app.state.data_marks.start()
        try:
            yield
        finally:
            await run_in_threadpool(app.state.data_marks.stop)
            if owns_pool:
                app.state.pool.close()

    app = FastAPI(
        title="Factory edge gateway cloud API",
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's own /docs and /redoc load scripts from a CDN; /docs is served from the
        # package instead (cloud_api/dashboard.py).
        docs_url=None,
        redoc_url=None,
        # Request spans come from the security middleware (cloud_api/tracing.py), which also
        # puts the trace id into logs and problem details; FastAPI's own would be a second
        # span per request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.pool = pool
    app.state.data_marks = DataMarks(
        settings.database.listen_url or settings.database.require_url()
    )
    app.state.answers = Answers(app.state.data_marks)
    install_routes(app)
    app.state.alert_receivers = frozenset(settings.alerts.receivers)
    app.include_router(alert_routes.router)
    install_dashboard(app)

    # Inner to the timing middleware, so answers served again are timed and counted too.
    app.add_middleware(AnswersMiddleware, answers=app.state.answers)
    app.add_middleware(TimingMiddleware)

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
            await run_in_threadpool(_broker_reachable, settings.mqtt.host, settings.mqtt.port)
        except OSError:
            return JSONResponse({"status": "broker unavailable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/equipment/{equipment_id}/oee")
    async def equipment_oee(
        equipment_id: str,
        from_: Annotated[datetime, Query(alias="from", description="inclusive, ISO 8601")],
        to: Annotated[datetime, Query(description="exclusive, ISO 8601")],
        site: Annotated[str | None, Query(description="site id, if ids repeat")] = None,
    ) -> dict[str, Any]:
        start, end = window(from_, to)
        stmt = sql.SQL(
            "SELECT count(*) AS buckets, array_agg(DISTINCT site_id) AS sites, {sums} "
            "FROM rollups.oee_1m WHERE equipment_id = %(eq)s AND bucket >= %(start)s "
            "AND bucket < %(end)s AND (%(site)s::text IS NULL OR site_id = %(site)s)"
        ).format(sums=SUMS)
        rows = await run_in_threadpool(
            query, stmt, {"eq": equipment_id, "start": start, "end": end, "site": site}
        )
        row = rows[0]
        if not row["buckets"]:
            known = await run_in_threadpool(
                query,
                sql.SQL(
                    "SELECT 1 AS ok FROM registry.equipment WHERE equipment_id = %(eq)s "
                    "AND (%(site)s::text IS NULL OR site_id = %(site)s) LIMIT 1"
                ),
                {"eq": equipment_id, "site": site},
            )
            if not known:
                raise HTTPException(404, f"no equipment {equipment_id!r}")
        sites = [s for s in (row["sites"] or []) if s]
        if len(sites) > 1:
            raise HTTPException(409, "equipment id exists at several sites: pass ?site=")
        return {
            "equipment": equipment_id,
            "site": sites[0] if sites else site,
            "from": start.isoformat(),
            "to": end.isoformat(),
            **oee_payload(Components.from_mapping(row)),
        }

    # Last: the security perimeter wraps every route and middleware registered above.
    security.install(app, settings)
    return app
