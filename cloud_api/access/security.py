"""The HTTP API's security perimeter: who the caller is, what it may do, and what it sees.

- `AuthMiddleware` authenticates every `/v1/...` request (health, readiness, metrics, OpenAPI
  and the dashboard's static page stay public), counts it against its role's rate limit and
  checks the default permission (GET/HEAD need `read`, any other method `write`);
- `SecurityHeadersMiddleware` puts the security headers on every answer;
- `add_security_schemes` declares the credentials in the OpenAPI document.
`create_app` (cloud_api/api/app.py) stacks them with the other middlewares; closed CORS unless
origins are configured.

The caller's scope reaches PostgreSQL too: `SitePool` wraps the app's pool so each checkout
is a transaction that runs as the API's database role with `app.sites` set to the caller's
sites, and the row-level security policies of 0010_security.sql filter every table with a
site_id column by it.

Routes read the caller with `CurrentPrincipal` (or `request.state.principal`; the visible
sites are also in `request.state.sites`) and ask for more than the default with
`Depends(require("pii"))` / `require("ops")`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Request
from psycopg_pool import ConnectionPool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_api import tracing
from cloud_api.access import headers as request_headers
from cloud_api.access.auth import Authenticator, Permission, Principal
from cloud_api.access.pii import PiiKeyring
from cloud_api.access.ratelimit import FailureThrottle, RateLimiter
from cloud_api.config import CloudSettings, RateTier, SecuritySettings
from cloud_api.db import CheckedPool, Opening
from cloud_api.problems import Problem, problem_response

# The sites a database checkout of this request is scoped to (`app.sites` of the opening
# statement, row policies): "" (none) when a request starts, set by authentication, reset
# when the request ends (by the middleware stack and by the series shortcut alike).
DB_SCOPE: ContextVar[str] = ContextVar("db_site_scope", default="")
# Where AuthMiddleware leaves the rate-limit headers in the request's state.
RATE_LIMIT_HEADERS = "rate_limit_headers"
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
    def connection(
        self, timeout: float | None = None, *, generic_plans: bool = False
    ) -> Iterator[psycopg.Connection[Any]]:
        """A scoped checkout. With `generic_plans`, the transaction's prepared statements run
        their generic plan (`plan_cache_mode`, set local to the transaction in the opening
        statement, so no round trip more): see `GENERIC_PLANS`."""
        begin = _opening_sql(self.role, DB_SCOPE.get(), generic_plans)
        autocommit = False

        def opening(conn: psycopg.Connection[Any]) -> None:
            nonlocal autocommit
            autocommit = conn.autocommit
            # The transaction is opened and closed here by hand: psycopg must not add its own.
            # (The API's own pool hands out connections in autocommit already: each switch
            # is a call into psycopg's wait loop.)
            if not autocommit:
                conn.autocommit = True
            try:
                conn.execute(begin, prepare=False)
            except BaseException:
                with contextlib.suppress(psycopg.Error):
                    if (
                        not autocommit
                        and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                    ):
                        conn.autocommit = autocommit
                raise

        # A checked pool takes the opening statement as the check of the connection it hands
        # out: one round trip less per checkout.
        checkout = (
            self.pool.connection(timeout, opening=opening)
            if isinstance(self.pool, CheckedPool)
            else _opened(self.pool, timeout, opening)
        )
        with tracing.db_span(self.role), checkout as conn:
            try:
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
                if (
                    not autocommit
                    and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                ):
                    conn.autocommit = autocommit

    def close(self) -> None:
        self.pool.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


# Statements the API runs often are prepared on the server (`prepare_threshold`), but
# PostgreSQL chose a custom plan for every execution of the series statement (its generic
# plan's estimate, with the members' arrays and bounds unknown, is far above a custom plan's),
# so each execution was planned again: about 0.3 ms of the database's CPU per 7-day answer,
# close to half of it. The generic plan has the same shape (per member an index range scan
# of the rollup, forced by the statement's LATERAL ... OFFSET 0) and gives the same rows.
GENERIC_PLANS = "force_generic_plan"


@functools.lru_cache(maxsize=1024)
def _opening_sql(role: str, sites: str, generic_plans: bool) -> bytes:
    """The statement that opens a scoped checkout: BEGIN, the role and the caller's sites
    (and the plan cache mode), local to the transaction; composed once per caller scope."""
    settings = [
        psycopg.sql.SQL("set_config('role', {}, true)").format(psycopg.sql.Literal(role)),
        psycopg.sql.SQL("set_config('app.sites', {}, true)").format(psycopg.sql.Literal(sites)),
    ]
    if generic_plans:
        settings.append(
            psycopg.sql.SQL("set_config('plan_cache_mode', {}, true)").format(
                psycopg.sql.Literal(GENERIC_PLANS)
            )
        )
    stmt = psycopg.sql.SQL("BEGIN; SELECT ") + psycopg.sql.SQL(", ").join(settings)
    return stmt.as_bytes(None)


@contextmanager
def _opened(
    pool: ConnectionPool, timeout: float | None, opening: Opening
) -> Iterator[psycopg.Connection[Any]]:
    """A checkout of a plain pool that runs `opening` first."""
    with pool.connection(timeout) as conn:
        opening(conn)
        yield conn


def scoped_pool(pool: ConnectionPool | SitePool, settings: SecuritySettings) -> SitePool:
    if isinstance(pool, SitePool):
        return pool
    return SitePool(pool, settings.api_db_role)


@contextmanager
def database_scope(principal: Principal | None) -> Iterator[None]:
    """Run database work as `principal` outside a request (None: no site visible)."""
    token = DB_SCOPE.set(principal.db_scope if principal else "")
    try:
        yield
    finally:
        DB_SCOPE.reset(token)


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


# --- the middlewares -------------------------------------------------------------------------


class SecurityState:
    """What the security middlewares need, kept on `app.state.security` (tests adjust the
    limiter's clock)."""

    def __init__(self, settings: CloudSettings, pool: Callable[[], Any]) -> None:
        self.settings = settings.security
        self.auth = Authenticator(settings.security, settings.keys_dir, pool)
        self.limiter = RateLimiter(
            redis_url=settings.security.redis_url, prefix=settings.security.redis_prefix
        )
        self.failures = FailureThrottle(self.limiter, settings.security.auth_failures)
        self.keys_dir = settings.keys_dir
        self._pii: PiiKeyring | None = None

    def pii(self) -> PiiKeyring:
        """The personal-data keys, read once; read again while none is current yet."""
        if self._pii is None or self._pii.current_id is None:
            self._pii = PiiKeyring.load(self.keys_dir)
        return self._pii

    def tier(self, principal: Principal) -> RateTier:
        return self.settings.rate_limits[principal.role]


class SecurityHeadersMiddleware:
    """The security headers every answer gets (those a route set itself are kept): a strict
    Content-Security-Policy for the API, one that lets the dashboard load its own files for
    HTML and the public pages, nosniff, no framing, no referrer, and HSTS unless disabled;
    and the caller's rate limit (RateLimit, RateLimit-Policy, Retry-After when refused) once
    `AuthMiddleware` counted the request. It sits outside the request limits and the error
    handler, so their answers (413, 500, 503) carry these headers too."""

    def __init__(self, app: ASGIApp, settings: SecuritySettings) -> None:
        self.app = app
        self._api_headers = _build_headers(API_CSP, settings.hsts_seconds)
        self._dashboard_headers = _build_headers(DASHBOARD_CSP, settings.hsts_seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = self.secured(scope, path, message)
            await send(message)

        await self.app(scope, receive, send_secured)

    def secured(self, scope: Scope, path: str, message: Message) -> Message:
        """The start of an answer with the security and rate-limit headers it lacks."""
        raw = list(message.get("headers", []))
        present = set()
        content_type = b""
        for k, v in raw:
            name = k.lower()
            present.add(name)
            if name == b"content-type":
                content_type = v
        html = content_type.startswith(b"text/html")
        for name, value in self._fixed_headers(path, html):
            if name not in present:
                raw.append((name, value))
        # The caller's rate limit, once AuthMiddleware counted the request.
        for name, value in scope.get("state", {}).get(RATE_LIMIT_HEADERS, ()):
            if name not in present:
                raw.append((name, value))
        return {**message, "headers": raw}

    def _fixed_headers(self, path: str, html: bool) -> tuple[tuple[bytes, bytes], ...]:
        dashboard = html or not (path.startswith(PROTECTED_PREFIX) or path.startswith("/openapi"))
        return self._dashboard_headers if dashboard else self._api_headers


def _build_headers(csp: str, hsts_seconds: int) -> tuple[tuple[bytes, bytes], ...]:
    out = {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
        "Content-Security-Policy": csp,
    }
    if hsts_seconds:
        out["Strict-Transport-Security"] = f"max-age={hsts_seconds}; includeSubDomains"
    return tuple((k.lower().encode(), v.encode("latin-1")) for k, v in out.items())


class AuthMiddleware:
    """Every `/v1/...` request is authenticated (bearer token or API key), counted against its
    role's rate limit and checked for the default permission (GET/HEAD need `read`, any other
    method `write`); health, readiness, metrics, OpenAPI and the dashboard stay public.

    An address with too many failed authentications is refused (429) before its credential is
    read. The caller's principal and sites go into the request's state, and its database
    scope into a context variable that the scoped pool reads (`SitePool`).
    """

    def __init__(self, app: ASGIApp, state: SecurityState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        scope_token = DB_SCOPE.set("")
        try:
            refusal = None
            if path.startswith(PROTECTED_PREFIX):
                refusal = await self.admit(scope, path)
            if refusal is not None:
                await refusal(scope, receive, send)
            else:
                await self.app(scope, receive, send)
        finally:
            DB_SCOPE.reset(scope_token)

    async def admit(self, scope: Scope, path: str) -> ASGIApp | None:
        """None to let the request through, else the response that refuses it. Sets the
        caller's database scope (`DB_SCOPE`) in the current context when it lets it through."""
        state: MutableMapping[str, Any] = scope.setdefault("state", {})
        headers = request_headers.of(scope).values
        method: str = scope.get("method", "GET")

        def refuse(problem: Problem) -> ASGIApp:
            return problem_response(
                problem.status,
                problem.detail,
                slug=problem.slug,
                instance=path,
                trace_id=state.get("trace_id"),
                headers=problem.headers,
            )

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
        # Put on whatever answers this request, by SecurityHeadersMiddleware.
        state[RATE_LIMIT_HEADERS] = tuple(
            (k.lower().encode(), v.encode("latin-1"))
            for k, v in decision.headers(principal.role).items()
        )
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
        DB_SCOPE.set(principal.db_scope)
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


def add_security_schemes(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document with the two credentials (bearer token, API key) declared and
    required on every `/v1/...` operation."""
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
    return schema
