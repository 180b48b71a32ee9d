"""Every in-process cache of the read API, in one place, and how each stays correct.

Three layers, outermost first; each is keyed so that it can only hold answers that are still
true, and each is bounded (least recently used out, counted in entries and bytes):

1. Rendered answers (`Answers`, served by `AnswersMiddleware` before routing): keyed by the
   request (GET, path, raw query string, JSON or CSV, the caller's visible sites); each entry
   carries the memo key of its scope and window and the data watermark it was computed at, and
   is served only while `DataMarks` still holds that same watermark.
2. Results of closed windows (`ResultCache`, JSON bytes): keyed by the route, the normalized
   query, the visible sites and the data watermark of the scope and window
   (cloud_api.api.queries.data_watermark). Late data bumps the watermark of the days it
   touches, so a stale entry is never looked up again (it ages out); results over other days
   stay cached.
3. Scope members and watermarks (`DataMarks`): keyed by (scope, window days, visible sites),
   and scope members alone by (scope, visible sites). Invalidated by PostgreSQL notifications
   on `gateway_data`: a data change forgets the entries holding that equipment and day, a
   registry change forgets everything; while the listening connection is down nothing is
   vouched for (every lookup goes to the database), and after it reconnects everything is
   forgotten.

`create_app` makes one of each per process; the series routes meet all three through
`SeriesCaching`. A request with `Cache-Control: no-cache` skips every lookup (its fresh
result still refreshes the caches). The bounded map is cachetools' LRUCache (sized by bytes
where a value has a size) behind a lock. The access package keeps its own small memos
(verified tokens, blocked addresses) with cachetools directly: verified tokens are keyed by
the token and forgotten when the revocations change (cloud_api/access/auth.py), a blocked
address is kept until its block runs out (cloud_api/access/ratelimit.py).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Generic, TypeVar

import orjson
import psycopg
import structlog
from cachetools import LRUCache
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from cloud_api import metrics
from cloud_api.access import headers as request_headers
from cloud_api.api.queries import Member

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruMap(Generic[K, V]):
    """A bounded, thread-safe map that drops its least recently used entries.

    Bounded by entry count and, with `size` (bytes of a value), by total bytes too.
    """

    def __init__(
        self,
        max_entries: int,
        *,
        max_bytes: int | None = None,
        size: Callable[[V], int] | None = None,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # Sized by bytes when a budget is given; the entry count is then bounded by hand.
        self._items: LRUCache[K, V] = (
            LRUCache(max_bytes, getsizeof=size)
            if max_bytes is not None and size is not None
            else LRUCache(max_entries)
        )
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items.pop(key, None)
            try:
                self._items[key] = value
            except ValueError:
                return  # larger than the whole budget: not kept, and nothing else dropped
            while len(self._items) > self.max_entries:
                self._items.popitem()

    def pop(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    @property
    def bytes(self) -> int:
        return int(self._items.currsize) if self.max_bytes is not None else 0

    def __len__(self) -> int:
        return len(self._items)


class ResultCache(LruMap[Hashable, bytes]):
    """Query key -> result payload as JSON, counting hits and misses for /metrics."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 256 * 1024 * 1024) -> None:
        super().__init__(max_entries, max_bytes=max_bytes, size=len)

    def get(self, key: Hashable) -> bytes | None:
        value = super().get(key)
        metrics.child(metrics.CACHE_REQUESTS, "miss" if value is None else "hit").inc()
        return value


# --- scope members and data watermarks ------------------------------------------------------
#
# Scope members and data watermarks kept in memory, invalidated by PostgreSQL notifications.
#
# A result-cache hit used to need a database round trip only to learn the scope's members and
# data watermark (the cache key). This memo keeps them per (scope, window days, visible sites)
# so a hit needs no database at all, and stays correct because of the triggers of
# 0004_data_notify.sql and 0022_data_notify_day.sql: every committed change of
# rollups.data_versions notifies the channel `gateway_data` with its (site, equipment, day), and
# every change of the registry (or a deletion of versions) notifies with an empty payload,
# meaning "forget everything". A change invalidates the entries whose scope holds that
# equipment and whose window touches that day, so live data arriving for today leaves the
# entries of past windows in place. (A payload without a day, from the 0004 trigger, invalidates
# every entry of that equipment.)
#
# Scope members alone (which equipment a site or line has) are remembered too, per scope and
# visible sites; only a registry change forgets them.
#
# Validity is tracked with one counter (`_seq`) bumped by each notification. An entry carries
# the counter value read before its database query ran (its stamp); it is used only while no
# notification about one of its members, and no "forget everything", came after that stamp.
# Reading the stamp before the query errs on the safe side: a change that commits while the
# query runs makes the entry invalid even if the query already saw it.
#
# Fail closed: the memo answers only while the listening connection is up. When it drops
# (server restart, network, pg_terminate_backend) every lookup goes back to the database at
# once, and after reconnecting everything remembered before is forgotten, because
# notifications sent in between were lost. A silent loss of the connection is found by a probe
# once a second at the latest.
#
# What it does not give: a change is seen by this process when its notification arrives, which
# is after the writer's commit returned (normally well under a millisecond on one machine); a
# reader racing a writer by less than that may get the result from just before the commit,
# exactly as if it had asked a moment earlier.
log = structlog.get_logger("cloud_api.marks")

CHANNEL = "gateway_data"
APPLICATION = "gateway-api-data-marks"  # finds the listener in pg_stat_activity
PROBE_SECONDS = 1.0
# Changed days remembered before everything is forgotten at once (bounds memory).
MAX_CHANGED_DAYS = 200_000
ALL_DAYS = None  # a change without a day
RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)


class DataMarks:
    """The memo and the thread that listens for invalidations (start() / stop())."""

    def __init__(self, url: str, *, max_entries: int = 50_000) -> None:
        self.url = url
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._members: LruMap[Hashable, tuple[tuple[Member, ...], int]] = LruMap(max_entries)
        self._seq = 0
        self._flushed = 0  # _seq at the last "forget everything"
        # (site, equipment) -> {day or ALL_DAYS: _seq of its last change}
        self._changed: dict[tuple[str, str], dict[date | None, int]] = {}
        self._changed_days = 0
        self._listening = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()  # set while listening (tests wait on it)

    # -- the memo ---------------------------------------------------------------------------

    def stamp(self) -> int | None:
        """The counter to stamp a fresh database read with; None while not listening (the
        read must then not be remembered)."""
        with self._lock:
            return self._seq if self._listening else None

    def get(self, key: Hashable) -> tuple[list[Member], int] | None:
        """(members, watermark) for `key` if remembered and unchanged since, else None."""
        with self._lock:
            if not self._listening:
                return None
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.stamp < self._flushed or any(
                self._touched(m, entry.stamp, entry.span) for m in entry.members
            ):
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return list(entry.members), entry.mark

    def _touched(self, member: Member, stamp: int, span: tuple[date, date] | None) -> bool:
        """With the lock held: whether a change after `stamp` touched `member` in `span`."""
        changes = self._changed.get((member.site_id, member.equipment_id))
        if not changes:
            return False
        undated = changes.get(ALL_DAYS)
        if undated is not None and undated > stamp:
            return True
        if span is None:
            return any(seq > stamp for seq in changes.values())
        first, last = span
        if (last - first).days < len(changes):
            # A short window: look its days up rather than scan every changed day.
            day = first
            while day <= last:
                seq = changes.get(day)
                if seq is not None and seq > stamp:
                    return True
                day += timedelta(days=1)
            return False
        return any(
            seq > stamp and day is not ALL_DAYS and first <= day <= last
            for day, seq in changes.items()
        )

    def put(
        self,
        key: Hashable,
        members: list[Member],
        mark: int,
        stamp: int | None,
        span: tuple[date, date] | None = None,
    ) -> None:
        """Remember a database read stamped (before it ran) with `stamp()`; `span` holds the
        first and last UTC day of its window (None: any change of a member invalidates it)."""
        if stamp is None:
            return
        with self._lock:
            # Not listening now, or the connection was renewed since the stamp: notifications
            # may have been missed in between, so the read proves nothing about the present.
            if not self._listening or stamp < self._flushed:
                return
            self._entries[key] = _Entry(tuple(members), mark, stamp, span)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def get_members(self, key: Hashable) -> list[Member] | None:
        """The members of a scope (key: scope, id, site, visible sites), if remembered."""
        with self._lock:
            if not self._listening:
                return None
            found = self._members.get(key)
            if found is None or found[1] < self._flushed:
                return None
            return list(found[0])

    def put_members(self, key: Hashable, members: list[Member], stamp: int | None) -> None:
        if stamp is None:
            return
        with self._lock:
            if not self._listening or stamp < self._flushed:
                return
            self._members.put(key, (tuple(members), stamp))

    def __len__(self) -> int:
        return len(self._entries)

    def _notified(self, payload: str) -> None:
        with self._lock:
            self._seq += 1
            try:
                parsed = json.loads(payload) if payload else None
            except ValueError:
                parsed = None
            change = _parse_change(parsed)
            if change is None:
                self._forget_all()
                return
            site, equipment, day = change
            changes = self._changed.setdefault((site, equipment), {})
            if day not in changes:
                self._changed_days += 1
            changes[day] = self._seq
            if self._changed_days > MAX_CHANGED_DAYS:
                self._forget_all()

    def forget_all(self) -> None:
        """Read your writes: a route that committed a change calls this before it answers, so
        the same process never serves what it remembered from before the change (the
        notification that tells the other processes may arrive a moment later)."""
        with self._lock:
            self._forget_all()

    def _forget_all(self) -> None:
        """With the lock held: invalidate every entry (stamps before now no longer count)."""
        self._seq += 1
        self._flushed = self._seq
        self._entries.clear()
        self._members.clear()
        self._changed.clear()
        self._changed_days = 0

    def _set_listening(self, listening: bool) -> None:
        with self._lock:
            # Either way, what was remembered before may have missed notifications.
            self._forget_all()
            self._listening = listening
        if listening:
            self.connected.set()
        else:
            self.connected.clear()

    # -- the listener -----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="data-marks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.url, autocommit=True, connect_timeout=5, application_name=APPLICATION
                ) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Listening from here on: what committed before is visible to any
                    # query that starts now, and what commits later will be notified.
                    self._set_listening(True)
                    failures = 0
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=PROBE_SECONDS, stop_after=1000):
                            self._notified(note.payload)
                        # The probe finds a connection that died without closing its socket.
                        conn.execute("SELECT 1")
            except psycopg.Error as exc:
                log.warning(
                    "data change listener lost; reading watermarks from the database",
                    error=type(exc).__name__,
                )
            finally:
                self._set_listening(False)
            if not self._stop.is_set():
                self._stop.wait(RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)])
                failures += 1


class _Entry:
    __slots__ = ("mark", "members", "span", "stamp")

    def __init__(
        self,
        members: tuple[Member, ...],
        mark: int,
        stamp: int,
        span: tuple[date, date] | None,
    ) -> None:
        self.members = members
        self.mark = mark
        self.stamp = stamp
        self.span = span


def _parse_change(parsed: object) -> tuple[str, str, date | None] | None:
    """(site, equipment, day or ALL_DAYS) of a notification; None means forget everything."""
    if not isinstance(parsed, list) or len(parsed) not in (2, 3):
        return None
    site, equipment = parsed[0], parsed[1]
    if not isinstance(site, str) or not isinstance(equipment, str):
        return None
    if len(parsed) == 2:
        return site, equipment, ALL_DAYS
    try:
        return site, equipment, date.fromisoformat(str(parsed[2]))
    except ValueError:
        return None


# --- rendered answers -----------------------------------------------------------------------
#
# Rendered answers about closed windows, served again without routing.
#
# A result-cache hit still cost the work around it: FastAPI's routing, the validation of a
# dozen query parameters, the route's own parsing and the rendering. For the same request
# (method GET, path, raw query string, JSON or CSV, the caller's visible sites) over a closed
# window, the answer can only change when the data watermark of its scope and window changes.
# (The JSON-or-CSV choice, `no-cache` and `If-None-Match` come from the request's one header
# parse, cloud_api/access/headers.py, which the route reads too.) So a route that answered such a
# request remembers the rendered response together with the key of its watermark in the memo
# of cloud_api/api/cache.py and the watermark itself; the middleware here answers the same request
# again as long as that memo still holds the same watermark, that is as long as no change
# notification touched the scope's equipment on the window's days.
#
# It sits inside the security middleware (authentication, rate limits, security headers and
# request statistics apply as to any request) and inside the timing middleware (metrics and
# Server-Timing). A request asking for a fresh computation (`Cache-Control: no-cache`) always
# goes to the route. While the memo cannot vouch for anything (its change listener is down),
# nothing is served from here.
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
        await serve_again(scope, answer, send)


async def serve_again(scope: Scope, answer: Answer, send: Send) -> None:
    """Send a remembered answer (Answers.lookup) as the answer to this request."""
    metrics.child(metrics.CACHE_REQUESTS, "hit").inc()
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
    if not if_none_match:  # none sent: the usual case
        return False
    return bool(etag) and etag in {t.strip() for t in if_none_match.split(b",")}


# --- the series routes' use of the three layers ---------------------------------------------


class SeriesCaching:
    """The caching of one series request (/v1/oee, /v1/counts): the three layers above as
    the route meets them.

    `key` is the route and normalized query without the watermark (the result cache's key is
    `key` + watermark); `scope_key` is (scope kind, id, site, visible sites). Call `cached()`
    first: a closed window's result the memo vouches for, with no database at all, or None
    (then the stamp for the fresh read is taken). In the database read, `members()` and, for a
    closed window, `computed()`; after rendering, `remember()`.
    """

    def __init__(
        self,
        request: Request,
        key: tuple[Hashable, ...],
        scope_key: tuple[Hashable, ...],
        span: tuple[date, date],
        *,
        closed: bool,
    ) -> None:
        state = request.app.state
        self.request = request
        self.results: ResultCache = state.result_cache
        self.answers: Answers = state.answers
        self.marks: DataMarks | None = getattr(state, "data_marks", None)
        self.key = key
        self.scope_key = scope_key
        self.span = span
        self.memo = (*scope_key, *span)
        self.closed = closed
        self.stamp: int | None = None

    def cached(self) -> tuple[dict[str, Any], int] | None:
        """(result, watermark) of a closed window, or None and the stamp for a fresh read."""
        # A client asking for a fresh computation (Cache-Control: no-cache) skips the lookup;
        # the fresh result still refreshes the caches.
        fresh = request_headers.of(self.request.scope).fresh
        if self.closed and not fresh and self.marks is not None:
            known = self.marks.get(self.memo)
            if known is not None:
                stored = self.results.get((*self.key, known[1]))
                if stored is not None:
                    return orjson.loads(stored), known[1]
        self.stamp = self.marks.stamp() if self.marks is not None else None
        return None

    def members(self, resolve: Callable[[], list[Member]]) -> list[Member]:
        """The scope's members, remembered, or from `resolve()` (then remembered)."""
        members = self.marks.get_members(self.scope_key) if self.marks is not None else None
        if members is None:
            members = resolve()
            if self.marks is not None:
                self.marks.put_members(self.scope_key, members, self.stamp)
        return members

    def computed(self, members: list[Member], mark: int, result: dict[str, Any]) -> bytes:
        """A closed window's fresh result and the watermark it was computed at; returns the
        result as JSON (the body of its answer: see `respond`)."""
        if self.marks is not None:
            self.marks.put(self.memo, members, mark, self.stamp, self.span)
        # As JSON: thousands of cached results as Python objects would make every full
        # garbage collection of the worker walk millions of them.
        encoded = orjson.dumps(result)
        self.results.put((*self.key, mark), encoded)
        return encoded

    def remember(self, mark: int, response: Response) -> None:
        """The rendered answer, served again by AnswersMiddleware while `mark` holds."""
        self.answers.remember(self.request, self.memo, mark, response)
