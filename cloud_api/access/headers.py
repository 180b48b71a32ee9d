"""The request headers the HTTP API reads, parsed once per request.

The first middleware (tracing) parses them when a request arrives and keeps the result in the
request's state (`of(scope)`); tracing, routing, content negotiation, conditional requests
and both answer caches read that one parse (authentication reads Starlette's view of the same
headers, which agrees with it because a request repeating one never gets that far). Two
readings of one request poison a cache: a key that took the last of two `Accept` headers
(JSON) and a route that took the first (CSV) served the CSV to later JSON callers.

The rule for repeats: a request that carries one of the headers in `READ` more than once is
refused with 400 (`duplicate_of` names it; RequestLimitsMiddleware in
cloud_api/api/middleware.py refuses it). RFC 9110 lets a recipient join repeated list headers
with commas, but refusing is the one reading that cannot differ between a cache key and a
route, and no client we serve repeats these headers. Headers the API does not read may
repeat; the first one counts, as with Starlette's `request.headers.get`.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import Scope

# Every header a part of the API interprets (proxies' own headers, cookies and the like may
# repeat freely).
READ = frozenset(
    {
        "accept",
        "authorization",
        "cache-control",
        "content-length",
        "content-type",
        "if-none-match",
        "traceparent",
        "tracestate",
        "x-api-key",
    }
)
CSV = "text/csv"
_STATE_KEY = "request_headers"


@dataclass(frozen=True, slots=True)
class RequestHeaders:
    """Lower-case names to values (latin-1), each header once, and the first header of
    `READ` that the request repeated, if any."""

    values: dict[str, str]
    duplicate_of: str | None = None

    def get(self, name: str, default: str = "") -> str:
        return self.values.get(name, default)

    @property
    def csv(self) -> bool:
        """CSV is asked for, and JSON is not (JSON wins when both are acceptable)."""
        accept = self.get("accept")
        return CSV in accept and "application/json" not in accept

    @property
    def fresh(self) -> bool:
        """The caller asks for a fresh computation (`Cache-Control: no-cache`)."""
        return "no-cache" in self.get("cache-control").lower()

    @property
    def if_none_match(self) -> bytes:
        return self.get("if-none-match").encode("latin-1")


def parse(raw: list[tuple[bytes, bytes]]) -> RequestHeaders:
    values: dict[str, str] = {}
    duplicate: str | None = None
    for name_b, value_b in raw:
        name = name_b.decode("latin-1").lower()
        if name not in values:
            values[name] = value_b.decode("latin-1")
        elif duplicate is None and name in READ:
            duplicate = name
    return RequestHeaders(values, duplicate)


def of(scope: Scope) -> RequestHeaders:
    """The request's parse, made once (by the security middleware, or here on first use)."""
    state = scope.setdefault("state", {})
    found = state.get(_STATE_KEY)
    if isinstance(found, RequestHeaders):
        return found
    parsed = parse(scope["headers"])
    state[_STATE_KEY] = parsed
    return parsed
