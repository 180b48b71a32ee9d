"""Rendered answers about closed windows, served again without routing.

A result-cache hit still cost the work around it: FastAPI's routing, the validation of a
dozen query parameters, the route's own parsing and the rendering. For the same request
(method GET, path, raw query string, JSON or CSV, the caller's visible sites) over a closed
window, the answer can only change when the data watermark of its scope and window changes.
(The JSON-or-CSV choice, `no-cache` and `If-None-Match` come from the request's one header
parse, cloud_api/headers.py, which the route reads too.) So a route that answered such a
request remembers the rendered response together with the key of its watermark in the memo
of cloud_api/marks.py and the watermark itself; the middleware here answers the same request
again as long as that memo still holds the same watermark, that is as long as no change
notification touched the scope's equipment on the window's days.

It sits inside the security middleware (authentication, rate limits, security headers and
request statistics apply as to any request) and inside the timing middleware (metrics and
Server-Timing). A request asking for a fresh computation (`Cache-Control: no-cache`) always
goes to the route. While the memo cannot vouch for anything (its change listener is down),
nothing is served from here.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from cloud_api import metrics
from cloud_api.access import headers as request_headers
from cloud_api.api.cache import LruMap
from cloud_api.api.marks import DataMarks

_DROPPED = frozenset({b"server-timing", b"content-length"})


@dataclass(frozen=True)
class Answer:
    memo: Hashable  # key of the scope and window in DataMarks
    mark: int  # the data watermark the answer was computed at
    route: Any  # the matched route (for metrics labels)
    headers: tuple[tuple[bytes, bytes], ...]
    etag: bytes
    body: bytes


def _key(scope: Scope) -> Hashable | None:
    if scope["method"] != "GET":
        return None
    parsed = request_headers.of(scope)
    if parsed.fresh:
        return None
    sites = scope.get("state", {}).get("sites")
    visible = None if sites is None else tuple(sites)
    return (scope["path"], scope.get("query_string", b""), parsed.csv, visible)


class Answers:
    """The memo of rendered answers, and the middleware that serves from it."""

    def __init__(
        self, marks: DataMarks, max_entries: int = 10_000, max_bytes: int = 256 * 1024 * 1024
    ) -> None:
        self.marks = marks
        self._items: LruMap[Hashable, Answer] = LruMap(
            max_entries, max_bytes=max_bytes, size=lambda a: len(a.body)
        )

    def remember(self, request: Request, memo: Hashable, mark: int, response: Response) -> None:
        """Keep a 200 answer about a closed window, valid while `memo` holds `mark`."""
        key = _key(request.scope)
        if key is None or response.status_code != 200 or not isinstance(response.body, bytes):
            return
        headers = tuple((k, v) for k, v in response.raw_headers if k not in _DROPPED)
        etag = next((v for k, v in headers if k == b"etag"), b"")
        answer = Answer(memo, mark, request.scope.get("route"), headers, etag, response.body)
        self._items.put(key, answer)

    def lookup(self, scope: Scope) -> Answer | None:
        key = _key(scope)
        if key is None:
            return None
        answer = self._items.get(key)
        if answer is None:
            return None
        known = self.marks.get(answer.memo)
        if known is None or known[1] != answer.mark:
            self._items.pop(key)
            return None
        return answer


class AnswersMiddleware:
    def __init__(self, app: ASGIApp, answers: Answers) -> None:
        self.app = app
        self.answers = answers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = self.answers.lookup(scope) if scope["type"] == "http" else None
        if answer is None:
            await self.app(scope, receive, send)
            return
        metrics.CACHE_REQUESTS.labels("hit").inc()
        scope["route"] = answer.route
        headers = [*answer.headers, (b"server-timing", b'cache;desc="hit"')]
        if _matches(scope, answer.etag):
            status, body = 304, b""
            headers = [(k, v) for k, v in headers if k != b"content-type"]
        else:
            status, body = 200, answer.body
            headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _matches(scope: Scope, etag: bytes) -> bool:
    return etag_matches(request_headers.of(scope).if_none_match, etag)


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """Whether an If-None-Match header value names `etag` (a list, comma-separated)."""
    return bool(etag) and etag in {t.strip() for t in if_none_match.split(b",")}
