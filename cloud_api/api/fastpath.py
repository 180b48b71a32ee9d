"""`GET /v1/oee` and `GET /v1/counts` without FastAPI's routing and parameter validation
when the parameters are plainly valid: the busiest read routes, asked for by dashboards
many times a second.

Starlette's router tries each route's pattern in turn (some sixty before the series
routes), and FastAPI's dependency solving validates the ten query parameters through its
generic machinery (about a tenth of an uncached answer's CPU). Here the query string is
split as Starlette splits it and each parameter is validated by pydantic with the same type
and constraints the route declares, then the route's own function runs (`series_response`,
the one the FastAPI route calls) and an exception it raises is answered by the app's exception
handlers, as FastAPI's exception middleware would.

Anything out of the ordinary goes the usual way, so every error keeps its usual answer: an
unknown or repeated parameter, an empty value, a value that fails validation, another
method, a root path. The answer, its headers and the route recorded for statistics and
metrics (`scope["route"]`) are the same either way.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple, cast, get_args
from urllib.parse import parse_qsl

from pydantic import Field, TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_api import metrics, tracing
from cloud_api.access import headers as request_headers
from cloud_api.access.security import DB_SCOPE, AuthMiddleware, SecurityHeadersMiddleware
from cloud_api.api.cache import Answers, serve_again
from cloud_api.api.middleware import (
    RequestLimitsMiddleware,
    RequestStatsMiddleware,
    served_again,
    timed,
    traced,
    unhandled,
)
from cloud_api.api.queries import MAX_POINTS, GroupBy, Interval, ScopeKind
from cloud_api.api.routes.analytics import series_response
from cloud_api.api.routes.common import MAX_ZONE_NAME

# The declared type and constraints of each query parameter of the two routes
# (cloud_api/api/routes/analytics.py: Scope, Ident, From, To, Site, IntervalQ, MaxPoints, Tz,
# GroupQ), with their defaults.
_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "scope": TypeAdapter(ScopeKind),
    "id": TypeAdapter(Annotated[str, Field(min_length=1, max_length=200)]),
    "from": TypeAdapter(datetime),
    "to": TypeAdapter(datetime),
    "site": TypeAdapter(str),
    "interval": TypeAdapter(Interval),
    "max_points": TypeAdapter(Annotated[int, Field(ge=1, le=MAX_POINTS)]),
    "tz": TypeAdapter(Annotated[str, Field(max_length=MAX_ZONE_NAME)]),
    "group_by": TypeAdapter(GroupBy),
}
# Parameters whose validation is a set membership or a length (the same checks as their
# adapters above, which a str input passes unchanged or fails): what a Literal of strings
# allows, and (min, max) characters of a plain str.
_CHOICES: dict[str, frozenset[str]] = {
    "scope": frozenset(get_args(ScopeKind)),
    "interval": frozenset(get_args(Interval)),
    "group_by": frozenset(get_args(GroupBy)),
}
_LENGTHS: dict[str, tuple[int, int]] = {
    "id": (1, 200),
    "site": (0, sys.maxsize),
    "tz": (0, MAX_ZONE_NAME),
}
_REQUIRED = frozenset(("scope", "id", "from", "to"))
_DEFAULTS: dict[str, Any] = {
    "site": None,
    "interval": None,
    "max_points": 1000,
    "tz": "UTC",
    "group_by": "none",
}
_PATHS: dict[str, Literal["oee", "counts"]] = {"/v1/oee": "oee", "/v1/counts": "counts"}


def parse(query_string: bytes) -> dict[str, Any] | None:
    """The validated parameters, or None when the request should go the usual way."""
    # As Starlette's QueryParams splits the query string.
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    values: dict[str, Any] = {}
    for name, raw in pairs:
        adapter = _ADAPTERS.get(name)
        if adapter is None or name in values or not raw:
            return None
        choices = _CHOICES.get(name)
        if choices is not None:
            if raw not in choices:
                return None
            values[name] = raw
            continue
        lengths = _LENGTHS.get(name)
        if lengths is not None:
            if not lengths[0] <= len(raw) <= lengths[1]:
                return None
            values[name] = raw
            continue
        try:
            values[name] = adapter.validate_python(raw)
        except ValidationError:
            return None
    if not values.keys() >= _REQUIRED:
        return None
    for name, default in _DEFAULTS.items():
        values.setdefault(name, default)
    return values


class SeriesFastPath:
    """Serves plainly valid GET requests of /v1/oee and /v1/counts (see the module)."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        """`routes`: the routes of the router that declares the two (analytics.router),
        included into the app without a further prefix."""
        self.app = app
        self._routes: dict[str, BaseRoute] = {}
        for route in routes:
            path = getattr(route, "path", None)
            if path in _PATHS and "GET" in (getattr(route, "methods", None) or ()):
                self._routes.setdefault(path, route)
        if self._routes.keys() != _PATHS.keys():
            raise ValueError("the routes of /v1/oee and /v1/counts are not among `routes`")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        taken = self.take(scope)
        if taken is None:
            await self.app(scope, receive, send)
            return
        await self.serve(scope, receive, send, taken)

    def take(self, scope: Scope) -> Taken | None:
        """What the short way needs to answer the request, or None for the usual way."""
        fields = _PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        route = self._routes.get(scope["path"]) if fields is not None else None
        values = (
            parse(scope.get("query_string", b""))
            if route is not None and scope["method"] == "GET" and not scope.get("root_path")
            else None
        )
        if route is None or fields is None or values is None:
            return None
        return Taken(route, fields, values)

    async def serve(self, scope: Scope, receive: Receive, send: Send, taken: Taken) -> None:
        route, fields, values = taken
        metrics.child(metrics.SERIES_FAST_PATH, fields).inc()
        # What the router puts into the scope of the route it matched.
        scope["route"] = route
        scope["endpoint"] = getattr(route, "endpoint", None)
        scope["path_params"] = {}
        request = Request(scope, receive, send)
        try:
            response = await series_response(
                request,
                fields,
                values["scope"],
                values["id"],
                values["site"],
                values["from"],
                values["to"],
                values["interval"],
                values["max_points"],
                values["tz"],
                values["group_by"],
                fields,
            )
        except Exception as exc:
            handler = _handler(scope, exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)


class Taken(NamedTuple):
    route: BaseRoute
    fields: Literal["oee", "counts"]
    values: dict[str, Any]


class SeriesShortcut:
    """The short way of a plainly valid series request, taken before the whole middleware
    stack (FastAPI's own layers and the eight of `create_app`): each layer's work done in
    the stack's order by the layer's own code, with one `send` instead of a wrapper per layer.

    Per uncached answer the layers' wrappers, each copying the answer's start and its
    headers, and FastAPI's outer layers cost more of the API's CPU than authentication and
    the route's work on the event loop together. What is done here, from the outside in:
    the trace span and id (TracingMiddleware), the request's statistics
    (RequestStatsMiddleware), the security and rate-limit headers (SecurityHeadersMiddleware),
    the answer to an exception nothing handled (UnhandledErrorsMiddleware), authentication,
    rate limit and permission (AuthMiddleware), the Prometheus counts and Server-Timing
    (TimingMiddleware), a remembered answer (AnswersMiddleware), the route (SeriesFastPath).

    A request the stack would refuse before authentication (RequestLimitsMiddleware: a
    repeated header, a body too large, NUL in the URL), one with an Origin header while CORS
    is configured, and any that SeriesFastPath would not take go the usual way, through the
    whole stack.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        owner: ASGIApp,
        fast: SeriesFastPath,
        auth: AuthMiddleware,
        security_headers: SecurityHeadersMiddleware,
        limits: RequestLimitsMiddleware,
        stats: RequestStatsMiddleware,
        answers: Answers,
        cors: bool,
    ) -> None:
        """`app`: the whole stack; `owner`: the app whose stack it is (`scope["app"]`)."""
        self.app = app
        self.owner = owner
        self.fast = fast
        self.auth = auth
        self.security_headers = security_headers
        self.limits = limits
        self.stats = stats
        self.answers = answers
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        taken = self.fast.take(scope) if scope["type"] == "http" else None
        path: str = scope.get("path", "")
        if (
            taken is None
            or (self.cors and "origin" in request_headers.of(scope).values)
            or self.limits.refusal(scope, path) is not None
        ):
            await self.app(scope, receive, send)
            return
        # What Starlette's application puts into the scope.
        scope["app"] = self.owner
        method: str = scope["method"]
        headers = request_headers.of(scope).values
        status = 500
        with tracing.request_span(method, path, headers) as (span, trace_id):
            scope.setdefault("state", {})["trace_id"] = trace_id
            own = (b"x-trace-id", trace_id.encode("latin-1"))
            stats_started = time.perf_counter()
            cache_hit = False
            admitted: float | None = None
            answer_started = False

            async def send_all(message: Message) -> None:
                nonlocal status, cache_hit, answer_started
                if message["type"] == "http.response.start":
                    answer_started = True
                    # From the inside out, as the layers' wrappers would.
                    if admitted is not None:
                        message = timed(scope, message, admitted)
                    status = message["status"]
                    cache_hit = served_again(status, message.get("headers", []))
                    message = self.security_headers.secured(scope, path, message)
                    message = {**message, "headers": traced(message["headers"], own)}
                await send(message)

            try:
                try:
                    scope_token = DB_SCOPE.set("")
                    try:
                        refusal = await self.auth.admit(scope, path)
                        if refusal is not None:
                            await refusal(scope, receive, send_all)
                        else:
                            admitted = time.perf_counter()
                            remembered = self.answers.lookup(scope)
                            if remembered is not None:
                                await serve_again(scope, remembered, send_all)
                            else:
                                await self.fast.serve(scope, receive, send_all, taken)
                    finally:
                        DB_SCOPE.reset(scope_token)
                except Exception as exc:
                    await unhandled(scope, exc, answer_started)(scope, receive, send_all)
            finally:
                self.stats.record(scope, status, stats_started, cache_hit)
                span.set_attribute("http.response.status_code", status)


def _handler(scope: Scope, exc: Exception) -> Callable[[Request, Exception], Any] | None:
    """The app's handler of `exc` (by its class, the nearest first), as Starlette's
    exception middleware chooses it."""
    handlers = cast(dict[Any, Any], getattr(scope["app"], "exception_handlers", {}))
    for cls in type(exc).__mro__:
        if cls in handlers:
            return cast(Callable[[Request, Exception], Any], handlers[cls])
    return None
