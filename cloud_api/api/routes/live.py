"""Read routes for the live plant view: what every machine of a site does now, and the state
timelines of a whole site or line in one request.

`GET /v1/plant/live` answers, per equipment, its current state (since when, with the reason
the PLC gave), the OEE of the shift it is in (from the shift calendar its agent reported; the
newest shift in its buckets when none was reported) with the good parts against the ideal
count of the planned time so far, and, per agent, when it is to be considered late or lost
measured against the status interval the agent itself reports. The answer holds instants
only (`since`, `late_at`), never ages computed at request time, so it changes only when data
changes and a poller revalidating with If-None-Match mostly gets 304.
"""

from __future__ import annotations

import itertools
import statistics
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from psycopg import sql

from cloud_api.api import queries
from cloud_api.api import targets as target_book
from cloud_api.api.queries import Conn, Member
from cloud_api.api.routes.analytics import RATIO_NAMES, ratios_of
from cloud_api.api.routes.common import allowed_sites, db, respond, window
from oee.calendar import ShiftCalendar
from oee.components import COMPONENT_FIELDS

router = APIRouter(prefix="/v1", tags=["live"])

SiteQ = Annotated[str, Query(min_length=1, max_length=200, description="site id")]
LineQ = Annotated[str | None, Query(max_length=200, description="only this line")]
# An agent that reports no interval (older versions) is measured against the gaps between its
# last status reports; with fewer than two, against the agent's default interval.
DEFAULT_STATUS_INTERVAL_S = 60.0
STATUS_SAMPLE = 4
# Late after this many intervals without a status report (one may be in flight), lost after
# LOST_AFTER; GRACE_S covers the agent's flush interval and the trip through broker and ingest.
LATE_AFTER = 2.5
LOST_AFTER = 10.0
GRACE_S = 5.0
# How far back the newest shift in the buckets is searched for when no calendar is known.
SHIFT_LOOKBACK = timedelta(days=2)
_SUMS = sql.SQL(", ").join(
    sql.SQL("sum(b.{c}) AS {c}").format(c=sql.Identifier(c)) for c in COMPONENT_FIELDS
)


def shift_of(calendar: ShiftCalendar, now: datetime) -> tuple[str, datetime, datetime] | None:
    """The newest shift occurrence that started at or before `now` (it may be in a break, or
    over), as (name, start, end); None if none started in the last week."""
    found = None
    for w in calendar.windows(now - timedelta(days=7), now + timedelta(seconds=1)):
        if w.shift is not None and w.shift_start is not None and w.shift_start <= now:
            found = (w.shift, w.shift_start, w.shift_end or w.end)
    return found


def _calendars(conn: Conn, site: str) -> tuple[dict[str, ShiftCalendar], str | None]:
    """Each reporting agent's shift calendar, and the newest reported time zone."""
    calendars, zones = queries.shift_calendars(conn, [site])
    return {agent: c for (_, agent), c in calendars.items()}, zones.get(site)


def _current_states(conn: Conn, members: list[Member]) -> dict[str, dict[str, Any]]:
    stmt = sql.SQL(
        "WITH scope AS (SELECT * FROM unnest(%(m_site)s::text[], %(m_eq)s::text[]) "
        "AS t(site_id, equipment_id)) "
        "SELECT s.equipment_id, x.ts, x.state, COALESCE(an.reason, x.reason) AS reason"
        " FROM scope s CROSS JOIN LATERAL ("
        " SELECT e.ts, e.body->>'state' AS state, e.body->>'reason' AS reason"
        " FROM facts.events e WHERE e.site_id = s.site_id AND e.equipment_id = s.equipment_id"
        " AND e.kind = 'state' ORDER BY e.ts DESC, e.event_id DESC LIMIT 1) x"
        # A stop people classified shows its annotated reason (queries.py, _LIVE_ANNOTATION).
        " LEFT JOIN LATERAL (SELECT a.reason FROM facts.annotations a"
        " WHERE a.site_id = s.site_id AND a.equipment_id = s.equipment_id AND a.ts = x.ts"
        " AND a.kind = 'downtime' AND a.deleted_at IS NULL AND x.state IN ('fault', 'idle')"
        " ORDER BY a.created_at DESC, a.annotation_id DESC LIMIT 1) an ON true"
    )
    rows = queries.run(
        conn,
        "live_states",
        stmt,
        {"m_site": [m.site_id for m in members], "m_eq": [m.equipment_id for m in members]},
    )
    return {r["equipment_id"]: r for r in rows}


def _newest_shifts(
    conn: Conn, site: str, equipment: list[str], now: datetime
) -> dict[str, tuple[str, datetime, datetime | None]]:
    if not equipment:
        return {}
    rows = queries.run(
        conn,
        "live_newest_shift",
        sql.SQL(
            "SELECT DISTINCT ON (equipment_id) equipment_id, shift, shift_start "
            "FROM facts.oee_buckets WHERE site_id = %(site)s AND equipment_id = ANY(%(eq)s) "
            "AND bucket_start >= %(since)s AND shift_start IS NOT NULL "
            "ORDER BY equipment_id, bucket_start DESC"
        ),
        {"site": site, "eq": equipment, "since": now - SHIFT_LOOKBACK},
    )
    return {r["equipment_id"]: (r["shift"], r["shift_start"], None) for r in rows}


def _shift_sums(
    conn: Conn, site: str, shifts: dict[str, tuple[str, datetime, datetime | None]]
) -> dict[str, dict[str, Any]]:
    if not shifts:
        return {}
    ids = list(shifts)
    rows = queries.run(
        conn,
        "live_shift_sums",
        sql.SQL(
            "WITH w AS (SELECT * FROM unnest(%(eq)s::text[], %(lo)s::timestamptz[], "
            "%(hi)s::timestamptz[]) AS t(equipment_id, lo, hi)) "
            "SELECT w.equipment_id, {sums} FROM w JOIN facts.oee_buckets b "
            "ON b.site_id = %(site)s AND b.equipment_id = w.equipment_id "
            "AND b.bucket_start >= w.lo AND (w.hi IS NULL OR b.bucket_start < w.hi) "
            "GROUP BY w.equipment_id"
        ).format(sums=_SUMS),
        {
            "site": site,
            "eq": ids,
            "lo": [shifts[i][1] for i in ids],
            "hi": [shifts[i][2] for i in ids],
        },
    )
    return {r["equipment_id"]: r for r in rows}


def status_interval(reported: Any, reports: list[datetime]) -> tuple[float, str]:
    """How often an agent reports its status, and where that figure comes from: the value
    the agent reports (`status_interval_s`), else the median gap between its last reports
    (newest first), else the agent's default."""
    if isinstance(reported, int | float) and not isinstance(reported, bool) and reported > 0:
        return float(reported), "reported"
    if len(reports) >= 2:
        gaps = [(a - b).total_seconds() for a, b in itertools.pairwise(reports)]
        return max(1.0, statistics.median(gaps)), "observed"
    return DEFAULT_STATUS_INTERVAL_S, "default"


def _agents(conn: Conn, site: str) -> list[dict[str, Any]]:
    rows = queries.run(
        conn,
        "live_agents",
        sql.SQL(
            "SELECT a.agent_id, a.last_seen, a.status_reported_at, a.version, "
            "ARRAY(SELECT e.ts FROM facts.events e WHERE e.site_id = a.site_id "
            " AND e.agent_id = a.agent_id AND e.kind = 'agent' AND e.body->>'code' = 'status' "
            " ORDER BY e.ts DESC LIMIT %(n)s) AS reports, "
            "(SELECT e.body->'data'->'status_interval_s' FROM facts.events e "
            " WHERE e.site_id = a.site_id AND e.agent_id = a.agent_id AND e.kind = 'agent' "
            " AND e.body->>'code' = 'status' ORDER BY e.ts DESC LIMIT 1) AS reported "
            "FROM registry.agents a WHERE a.site_id = %(site)s ORDER BY a.agent_id"
        ),
        {"site": site, "n": STATUS_SAMPLE},
    )
    out = []
    for r in rows:
        interval, source = status_interval(r["reported"], r["reports"] or [])
        last = r["status_reported_at"] or r["last_seen"]
        out.append(
            {
                "agent_id": r["agent_id"],
                "version": r["version"],
                "last_seen": r["last_seen"],
                "status_reported_at": r["status_reported_at"],
                "status_interval_s": interval,
                "status_interval_source": source,
                "late_at": last + timedelta(seconds=LATE_AFTER * interval + GRACE_S)
                if last
                else None,
                "lost_at": last + timedelta(seconds=LOST_AFTER * interval + GRACE_S)
                if last
                else None,
            }
        )
    return out


def ideal_count(config: Any, planned_busy_s: float) -> int | None:
    """The parts the planned time so far allows at the ideal cycle time (single product)."""
    if not isinstance(config, dict) or config.get("products"):
        return None
    cycle = config.get("ideal_cycle_time_s")
    if not isinstance(cycle, int | float) or isinstance(cycle, bool) or cycle <= 0:
        return None
    return int(planned_busy_s / cycle)


@router.get(
    "/plant/live",
    summary="Live plant view: each machine's state, time in state, reason and shift OEE",
    description=(
        "Per equipment of the site (or line): the current state with `since` and `reason` "
        "(from the newest state event), the shift it is in (`shift.name`, `start`, `end`; "
        "from its agent's reported shift calendar, else the newest shift in its OEE buckets), "
        "and that shift's OEE, availability, performance and quality from summed components, "
        "with produced, good and scrap parts and `ideal_count` (planned time so far over the "
        "ideal cycle time; null for several products). Per agent: `status_interval_s` (as the "
        "agent reports it, else the median gap between its last status reports, else 60 s) "
        "and the instants `late_at` and `lost_at` after which, without a newer status report, "
        "it is late (2.5 intervals) or lost (10 intervals). No field depends on the time of "
        "the request, so polling with If-None-Match answers 304 until data changes."
    ),
)
async def plant_live(request: Request, site: SiteQ, line: LineQ = None) -> Response:
    visible = allowed_sites(request)
    now = datetime.now(UTC)

    def load(conn: Conn) -> dict[str, Any]:
        known = [s for s in queries.sites_list(conn, visible) if s["site_id"] == site]
        if not known:
            raise queries.NotFound(f"no site {site!r}")
        equipment = queries.equipment_list(conn, site, line, None, visible)
        if line is not None and not equipment:
            raise queries.NotFound(f"no line {line!r} at site {site!r}")
        members = [Member(e["site_id"], e["equipment_id"], e["line_id"]) for e in equipment]
        calendars, reported_zone = _calendars(conn, site)
        shifts: dict[str, tuple[str, datetime, datetime | None]] = {}
        for e in equipment:
            calendar = calendars.get(e["agent_id"] or "")
            found = shift_of(calendar, now) if calendar is not None else None
            if found is not None:
                shifts[e["equipment_id"]] = found
        missing = [e["equipment_id"] for e in equipment if e["equipment_id"] not in shifts]
        shifts.update(_newest_shifts(conn, site, missing, now))
        sums = _shift_sums(conn, site, shifts)
        states = _current_states(conn, members)
        book = target_book.load(conn, [site])
        machines = []
        for e in equipment:
            eq = e["equipment_id"]
            state = states.get(eq)
            shift = shifts.get(eq)
            row = sums.get(eq)
            figures: dict[str, Any] | None = None
            if row is not None:
                c = queries.components_of(row)
                figures = {
                    **ratios_of(c),
                    "produced": c.produced,
                    "good": c.good,
                    "scrap": c.scrap,
                    "planned_busy_s": c.planned_busy_s,
                    "production_s": c.production_s,
                    "ideal_count": ideal_count(e["config"], c.planned_busy_s),
                }
            machines.append(
                {
                    "equipment_id": eq,
                    "line_id": e["line_id"],
                    "agent_id": e["agent_id"],
                    "state": state["state"] if state else None,
                    "since": state["ts"] if state else None,
                    "reason": state["reason"] if state else None,
                    # Targets of the ratios of the shift (equipment > line > site).
                    **target_book.beside(
                        figures or dict.fromkeys(RATIO_NAMES),
                        target_book.only(book.of_equipment(site, eq, e["line_id"]), RATIO_NAMES),
                    ),
                    "shift": {
                        "name": shift[0],
                        "start": shift[1],
                        "end": shift[2],
                        **(figures or {}),
                    }
                    if shift
                    else None,
                }
            )
        return {
            "site_id": site,
            "site_name": known[0]["name"],
            "timezone": known[0]["timezone"] or reported_zone,
            "line": line,
            "equipment": machines,
            "agents": _agents(conn, site),
        }

    payload = await db(request, load)
    return respond(request, payload, payload["equipment"])


@router.get(
    "/plant/states",
    summary="State timelines of every equipment of a site or line, in one request",
    description=(
        "The intervals of `/v1/equipment/{id}/states` for all equipment of the site (or "
        "line), clipped to [from, to) and to now, ordered by start; `limit` bounds the rows."
    ),
)
async def plant_states(
    request: Request,
    site: SiteQ,
    from_: Annotated[datetime, Query(alias="from", description="inclusive, ISO 8601")],
    to: Annotated[datetime, Query(description="exclusive, ISO 8601 with offset")],
    line: LineQ = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 50_000,
) -> Response:
    start, end = window(from_, to)
    visible = allowed_sites(request)

    def load(conn: Conn) -> dict[str, Any]:
        if line is None:
            members = queries.resolve_scope(conn, "site", site, None, visible)
        else:
            members = queries.resolve_scope(conn, "line", line, site, visible)
        rows = queries.state_intervals(conn, members, start, end, limit=limit)
        return {
            "site": site,
            "line": line,
            "from": start,
            "to": end,
            "equipment": [m.equipment_id for m in members],
            "intervals": rows,
            "truncated": len(rows) >= limit,
        }

    payload = await db(request, load)
    return respond(request, payload, payload["intervals"], closed=end <= datetime.now(UTC))
