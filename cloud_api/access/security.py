"""The HTTP API's security perimeter, installed on the app by `install(app, settings)`.

One ASGI middleware, outermost, wraps every request: the one parse of its headers (a repeated
header the API reads is refused, cloud_api/headers.py), trace span and id, body size limit,
authentication and rate limiting of every `/v1/...` path (health, readiness, metrics, OpenAPI
and the dashboard's static page stay public), the default permission (GET/HEAD need `read`,
any other method `write`), security headers, closed CORS unless origins are configured,
problem+json for anything that escapes a route, and request statistics.

The caller's scope reaches PostgreSQL too: `SitePool` wraps the app's pool so each checkout
is a transaction that runs as the API's database role with `app.sites` set to the caller's
sites, and the row-level security policies of 0010_security.sql filter every table with a
site_id column by it.

Routes read the caller with `CurrentPrincipal` (or `request.state.principal`; the visible
sites are also in `request.state.sites`) and ask for more than the default with
`Depends(require("pii"))` / `require("ops")`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from typing import Annotated, Any
from urllib.parse import unquote

import psycopg
import structlog
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from psycopg_pool import ConnectionPool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_api import tracing
from cloud_api.access import headers as request_headers
from cloud_api.access.auth import Authenticator, Permission, Principal
from cloud_api.access.pii import PiiKeyring
from cloud_api.access.ratelimit import FailureThrottle, RateLimiter
from cloud_api.api.ops_stats import RequestStats
from cloud_api.config import CloudSettings, RateTier, SecuritySettings
from cloud_api.problems import Problem, database_unavailable, problem_response

log = structlog.get_logger("cloud_api.security")

_SCOPE: ContextVar[str] = ContextVar("db_site_scope", default="")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PROTECTED_PREFIX = "/v1/"
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# The dashboard is served from this origin with its scripts and styles as files (no inline
# code), so 'self' is enough; API calls go to the same origin.
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; manifest-src 'self'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'; object-src 'none'"
)


class ScopeLost(RuntimeError):
    """A block ended the transaction its checkout opened, so what ran after it ran unscoped."""


class SitePool:
    """The app's connection pool, scoped: each checkout is one transaction that runs as `role`
    with the caller's sites, and nothing of the caller outlives it.

    The statement that opens the transaction sets both, local to it (`BEGIN; SELECT
    set_config(..., true), ...` in one round trip); the checkout ends with COMMIT (ROLLBACK
    on an error). No setting is left on the server connection, so the next transaction on it
    may be anyone's: that is what makes the scope safe behind a transaction-mode pooler
    (PgBouncer hands each transaction the next free server connection) and what spares a
    reset when the connection goes back to the pool. Reads run inside that transaction too
    (under READ COMMITTED each statement still takes its own snapshot).

    A block must not commit or roll back itself: what it ran afterwards ran as the login
    role without the caller's sites, so the checkout raises ScopeLost instead of letting the
    block's result out (deployed, the login role has no grants of its own, so such
    statements fail as well).
    """

    def __init__(self, pool: ConnectionPool, role: str) -> None:
        self.pool = pool
        self.role = role

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[psycopg.Connection[Any]]:
        begin = psycopg.sql.SQL(
            "BEGIN; SELECT set_config('role', {}, true), set_config('app.sites', {}, true)"
        ).format(psycopg.sql.Literal(self.role), psycopg.sql.Literal(_SCOPE.get()))
        with tracing.db_span(self.role), self.pool.connection(timeout) as conn:
            autocommit = conn.autocommit
            # The transaction is opened and closed here by hand: psycopg must not add its own.
            conn.autocommit = True
            try:
                conn.execute(begin, prepare=False)
                try:
                    yield conn
                except BaseException:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("ROLLBACK", prepare=False)
                    raise
                status = conn.info.transaction_status
                if status == psycopg.pq.TransactionStatus.IDLE:
                    raise ScopeLost("a scoped checkout committed or rolled back by itself")
                conn.execute(
                    "COMMIT" if status == psycopg.pq.TransactionStatus.INTRANS else "ROLLBACK",
                    prepare=False,
                )
            finally:
                if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                    conn.autocommit = autocommit

    def close(self) -> None:
        self.pool.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


def scoped_pool(pool: ConnectionPool | SitePool, settings: SecuritySettings) -> SitePool:
    if isinstance(pool, SitePool):
        return pool
    return SitePool(pool, settings.api_db_role)


@contextmanager
def database_scope(principal: Principal | None) -> Iterator[None]:
    """Run database work as `principal` outside a request (None: no site visible)."""
    token = _SCOPE.set(principal.db_scope if principal else "")
    try:
        yield
    finally:
        _SCOPE.reset(token)


# --- dependencies for routes ----------------------------------------------------------------


async def current_principal(request: Request) -> Principal:
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):
        raise Problem(401, "authentication is required", slug="unauthenticated")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require(permission: Permission) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that refuses (403) callers without `permission`."""

    async def check(principal: CurrentPrincipal) -> Principal:
        if not principal.can(permission):
            raise Problem(
                403,
                f"the role {principal.role!r} (or this key's scopes) lacks the "
                f"{permission!r} permission",
                slug="forbidden",
            )
        return principal

    return check


# --- the middleware -------------------------------------------------------------------------


class BodyTooLarge(Exception):
    pass


class SecurityState:
    """What the middleware needs, kept on `app.state.security` (tests adjust the clock)."""

    def __init__(self, app: FastAPI, settings: CloudSettings) -> None:
        self.settings = settings.security
        self.auth = Authenticator(settings.security, settings.keys_dir, lambda: app.state.pool)
        self.limiter = RateLimiter(
            redis_url=settings.security.redis_url, prefix=settings.security.redis_prefix
        )
        self.failures = FailureThrottle(self.limiter, settings.security.auth_failures)
        self.stats = RequestStats()
        self.keys_dir = settings.keys_dir
        self._pii: PiiKeyring | None = None

    def pii(self) -> PiiKeyring:
        """The personal-data keys, read once; read again while none is current yet."""
        if self._pii is None or self._pii.current_id is None:
            self._pii = PiiKeyring.load(self.keys_dir)
        return self._pii

    def tier(self, principal: Principal) -> RateTier:
        return self.settings.rate_limits[principal.role]


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, state: SecurityState) -> None:
        self.app = app
        self.state = state
        self._api_headers = self._build_headers(API_CSP)
        self._dashboard_headers = self._build_headers(DASHBOARD_CSP)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        headers = request_headers.of(scope).values
        state: MutableMapping[str, Any] = scope.setdefault("state", {})
        status_box = {"status": 500, "cache_hit": False, "started": False, "too_large": False}
        with tracing.request_span(method, path, headers) as (span, trace_id):
            state["trace_id"] = trace_id
            extra_headers: dict[str, str] = {"X-Trace-Id": trace_id}

            async def send_wrapped(message: Message) -> None:
                if status_box["too_large"]:
                    # The body outgrew the limit while a route read it; whatever the route made
                    # of that (FastAPI answers 400), the answer is 413.
                    if message["type"] == "http.response.start" and not status_box["started"]:
                        status_box["started"] = True
                        await self._too_large(path, trace_id)(scope, receive, send_inner)
                    return
                await send_inner(message)

            async def send_inner(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status_box["started"] = True
                    status_box["status"] = message["status"]
                    raw = list(message.get("headers", []))
                    present = set()
                    content_type = b""
                    for k, v in raw:
                        name = k.lower()
                        present.add(name)
                        if name == b"content-type":
                            content_type = v
                        elif name == b"server-timing" and b'desc="hit"' in v:
                            status_box["cache_hit"] = True
                    if message["status"] == 304:
                        status_box["cache_hit"] = True
                    html = content_type.startswith(b"text/html")
                    for name, value in self._fixed_headers(path, html):
                        if name not in present:
                            raw.append((name, value))
                    for name_s, value_s in extra_headers.items():
                        name = name_s.lower().encode()
                        if name not in present:
                            raw.append((name, value_s.encode("latin-1")))
                    message = {**message, "headers": raw}
                await send(message)

            scope_token = _SCOPE.set("")
            try:
                refusal = await self._admit(scope, path, method, headers, state, extra_headers)
                if refusal is not None:
                    await refusal(scope, receive, send_wrapped)
                else:
                    await self.app(scope, self._limited(receive, status_box), send_wrapped)
            except BodyTooLarge:
                if status_box["started"]:
                    raise
                await self._too_large(path, trace_id)(scope, receive, send_wrapped)
            except psycopg.OperationalError:
                # Met outside a route (authentication reads API keys and revocations).
                if status_box["started"]:
                    raise
                await database_unavailable(path, trace_id)(scope, receive, send_wrapped)
            except Exception:
                log.exception("unhandled error in a request", path=path[:200], method=method)
                if status_box["started"]:
                    raise
                response = problem_response(
                    500,
                    "the server failed to answer this request; quote the trace id to support",
                    slug="internal-error",
                    instance=path,
                    trace_id=trace_id,
                )
                await response(scope, receive, send_wrapped)
            finally:
                _SCOPE.reset(scope_token)
                status = int(status_box["status"])
                span.set_attribute("http.response.status_code", status)
                route = scope.get("route")
                self.state.stats.record(
                    getattr(route, "path", "unmatched"),
                    method,
                    status,
                    (time.perf_counter() - started) * 1000,
                    cache_hit=bool(status_box["cache_hit"]),
                )

    def _fixed_headers(self, path: str, html: bool) -> tuple[tuple[bytes, bytes], ...]:
        """The security headers every response gets (built once per kind of response)."""
        dashboard = html or not (path.startswith(PROTECTED_PREFIX) or path.startswith("/openapi"))
        return self._dashboard_headers if dashboard else self._api_headers

    def _build_headers(self, csp: str) -> tuple[tuple[bytes, bytes], ...]:
        out = {
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
            "Referrer-Policy": "no-referrer",
            "Cross-Origin-Opener-Policy": "same-origin",
            "Cross-Origin-Resource-Policy": "same-origin",
            "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
            "Content-Security-Policy": csp,
        }
        if self.state.settings.hsts_seconds:
            out["Strict-Transport-Security"] = (
                f"max-age={self.state.settings.hsts_seconds}; includeSubDomains"
            )
        return tuple((k.lower().encode(), v.encode("latin-1")) for k, v in out.items())

    def _too_large(self, path: str, trace_id: str) -> ASGIApp:
        return problem_response(
            413,
            f"the request body exceeds {self.state.settings.max_body_bytes} bytes",
            slug="body-too-large",
            instance=path,
            trace_id=trace_id,
        )

    def _limited(self, receive: Receive, box: dict[str, Any]) -> Receive:
        limit = self.state.settings.max_body_bytes
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

    async def _admit(
        self,
        scope: Scope,
        path: str,
        method: str,
        headers: dict[str, str],
        state: MutableMapping[str, Any],
        extra_headers: dict[str, str],
    ) -> ASGIApp | None:
        """None to let the request through, else the response that refuses it."""
        trace_id = state["trace_id"]

        def refuse(problem: Problem) -> ASGIApp:
            return problem_response(
                problem.status,
                problem.detail,
                slug=problem.slug,
                instance=path,
                trace_id=trace_id,
                headers=problem.headers,
            )

        duplicate = request_headers.of(scope).duplicate_of
        if duplicate is not None:
            return refuse(
                Problem(
                    400,
                    f"the {duplicate!r} header is repeated; send it once",
                    slug="duplicate-header",
                )
            )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.state.settings.max_body_bytes:
            return self._too_large(path, trace_id)
        # PostgreSQL text cannot hold NUL; refuse it here instead of failing in a query.
        raw_query = scope.get("query_string", b"").decode("latin-1")
        if "\x00" in path or "%00" in raw_query or "\x00" in unquote(raw_query):
            return refuse(Problem(400, "NUL characters are not allowed in the URL", slug="bad-url"))
        if not path.startswith(PROTECTED_PREFIX):
            return None
        address = _client_address(scope)
        wait = self.state.failures.blocked(address)
        if wait:
            return refuse(
                Problem(
                    429,
                    f"too many failed authentications from this address; retry in {wait} s",
                    slug="too-many-failures",
                    headers={"Retry-After": str(wait)},
                )
            )
        try:
            principal = await self.state.auth.authenticate(Request(scope))
        except Problem as problem:
            if problem.status == 401:
                await self.state.failures.failed(address, _credential_kind(headers), problem.detail)
            return refuse(problem)
        decision = await self.state.limiter.check(principal.rate_key, self.state.tier(principal))
        extra_headers.update(decision.headers(principal.role))
        if not decision.allowed:
            return refuse(
                Problem(
                    429,
                    f"rate limit of the {principal.role} tier reached "
                    f"({decision.limit} requests per hour, bursts of {decision.burst}); "
                    f"retry in {decision.retry_after} s",
                    slug="rate-limited",
                )
            )
        needed: Permission = "read" if method in SAFE_METHODS else "write"
        if not principal.can(needed):
            return refuse(
                Problem(
                    403,
                    f"the role {principal.role!r} (or this key's scopes) lacks the "
                    f"{needed!r} permission",
                    slug="forbidden",
                )
            )
        state["principal"] = principal
        state["sites"] = principal.site_list
        # Copied into the tasks and worker threads that serve this request.
        _SCOPE.set(principal.db_scope)
        return None


def _client_address(scope: Scope) -> str:
    """The peer's address as the server saw it (behind a proxy: as uvicorn's
    `forwarded_allow_ips` lets it be rewritten)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _credential_kind(headers: dict[str, str]) -> str:
    if "x-api-key" in headers or headers.get("authorization", "")[7:].lstrip().startswith("fgw_"):
        return "api_key"
    return "token" if headers.get("authorization") else "none"


def _with_security_scheme(app: FastAPI) -> None:
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {}).update(
            {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
        )
        for path, operations in schema.get("paths", {}).items():
            if not path.startswith(PROTECTED_PREFIX):
                continue
            for operation in operations.values():
                if isinstance(operation, dict):
                    operation.setdefault("security", [{"bearer": []}, {"apiKey": []}])
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install(app: FastAPI, settings: CloudSettings) -> SecurityState:
    """Put the perimeter around `app` (call after the routes and other middleware exist)."""
    from cloud_api import problems
    from cloud_api.api import ops_stats
    from cloud_api.api.routes.annotations import router as annotations_router

    tracing.configure(settings.tracing)
    state = SecurityState(app, settings)
    app.state.security = state
    if app.state.pool is not None:
        app.state.pool = scoped_pool(app.state.pool, settings.security)
    problems.install(app)
    app.include_router(ops_stats.router(require("ops")))
    app.include_router(annotations_router)
    _with_security_scheme(app)
    app.add_middleware(SecurityMiddleware, state=state)
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

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        async with inner(app_) as value:
            # The app may create its pool in its own lifespan: scope it before serving.
            if app.state.pool is not None:
                app.state.pool = scoped_pool(app.state.pool, settings.security)
            flusher = asyncio.create_task(_flush_loop(app, state))
            try:
                yield value
            finally:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
                await asyncio.to_thread(_flush_once, app, state)
                await state.limiter.close()

    app.router.lifespan_context = lifespan
    return state


def _flush_once(app: FastAPI, state: SecurityState) -> None:
    try:
        state.stats.flush(app.state.pool)
    except psycopg.Error as exc:
        log.warning("request statistics not stored", error=type(exc).__name__)


async def _flush_loop(app: FastAPI, state: SecurityState, every_s: float = 15.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        # On the event loop, where refusals are noted: the count of a quiet address is
        # logged even when no further request comes.
        state.failures.log.flush_due()
        await asyncio.to_thread(_flush_once, app, state)
