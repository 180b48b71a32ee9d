"""RFC 9457 problem details: the one error shape of the HTTP API.

`Problem` is the exception routes and dependencies raise; `install(app)` turns it, FastAPI's
`HTTPException`, request validation errors, an unreachable database (503 with Retry-After)
and any other exception into `application/problem+json`. Validation problems list each
offending parameter by name and place (`invalid_parameter` makes one for a route's own
checks); internal errors carry only the request's trace id, never a stack trace, SQL or a
path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import psycopg
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "/problems/"
# What a caller is told to wait while the database is unreachable: the pool tries a new
# connection on the next request, so a short wait is enough once the server is back.
DATABASE_RETRY_AFTER_S = 5

log = structlog.get_logger("cloud_api.problems")


class Problem(Exception):
    """An error answered as problem+json; `slug` names its type (`/problems/<slug>`)."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug
        self.title = title or _phrase(status)
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def invalid_parameter(name: str, reason: str, *, place: str = "query") -> Problem:
    """A 422 naming one bad parameter, shaped like FastAPI's validation problems (below)."""
    return Problem(
        422,
        f"`{name}`: {reason}",
        slug="invalid-parameters",
        title="Invalid request parameters",
        extra={"invalid_params": [{"name": name, "in": place, "reason": reason}]},
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_body(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    instance: str | None = None,
    trace_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": f"{TYPE_BASE}{slug}" if slug else "about:blank",
        "title": title or _phrase(status),
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    if trace_id:
        body["trace_id"] = trace_id
    body.update(extra or {})
    return body


def problem_response(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    instance: str | None = None,
    trace_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    body = problem_body(
        status,
        detail,
        slug=slug,
        title=title,
        instance=instance,
        trace_id=trace_id,
        extra=extra,
    )
    return Response(
        json.dumps(body, separators=(",", ":")).encode(),
        status_code=status,
        media_type=MEDIA_TYPE,
        headers=dict(headers or {}),
    )


def database_unavailable(instance: str | None, trace_id: str | None) -> Response:
    """503 for a request that met an unreachable database (no connection within the pool's
    checkout timeout, or the connection failed): retryable, unlike a 500."""
    return problem_response(
        503,
        "the database is unavailable; retry after the time in Retry-After",
        slug="database-unavailable",
        instance=instance,
        trace_id=trace_id,
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


def _trace_id(request: Request) -> str | None:
    value = request.scope.get("state", {}).get("trace_id")
    return value if isinstance(value, str) else None


_PLACES = {"query", "path", "header", "cookie", "body"}


def validation_params(errors: Sequence[Any]) -> list[dict[str, str]]:
    """One entry per invalid parameter: its name, where it is, and why (without its value)."""
    out: list[dict[str, str]] = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        place = loc[0] if loc and loc[0] in _PLACES else "request"
        name = ".".join(loc[1:]) if place != "request" else ".".join(loc)
        out.append({"name": name or place, "in": place, "reason": str(err.get("msg", "invalid"))})
    return out


def install(app: FastAPI) -> None:
    """Register the problem+json handlers on `app`."""

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return problem_response(
            exc.status,
            exc.detail,
            slug=exc.slug,
            title=exc.title,
            instance=request.url.path,
            trace_id=_trace_id(request),
            headers=exc.headers,
            extra=exc.extra,
        )

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else _phrase(exc.status_code)
        return problem_response(
            exc.status_code,
            detail,
            instance=request.url.path,
            trace_id=_trace_id(request),
            headers=exc.headers,
        )

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        params = validation_params(exc.errors())
        names = ", ".join(f"{p['name']} ({p['in']})" for p in params)
        return problem_response(
            422,
            f"invalid parameter(s): {names}",
            slug="invalid-parameters",
            title="Invalid request parameters",
            instance=request.url.path,
            trace_id=_trace_id(request),
            extra={"invalid_params": params},
        )

    async def on_database(request: Request, exc: Exception) -> Response:
        return database_unavailable(request.url.path, _trace_id(request))

    app.add_exception_handler(Problem, on_problem)
    # PoolTimeout is an OperationalError too, as are a lost connection and a server that
    # refuses connections or shuts down.
    app.add_exception_handler(psycopg.OperationalError, on_database)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
