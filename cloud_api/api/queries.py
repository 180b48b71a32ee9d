"""The query layer of the read API: SQL over registry, facts and rollups, nothing HTTP.

Every function takes `sites`, the set of sites the caller may see (None = all), and applies
it in SQL, so access scoping is enforced by the database query itself.

Time series sum additive components and never average ratios. Buckets are aligned in the
requested IANA time zone with PostgreSQL's zone-aware `date_trunc`, so a DST day is 23 or 25
hours. Sources: 1-hour rollups for whole hours when every offset of the zone in the window
is a whole number of hours (and the interval is 1h or longer), 1-minute rollups for the rest
(the partial hours at the window's edges, zones like Asia/Kolkata, 1m/15m intervals), and
the OEE buckets themselves for interval=shift (grouped by shift and shift start).
"""

from __future__ import annotations

import base64
import functools
import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, NamedTuple
from zoneinfo import ZoneInfo

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import TypeAdapter, ValidationError

from cloud_api import metrics
from common.checks import validate
from oee.calendar import ShiftCalendar
from oee.components import (
    COMPONENT_FIELDS,
    INTEGER_FIELDS,
    QUANTITY_FIELDS,
    TIME_FIELDS,
    Components,
)
from oee.config import ShiftSpec

Interval = Literal["1m", "15m", "1h", "shift", "1d", "1w", "1mo"]
ScopeKind = Literal["site", "line", "equipment"]
GroupBy = Literal["none", "site", "line", "equipment"]
INTERVAL_SECONDS: dict[str, int] = {
    "1m": 60, "15m": 900, "1h": 3600, "1d": 86400, "1w": 7 * 86400, "1mo": 31 * 86400,
}  # fmt: skip
AUTO_INTERVALS: tuple[Interval, ...] = ("1m", "15m", "1h", "1d", "1w", "1mo")
MAX_POINTS = 100_000
LOSS_CLASSES: tuple[str, ...] = ("fault_s", "idle_s", "setup_s", "unknown_s")
STOP_STATES: tuple[str, ...] = ("fault", "idle")

Conn = psycopg.Connection[Any]


class NotFound(LookupError):
    """The scope names nothing the caller may see."""


class Ambiguous(LookupError):
    """An equipment id exists at several visible sites; the caller must name the site."""


@dataclass(frozen=True)
class Member:
    site_id: str
    equipment_id: str
    line_id: str | None


@dataclass(frozen=True)
class Bucket:
    group: tuple[str | None, str | None]
    start: datetime
    end: datetime | None
    shift: str | None
    components: Components


def _values_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row of sums as Components' fields (NULL counts as zero; numeric sums become int)."""
    return {
        c: int(row[c] or 0) if c in INTEGER_FIELDS else float(row[c] or 0.0)
        for c in COMPONENT_FIELDS
    }


def components_of(row: Mapping[str, Any]) -> Components:
    """Components from a row of sums (NULL counts as zero; numeric sums become int)."""
    return Components(**_values_of(row))


# Validates a list of rows in one call: a third of the CPU of validating them one by one
# (8 rows: 34 against 102 microseconds), the same model and constraints.
_COMPONENTS_LIST: TypeAdapter[list[Components]] = TypeAdapter(list[Components])


def components_of_rows(rows: Sequence[Mapping[str, Any]]) -> list[Components]:
    """`components_of` of each row, validated together."""
    return _COMPONENTS_LIST.validate_python([_values_of(r) for r in rows])


def pooled(parts: Iterable[Components]) -> Components:
    """The exact sum of several windows' components (Components.pool with one validation)."""
    total: dict[str, Any] = dict.fromkeys(COMPONENT_FIELDS, 0)
    for part in parts:
        values = part.__dict__
        for c in COMPONENT_FIELDS:
            total[c] += values[c]
    return components_of(total)


def _sums(prefix: str = "") -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("COALESCE(sum({p}{c}), 0) AS {c}").format(p=sql.SQL(prefix), c=sql.Identifier(c))
        for c in COMPONENT_FIELDS
    )


_COLS = sql.SQL(", ").join(sql.Identifier(c) for c in COMPONENT_FIELDS)
_SCOPE_CTE = sql.SQL(
    "WITH scope AS (SELECT * FROM unnest(%(m_site)s::text[], %(m_eq)s::text[], "
    "%(m_line)s::text[]) AS t(site_id, equipment_id, line_id)) "
)


def run(
    conn: Conn, name: str, stmt: sql.Composed | sql.SQL | bytes, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Execute one read query, timing it into the database latency histogram."""
    started = time.perf_counter()
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(stmt, params)
        rows: list[dict[str, Any]] = cur.fetchall()
    metrics.child(metrics.DB_LATENCY, name).observe(time.perf_counter() - started)
    return rows


# -- scope --------------------------------------------------------------------------------


def _scope_sql(kind: ScopeKind) -> str:
    return (
        "SELECT site_id, equipment_id, line_id FROM registry.equipment "
        "WHERE (%(sites)s::text[] IS NULL OR site_id = ANY(%(sites)s)) "
        "AND (%(site)s::text IS NULL OR site_id = %(site)s) AND "
        + {
            "site": "site_id = %(id)s",
            "line": "line_id = %(id)s",
            "equipment": "equipment_id = %(id)s",
        }[kind]
    )


def resolve_scope(
    conn: Conn, kind: ScopeKind, ident: str, site: str | None, sites: list[str] | None
) -> list[Member]:
    """The equipment a scope covers among the visible sites; NotFound if none."""
    rows = run(
        conn,
        "scope",
        sql.SQL(_scope_sql(kind) + " ORDER BY site_id, equipment_id"),
        {"sites": sites, "site": site, "id": ident},
    )
    return _members(conn, kind, ident, sites, rows)


def _members(
    conn: Conn, kind: ScopeKind, ident: str, sites: list[str] | None, rows: list[dict[str, Any]]
) -> list[Member]:
    if not rows:
        exists = run(
            conn,
            "scope",
            sql.SQL(
                "SELECT 1 FROM registry.sites WHERE site_id = %(id)s "
                "AND (%(sites)s::text[] IS NULL OR site_id = ANY(%(sites)s))"
            ),
            {"id": ident, "sites": sites},
        )
        if kind == "site" and exists:
            return []
        raise NotFound(f"no {kind} {ident!r}")
    members = [Member(r["site_id"], r["equipment_id"], r["line_id"]) for r in rows]
    if kind == "equipment" and len({m.site_id for m in members}) > 1:
        raise Ambiguous(f"equipment {ident!r} exists at several sites: pass site=")
    return members


def _scope_params(members: Sequence[Member]) -> dict[str, Any]:
    return {
        "m_site": [m.site_id for m in members],
        "m_eq": [m.equipment_id for m in members],
        "m_line": [m.line_id for m in members],
    }


# -- time ---------------------------------------------------------------------------------


# The offsets of a zone are looked at every this often (and at both ends of a window): no
# zone keeps an offset for less than 12 hours.
_OFFSET_STEP = timedelta(hours=12)


def _whole_hour_at(tz: ZoneInfo, t: datetime) -> bool:
    offset = t.astimezone(tz).utcoffset()
    return offset is not None and not offset.total_seconds() % 3600


def _whole_hour_span(tz: ZoneInfo, start: datetime, end: datetime) -> bool:
    """Every offset of `tz` at `start`, `end` and each 12-hour step from `start` between."""
    t = start
    while True:
        if not _whole_hour_at(tz, t):
            return False
        if t >= end:
            return True
        t = min(end, t + _OFFSET_STEP)


@functools.lru_cache(maxsize=4096)
def _whole_hour_year(key: str, year: int) -> bool:
    """Every offset of zone `key` at each UTC midnight and noon of `year`."""
    tz = ZoneInfo(key)
    try:
        return _whole_hour_span(
            tz, datetime(year, 1, 1, tzinfo=UTC), datetime(year, 12, 31, 12, tzinfo=UTC)
        )
    except OverflowError:  # the edge of the calendar: the window's own looks decide
        return False


def whole_hour_zone(tz: ZoneInfo, start: datetime, end: datetime) -> bool:
    """True when every UTC offset of `tz` in [start, end] is a whole number of hours.

    Offsets are looked at both ends and at least every 12 hours between. A year whose UTC
    midnights and noons all have whole-hour offsets is known after its first look (cached
    per zone and year): one machine's year by month looked 730 times per request before.
    When a year of the window has another offset somewhere, the window is looked at as a
    whole, 12-hourly from its start.
    """
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    if not (_whole_hour_at(tz, start) and _whole_hour_at(tz, end)):
        return False
    if tz.key is not None and all(
        _whole_hour_year(tz.key, year) for year in range(start.year, end.year + 1)
    ):
        return True
    return _whole_hour_span(tz, start, end)


def choose_interval(start: datetime, end: datetime, max_points: int) -> Interval:
    """The finest interval giving at most `max_points` buckets (1mo if none does)."""
    span = (end - start).total_seconds()
    for interval in AUTO_INTERVALS:
        if span / INTERVAL_SECONDS[interval] <= max_points:
            return interval
    return "1mo"


def bucket_end(label: datetime, interval: Interval, tz: ZoneInfo) -> datetime:
    """The end of the bucket starting at `label`, in wall-clock terms of `tz`."""
    if interval in ("1m", "15m", "1h"):
        return label + timedelta(seconds=INTERVAL_SECONDS[interval])
    local = label.astimezone(tz)
    if interval == "1d":
        nxt = (local.replace(tzinfo=None) + timedelta(days=1)).replace(tzinfo=tz)
    elif interval == "1w":
        nxt = (local.replace(tzinfo=None) + timedelta(days=7)).replace(tzinfo=tz)
    else:
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        nxt = local.replace(year=year, month=month, day=1, tzinfo=tz)
    return nxt.astimezone(UTC)


def _label(interval: Interval) -> sql.Composable:
    if interval == "1m":
        return sql.SQL("r.bucket")
    if interval == "15m":
        return sql.SQL(
            "date_trunc('hour', r.bucket, %(tz)s) + make_interval(mins => "
            "(extract(minute FROM r.bucket AT TIME ZONE %(tz)s)::int / 15) * 15)"
        )
    unit = {"1h": "hour", "1d": "day", "1w": "week", "1mo": "month"}[interval]
    return sql.SQL("date_trunc({}, r.bucket, %(tz)s)").format(sql.Literal(unit))


def _group_cols(group_by: GroupBy) -> sql.Composable:
    return sql.SQL(
        {
            "none": "NULL::text AS g_site, NULL::text AS g_id",
            "site": "s.site_id AS g_site, NULL::text AS g_id",
            "line": "s.site_id AS g_site, s.line_id AS g_id",
            "equipment": "s.site_id AS g_site, s.equipment_id AS g_id",
        }[group_by]
    )


def _rollup_parts(
    start: datetime, end: datetime, hourly: bool
) -> list[tuple[str, datetime, datetime]]:
    if hourly:
        first = start.replace(minute=0, second=0, microsecond=0)
        if first < start:
            first += timedelta(hours=1)
        last = end.replace(minute=0, second=0, microsecond=0)
        if first < last:
            parts = [("oee_1h", first, last)]
            if start < first:
                parts.append(("oee_1m", start, first))
            if last < end:
                parts.append(("oee_1m", last, end))
            return parts
    return [("oee_1m", start, end)]


# The data watermark of the scope's days, as one more column of a series query: an
# uncorrelated subquery, so PostgreSQL computes it once per statement, in the same snapshot.
_MARK_COLUMN = (
    ", (SELECT COALESCE(max(v.version), 0) FROM rollups.data_versions v "
    "JOIN scope x USING (site_id, equipment_id) "
    "WHERE v.day >= %(d0)s AND v.day <= %(d1)s) AS mark"
)


# The targets of the scope's sites (targets.TARGETS_SQL) as one more column, for the same
# reason: one JSON text of [site, scope, scope id, kpi, source, value] rows, NULL for none.
_TARGETS_COLUMN = (
    ", (SELECT json_agg(json_build_array(t.site_id, t.scope, t.scope_id, t.kpi, t.source,"
    " t.value))::text FROM registry.targets t"
    " WHERE t.site_id = ANY(%(t_sites)s::text[])) AS targets"
)


def _rollup_selects(
    tables: tuple[str, ...], columns: str, lower: str, upper: str
) -> list[sql.Composed]:
    """One SELECT per rollup table of a series: the scope row's equipment (`s`), its buckets
    from `lower` to `upper` (SQL around the table's own bounds, placeholders lo{i} and hi{i})."""
    return [
        sql.SQL(
            f"SELECT {columns} FROM rollups.{{table}} "
            "WHERE site_id = s.site_id AND equipment_id = s.equipment_id "
            f"AND bucket >= {lower} AND bucket < {upper}"
        ).format(
            cols=_COLS,
            table=sql.Identifier(table),
            lo=sql.Placeholder(f"lo{i}"),
            hi=sql.Placeholder(f"hi{i}"),
        )
        for i, table in enumerate(tables)
    ]


@functools.lru_cache(maxsize=256)
def _series_sql(
    group_by: GroupBy,
    interval: Interval,
    tables: tuple[str, ...],
    marked: bool,
    with_targets: bool = False,
) -> bytes:
    """The query of oee_series for one shape of request, composed once."""
    mark = sql.SQL((_MARK_COLUMN if marked else "") + (_TARGETS_COLUMN if with_targets else ""))
    if interval == "shift":
        stmt = _SCOPE_CTE + sql.SQL(
            "SELECT {groups}, b.shift, b.shift_start AS label, max(b.bucket_end) AS bucket_end, "
            "{sums}{mark} FROM facts.oee_buckets b JOIN scope s USING (site_id, equipment_id) "
            "WHERE b.bucket_start >= %(start)s AND b.bucket_start < %(end)s "
            "AND b.shift_start IS NOT NULL "
            "GROUP BY g_site, g_id, b.shift, b.shift_start ORDER BY g_site, g_id, label, shift"
        ).format(groups=_group_cols(group_by), sums=_sums("b."), mark=mark)
        return stmt.as_bytes(None)
    selects = _rollup_selects(tables, "bucket, {cols}", "{lo}", "{hi}")
    # One primary-key range scan per equipment, whatever the table's size: OFFSET 0 keeps
    # the planner from flattening the LATERAL subquery into a hash join over a full scan.
    stmt = _SCOPE_CTE + sql.SQL(
        "SELECT {groups}, {label} AS label, {sums}{mark} FROM scope s "
        "CROSS JOIN LATERAL (SELECT * FROM ({union}) u OFFSET 0) r "
        "GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    ).format(
        groups=_group_cols(group_by),
        label=_label(interval),
        sums=_sums("r."),
        mark=mark,
        union=sql.SQL(" UNION ALL ").join(selects),
    )
    return stmt.as_bytes(None)


# Sums per bucket of a day, week or month as index range scans: the bucket bounds come from
# Python (local_buckets), and each equipment's rows of each bucket are summed on their own
# (LATERAL), so no row is converted to the zone and no row is sorted. On one year of hourly
# rows this halved the database's time of a year by month and of a site's 30 days by day.
# Empty (equipment, bucket) pairs are left out, as the grouping of rows leaves them out.
@functools.lru_cache(maxsize=256)
def _ranged_series_sql(
    group_by: GroupBy, tables: tuple[str, ...], marked: bool, with_targets: bool
) -> bytes:
    mark = sql.SQL((_MARK_COLUMN if marked else "") + (_TARGETS_COLUMN if with_targets else ""))
    selects = _rollup_selects(tables, "{cols}", "greatest(b.lo, {lo})", "least(b.hi, {hi})")
    inner = sql.SQL(", ").join(
        sql.SQL("sum({c}) AS {c}").format(c=sql.Identifier(c)) for c in COMPONENT_FIELDS
    )
    stmt = _SCOPE_CTE + sql.SQL(
        "SELECT {groups}, b.lo AS label, {sums}{mark} FROM scope s "
        "CROSS JOIN unnest(%(b_lo)s::timestamptz[], %(b_hi)s::timestamptz[]) AS b(lo, hi) "
        "CROSS JOIN LATERAL (SELECT count(*) AS n, {inner} FROM ({union}) u) r "
        "WHERE r.n > 0 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    ).format(
        groups=_group_cols(group_by),
        sums=_sums("r."),
        mark=mark,
        inner=inner,
        union=sql.SQL(" UNION ALL ").join(selects),
    )
    return stmt.as_bytes(None)


# The most buckets summed by ranges; longer series group their rows by date_trunc. And the
# fewest hourly rows (equipment times hours): a week of one machine (168 rows) took 0.96 ms
# by ranges and 0.83 ms grouped, one machine's year by month 6.5 ms and 10.2 ms.
MAX_RANGED_BUCKETS = 400
RANGED_MIN_ROWS = 1000


def _unique_instant(wall: datetime, tz: ZoneInfo) -> bool:
    """Whether the naive wall-clock time `wall` happens exactly once in `tz` (not skipped or
    repeated by a DST change)."""
    return wall.replace(tzinfo=tz).astimezone(UTC) == wall.replace(tzinfo=tz, fold=1).astimezone(
        UTC
    )


def local_buckets(
    start: datetime, end: datetime, interval: Interval, tz: ZoneInfo
) -> list[datetime] | None:
    """The starts (UTC) of the day, week or month buckets in `tz` that [start, end) touches,
    as PostgreSQL's `date_trunc(unit, bucket, tz)` labels the rows; None when one of them is
    a local midnight that is skipped or repeated (only then can a zone's date go back, and
    only `date_trunc` says what it makes of such a row), or when there are too many."""
    wall = start.astimezone(tz).replace(tzinfo=None, hour=0, minute=0, second=0, microsecond=0)
    if interval == "1w":
        wall -= timedelta(days=wall.weekday())  # ISO weeks start on Monday, as in PostgreSQL
    elif interval == "1mo":
        wall = wall.replace(day=1)
    elif interval != "1d":
        return None
    labels: list[datetime] = []
    while True:
        label = wall.replace(tzinfo=tz).astimezone(UTC)
        if label >= end:
            return labels
        if not _unique_instant(wall, tz) or len(labels) == MAX_RANGED_BUCKETS:
            return None
        labels.append(label)
        if interval == "1d":
            wall += timedelta(days=1)
        elif interval == "1w":
            wall += timedelta(days=7)
        else:
            year, month = (wall.year + 1, 1) if wall.month == 12 else (wall.year, wall.month + 1)
            wall = wall.replace(year=year, month=month)


class Series(NamedTuple):
    buckets: list[Bucket]
    source: str  # the tables the sums came from
    mark: int | None  # the data watermark of scope and window, when asked for
    # The targets rows of the scope's sites (site_id, scope, scope_id, kpi, source, value),
    # when asked for.
    targets: list[dict[str, Any]] | None = None


def oee_series(
    conn: Conn,
    members: Sequence[Member],
    start: datetime,
    end: datetime,
    interval: Interval,
    tz: ZoneInfo,
    group_by: GroupBy,
    *,
    marked: bool = False,
    with_targets: bool = False,
    ranged: bool = True,
) -> Series:
    """Summed components per (group, bucket) over [start, end).

    With `marked`, also the data watermark of the scope and window (data_watermark), and with
    `with_targets` the targets rows of the scope's sites (targets_rows): read in the same
    statement, hence the same snapshot and round trip (a second one only when no bucket has
    data). `ranged=False` groups every row by `date_trunc` even where bucket bounds would
    do (the reference the ranges are tested against).
    """
    if not members:
        return Series([], "none", 0 if marked else None, [] if with_targets else None)
    params: dict[str, Any] = {**_scope_params(members), "tz": tz.key}
    if marked:
        params.update(_days(start, end))
    if with_targets:
        params["t_sites"] = target_sites(members)
    if interval == "shift":
        params.update(start=start, end=end)
        rows = run(
            conn, "oee_shift", _series_sql(group_by, interval, (), marked, with_targets), params
        )
        buckets = [
            Bucket((r["g_site"], r["g_id"]), r["label"], r["bucket_end"], r["shift"], c)
            for r, c in zip(rows, components_of_rows(rows), strict=True)
        ]
        source = "facts.oee_buckets"
    else:
        hourly = interval in ("1h", "1d", "1w", "1mo") and whole_hour_zone(tz, start, end)
        parts = _rollup_parts(start, end, hourly)
        for i, (_table, lo, hi) in enumerate(parts):
            params[f"lo{i}"], params[f"hi{i}"] = lo, hi
        tables = tuple(table for table, _, _ in parts)
        # Short series (a week of one machine: 168 hourly rows) are quicker grouped.
        many = len(members) * (end - start).total_seconds() >= RANGED_MIN_ROWS * 3600
        labels = local_buckets(start, end, interval, tz) if ranged and hourly and many else None
        if labels:
            params["b_lo"], params["b_hi"] = labels, [*labels[1:], end]
            query = _ranged_series_sql(group_by, tables, marked, with_targets)
        else:
            query = _series_sql(group_by, interval, tables, marked, with_targets)
        rows = run(conn, f"oee_{interval}", query, params)
        buckets = [
            Bucket(
                (r["g_site"], r["g_id"]), r["label"], bucket_end(r["label"], interval, tz), None, c
            )
            for r, c in zip(rows, components_of_rows(rows), strict=True)
        ]
        source = "+".join(f"rollups.{t}" for t, _, _ in parts)
    mark = None
    if marked:
        mark = int(rows[0]["mark"]) if rows else data_watermark(conn, members, start, end)
    targets = None
    if with_targets:
        if rows:
            targets = [
                dict(zip(TARGET_COLUMNS, t, strict=True))
                for t in orjson.loads(rows[0]["targets"] or "[]")
            ]
        else:
            targets = targets_rows(conn, members)
    return Series(buckets, source, mark, targets)


TARGET_COLUMNS = ("site_id", "scope", "scope_id", "kpi", "source", "value")


def target_sites(members: Iterable[Member]) -> list[str]:
    return sorted({m.site_id for m in members})


def targets_rows(conn: Conn, members: Iterable[Member]) -> list[dict[str, Any]]:
    """The rows of registry.targets of the members' sites."""
    wanted = target_sites(members)
    if not wanted:
        return []
    return run(
        conn,
        "targets",
        sql.SQL(
            "SELECT site_id, scope, scope_id, kpi, source, value FROM registry.targets "
            "WHERE site_id = ANY(%(sites)s)"
        ),
        {"sites": wanted},
    )


def data_watermark(conn: Conn, members: Sequence[Member], start: datetime, end: datetime) -> int:
    """The largest data version of the scope's days touching [start, end) (0 if none)."""
    if not members:
        return 0
    rows = run(
        conn,
        "watermark",
        _SCOPE_CTE
        + sql.SQL(
            "SELECT COALESCE(max(v.version), 0) AS w FROM rollups.data_versions v "
            "JOIN scope s USING (site_id, equipment_id) WHERE v.day >= %(d0)s AND v.day <= %(d1)s"
        ),
        {**_scope_params(members), **_days(start, end)},
    )
    return int(rows[0]["w"])


def day_span(start: datetime, end: datetime) -> tuple[date, date]:
    """The UTC days (data_versions keys) that [start, end) touches, as d0..d1 inclusive."""
    return start.astimezone(UTC).date(), (end - timedelta(microseconds=1)).astimezone(UTC).date()


def _days(start: datetime, end: datetime) -> dict[str, Any]:
    d0, d1 = day_span(start, end)
    return {"d0": d0, "d1": d1}


# -- downtime, states, quality --------------------------------------------------------------


def pareto(
    conn: Conn,
    members: Sequence[Member],
    start: datetime,
    end: datetime,
    by: Literal["reason", "class"],
) -> list[tuple[str, float]]:
    """(label, seconds) of downtime by reason or loss class over [start, end), largest first."""
    if not members:
        return []
    params = {**_scope_params(members), "start": start, "end": end}
    if by == "reason":
        stmt = _SCOPE_CTE + sql.SQL(
            "SELECT d.key AS label, sum(d.value::float8) AS seconds "
            "FROM facts.oee_buckets b JOIN scope s USING (site_id, equipment_id) "
            "CROSS JOIN LATERAL jsonb_each_text(b.downtime_by_reason) d "
            "WHERE b.bucket_start >= %(start)s AND b.bucket_start < %(end)s "
            "GROUP BY 1 ORDER BY 2 DESC, 1"
        )
        rows = run(conn, "pareto_reason", stmt, params)
        totals = {r["label"]: float(r["seconds"]) for r in rows}
        for plc_reason, reason, seconds in reason_moves(conn, members, start, end):
            totals[plc_reason] = totals.get(plc_reason, 0.0) - seconds
            totals[reason] = totals.get(reason, 0.0) + seconds
        # Bucket seconds are whole microseconds: what a move leaves below one is nothing.
        items = [(label, s) for label, s in totals.items() if s >= 5e-7]
        return sorted(items, key=lambda i: (-i[1], i[0]))
    buckets = oee_series(conn, members, start, end, "1mo", ZoneInfo("UTC"), "none").buckets
    total = pooled(b.components for b in buckets)
    items = [(name.removesuffix("_s"), float(getattr(total, name))) for name in LOSS_CLASSES]
    return sorted((i for i in items if i[1] > 0), key=lambda i: (-i[1], i[0]))


# -- stops that people classify -------------------------------------------------------------
#
# A downtime annotation names a stop by its equipment and start: the `ts` of the state event
# (fault or idle) that began it. The newest annotation not deleted gives the stop's effective
# `reason` in every view; the PLC's own stays beside it as `plc_reason`. The OEE buckets keep
# the engine's downtime by the PLC's reason (they are facts from the edge and are never
# rewritten): the Pareto by reason adds, per annotated stop, a correction that moves the
# stop's seconds in the Pareto's buckets (those of a shift starting in the window), exactly
# its planned seconds there, from the PLC's reason to the annotated one (`reason_moves`).

_LIVE_ANNOTATION = (
    " LEFT JOIN LATERAL (SELECT a.annotation_id AS a_id, a.reason AS a_reason,"
    " a.note AS a_note, a.created_at AS a_at FROM facts.annotations a"
    " WHERE a.site_id = i.site_id AND a.equipment_id = i.equipment_id AND a.ts = i.began"
    " AND a.kind = 'downtime' AND a.deleted_at IS NULL AND i.state IN ('fault', 'idle')"
    " ORDER BY a.created_at DESC, a.annotation_id DESC LIMIT 1) an ON true"
)


def _classify(row: dict[str, Any]) -> None:
    """Give an interval row its effective reason, the PLC's beside it, its annotation, and for
    a stop `stop_start`: the instant of the state event that began it, the `ts` an annotation
    names it by (before `start` when the window cuts the stop; None for other states)."""
    began = row.pop("began", None)
    row["stop_start"] = began if row["state"] in STOP_STATES else None
    annotation_id = row.pop("a_id", None)
    reason, note, at = row.pop("a_reason", None), row.pop("a_note", None), row.pop("a_at", None)
    row["plc_reason"] = row["reason"]
    if annotation_id is None:
        row["annotation"] = None
        return
    row["reason"] = reason
    # Plain JSON values: a CSV export writes the object as one JSON cell.
    row["annotation"] = {
        "annotation_id": str(annotation_id),
        "note": note,
        "created_at": at.astimezone(UTC).isoformat(),
    }


def reason_moves(
    conn: Conn, members: Sequence[Member], start: datetime, end: datetime
) -> list[tuple[str, str, float]]:
    """(PLC reason, annotated reason, seconds) per annotated stop with seconds in the buckets
    the Pareto over [start, end) sums: the stop's time in each bucket of a shift, at most the
    seconds that bucket holds for the PLC's reason (a micro-stop counted as production has
    none to move)."""
    if not members:
        return []
    # facts.stop_reason_moves (migration 0036) is also what the Grafana Pareto panel reads.
    rows = run(
        conn,
        "pareto_annotations",
        sql.SQL(
            "SELECT site_id, equipment_id, plc_reason, reason, seconds"
            " FROM facts.stop_reason_moves(%(sites)s, %(eqs)s, %(start)s, %(end)s)"
        ),
        {
            "sites": sorted({m.site_id for m in members}),
            "eqs": sorted({m.equipment_id for m in members}),
            "start": start,
            "end": end,
        },
    )
    # The function takes site and equipment lists: keep the scope's own pairs.
    pairs = {(m.site_id, m.equipment_id) for m in members}
    rows = [r for r in rows if (r["site_id"], r["equipment_id"]) in pairs]
    return [(r["plc_reason"], r["reason"], float(r["seconds"])) for r in rows]


def _intervals_sql(select: str) -> sql.Composed:
    """`select` over `intervals`: the state intervals clipped to [start, end) and to `stop`."""
    return _SCOPE_CTE + sql.SQL(
        ", intervals AS (SELECT * FROM ("
        " SELECT x.site_id, x.equipment_id, x.body->>'state' AS state,"
        " x.body->>'previous' AS previous, x.body->>'reason' AS reason,"
        " greatest(x.ts, %(start)s) AS start, x.ts AS began,"
        " least(COALESCE(lead(x.ts) OVER w, nxt.ts, %(stop)s), %(stop)s) AS end"
        " FROM scope s"
        " CROSS JOIN LATERAL ("
        "  (SELECT e.site_id, e.equipment_id, e.ts, e.event_id, e.body FROM facts.events e"
        "   WHERE e.site_id = s.site_id AND e.equipment_id = s.equipment_id"
        "   AND e.kind = 'state' AND e.ts < %(start)s ORDER BY e.ts DESC, e.event_id DESC LIMIT 1)"
        "  UNION ALL"
        "  (SELECT e.site_id, e.equipment_id, e.ts, e.event_id, e.body FROM facts.events e"
        "   WHERE e.site_id = s.site_id AND e.equipment_id = s.equipment_id"
        "   AND e.kind = 'state' AND e.ts >= %(start)s AND e.ts < %(end)s)"
        " ) x"
        " LEFT JOIN LATERAL (SELECT e.ts FROM facts.events e WHERE e.site_id = s.site_id"
        "  AND e.equipment_id = s.equipment_id AND e.kind = 'state' AND e.ts >= %(end)s"
        "  ORDER BY e.ts LIMIT 1) nxt ON true"
        " WINDOW w AS (PARTITION BY x.site_id, x.equipment_id ORDER BY x.ts, x.event_id)"
        ") i WHERE i.end > i.start"
        " AND (%(states)s::text[] IS NULL OR i.state = ANY(%(states)s))) " + select
    )


def state_intervals(
    conn: Conn,
    members: Sequence[Member],
    start: datetime,
    end: datetime,
    *,
    states: Sequence[str] | None = None,
    min_duration_s: float = 0.0,
    limit: int = 10_000,
) -> list[dict[str, Any]]:
    """State intervals from state events, clipped to [start, end) and to now.

    The state at `start` is the last state event before it; an interval ends at the next
    state event of the same equipment (which may lie after `end`).
    """
    if not members:
        return []
    stmt = _intervals_sql(
        "SELECT i.*, an.* FROM intervals i" + _LIVE_ANNOTATION + " WHERE"
        " extract(epoch FROM i.end - i.start) >= %(min)s"
        " ORDER BY i.start, i.site_id, i.equipment_id LIMIT %(limit)s"
    )
    rows = run(
        conn,
        "states",
        stmt,
        {
            **_scope_params(members),
            "start": start,
            "end": end,
            "stop": min(end, datetime.now(UTC)),
            "states": list(states) if states is not None else None,
            "min": min_duration_s,
            "limit": limit,
        },
    )
    for r in rows:
        _classify(r)
        r["duration_s"] = (r["end"] - r["start"]).total_seconds()
    return rows


def hh_mm(node: Any) -> Any:
    """Agents report clock times as pydantic writes them ("06:00:00"); the shift model reads
    "HH:MM" (its YAML form). Whole minutes are cut back; anything else stays."""
    if isinstance(node, dict):
        return {k: hh_mm(v) for k, v in node.items()}
    if isinstance(node, list):
        return [hh_mm(v) for v in node]
    if isinstance(node, str) and len(node) == 8 and node[2] == ":" and node.endswith(":00"):
        return node[:5]
    return node


def shift_calendars(
    conn: Conn, site_ids: Sequence[str]
) -> tuple[dict[tuple[str, str], ShiftCalendar], dict[str, str | None]]:
    """The shift calendar each agent of the sites last reported, by (site, agent), as the
    engine's own ShiftCalendar; and per site the newest reported time zone. A calendar the
    engine would not accept is left out."""
    rows = run(
        conn,
        "shift_calendars",
        sql.SQL(
            "SELECT site_id, agent_id, timezone, shifts FROM registry.shift_calendars "
            "WHERE site_id = ANY(%(sites)s) ORDER BY reported_at"
        ),
        {"sites": list(site_ids)},
    )
    calendars: dict[tuple[str, str], ShiftCalendar] = {}
    zones: dict[str, str | None] = {}
    for r in rows:
        zones[r["site_id"]] = r["timezone"] or zones.get(r["site_id"])
        try:
            shifts = [validate(ShiftSpec, hh_mm(s)) for s in r["shifts"] or []]
            if shifts:
                calendars[r["site_id"], r["agent_id"]] = ShiftCalendar(
                    shifts, r["timezone"] or "UTC"
                )
        except (ValidationError, ValueError, KeyError):
            continue
    return calendars, zones


def stops(
    conn: Conn,
    members: Sequence[Member],
    start: datetime,
    end: datetime,
    *,
    min_duration_s: float = 0.0,
    limit: int = 10_000,
) -> list[dict[str, Any]]:
    """Stops (fault and idle intervals) clipped to [start, end) and to now, each with its
    downtime: the planned seconds within it (`duration_s`), beside its wall-clock length
    (`wall_s`). A stop with no planned second is left out; `min_duration_s` applies to the
    planned seconds.

    Planned time is read from the equipment's stored OEE buckets (those in a shift), which are
    the engine's own classification of every instant, exact to the microsecond and the very
    rows the Pareto and `downtime_s` sum, whatever calendar was in force then. Past the end of
    the last stored bucket (the bucket still open on the agent) the shift calendar its agent
    last reported decides, through the engine's ShiftCalendar; with no calendar reported, that
    part counts in full.
    """
    if not members:
        return []
    stmt = _intervals_sql(
        "SELECT i.*, an.*, k.known_until, p.planned FROM intervals i"
        + _LIVE_ANNOTATION
        + " LEFT JOIN LATERAL (SELECT b.bucket_end AS known_until FROM facts.oee_buckets b"
        "  WHERE b.site_id = i.site_id AND b.equipment_id = i.equipment_id"
        "  ORDER BY b.bucket_start DESC LIMIT 1) k ON true"
        " CROSS JOIN LATERAL (SELECT COALESCE(sum(extract(epoch FROM"
        "  least(i.end, b.bucket_end) - greatest(i.start, b.bucket_start))), 0) AS planned"
        "  FROM facts.oee_buckets b WHERE b.site_id = i.site_id"
        "  AND b.equipment_id = i.equipment_id AND b.shift IS NOT NULL"
        "  AND b.bucket_start < i.end AND b.bucket_end > i.start) p"
        # An upper bound of the planned seconds (the part after the last bucket in full):
        # the exact figure is the calendar's, below.
        " CROSS JOIN LATERAL (SELECT p.planned + greatest(0, extract(epoch FROM i.end"
        "  - greatest(i.start, COALESCE(k.known_until, i.start)))) AS most) u"
        " WHERE u.most > 0 AND u.most >= %(min)s"
        " ORDER BY i.start, i.site_id, i.equipment_id LIMIT %(limit)s"
    )
    params = {
        **_scope_params(members),
        "start": start,
        "end": end,
        "stop": min(end, datetime.now(UTC)),
        "states": list(STOP_STATES),
        "min": min_duration_s,
    }
    calendars: dict[tuple[str, str], ShiftCalendar] | None = None
    agents: dict[tuple[str, str], str | None] = {}
    fetch = limit
    while True:
        raw = run(conn, "stops", stmt, {**params, "limit": fetch})
        out = []
        for r in raw:
            known_until = r.pop("known_until")
            planned = float(r.pop("planned"))
            tail_from = r["start"] if known_until is None else max(r["start"], known_until)
            if tail_from < r["end"]:
                if calendars is None:
                    calendars, _ = shift_calendars(conn, sorted({m.site_id for m in members}))
                    agents = _agents_of(conn, members)
                agent = agents.get((r["site_id"], r["equipment_id"]))
                calendar = calendars.get((r["site_id"], agent or ""))
                planned += _planned_s(calendar, tail_from, r["end"])
            if planned <= 0 or planned < min_duration_s:
                continue
            _classify(r)
            r["duration_s"] = planned
            r["wall_s"] = (r["end"] - r["start"]).total_seconds()
            out.append(r)
        # Rows judged in Python only (their part after the last bucket) may drop out: fetch
        # more until `limit` stops are found or the rows are exhausted.
        if len(out) >= limit or len(raw) < fetch:
            return out[:limit]
        fetch += limit - len(out)


def _planned_s(calendar: ShiftCalendar | None, start: datetime, end: datetime) -> float:
    """Planned seconds of [start, end) by a shift calendar; all of them with none."""
    if calendar is None:
        return (end - start).total_seconds()
    total = timedelta(0)
    for w in calendar.windows(start, end):
        if w.planned:
            total += w.end - w.start
    return total.total_seconds()


def _agents_of(conn: Conn, members: Sequence[Member]) -> dict[tuple[str, str], str | None]:
    rows = run(
        conn,
        "equipment_agents",
        _SCOPE_CTE
        + sql.SQL(
            "SELECT e.site_id, e.equipment_id, e.agent_id FROM registry.equipment e"
            " JOIN scope s USING (site_id, equipment_id)"
        ),
        _scope_params(members),
    )
    return {(r["site_id"], r["equipment_id"]): r["agent_id"] for r in rows}


# Integers a JSON consumer holds exactly (I-JSON, RFC 7493). Ingest refuses larger ones, but
# events stored before it did may hold any JSON number (10**30 once made /v1/quality and
# /v1/events answer 500). A count event with a quantity out of this range (or not an integer)
# is left out of the sums and counted instead; nothing is cast that cannot be.
SAFE_INTEGER = 2**53 - 1
COUNT_QUANTITIES: tuple[str, ...] = ("produced", "good", "scrap", "rework")
_COUNTS_IN_RANGE = " AND ".join(
    f"CASE jsonb_typeof(e.body->'{q}') WHEN 'number' THEN "
    f"abs((e.body->'{q}')::numeric) <= {SAFE_INTEGER} AND scale((e.body->'{q}')::numeric) = 0 "
    f"WHEN 'null' THEN true ELSE e.body->'{q}' IS NULL END"
    for q in COUNT_QUANTITIES
)


def counts_out_of_range(
    conn: Conn, members: Sequence[Member], start: datetime, end: datetime
) -> int:
    """Count events in [start, end) that `quality` leaves out (a quantity out of range)."""
    if not members:
        return 0
    stmt = _SCOPE_CTE + sql.SQL(
        "SELECT count(*) AS n FROM facts.events e JOIN scope s USING (site_id, equipment_id)"
        " WHERE e.kind = 'count' AND e.ts >= %(start)s AND e.ts < %(end)s"
        " AND NOT (" + _COUNTS_IN_RANGE + ")"
    )
    rows = run(
        conn, "quality_out_of_range", stmt, {**_scope_params(members), "start": start, "end": end}
    )
    return int(rows[0]["n"])


def quality(
    conn: Conn, members: Sequence[Member], start: datetime, end: datetime
) -> list[dict[str, Any]]:
    """Produced/good/scrap/rework per equipment and product from count events; each carries
    what its increment changed in the buckets (oee/quantities.py, migration 0030)."""
    if not members:
        return []
    stmt = _SCOPE_CTE + sql.SQL(
        "SELECT e.site_id, e.equipment_id, e.body->>'product' AS product,"
        " sum((e.body->>'produced')::bigint) AS produced, sum((e.body->>'good')::bigint) AS good,"
        " sum((e.body->>'scrap')::bigint) AS scrap, sum((e.body->>'rework')::bigint) AS rework"
        " FROM facts.events e JOIN scope s USING (site_id, equipment_id)"
        " WHERE e.kind = 'count' AND e.ts >= %(start)s AND e.ts < %(end)s"
        " AND COALESCE((e.body->>'in_plan')::boolean, true) AND "
        + _COUNTS_IN_RANGE
        + " GROUP BY 1, 2, 3 ORDER BY sum((e.body->>'scrap')::bigint) DESC, 1, 2, 3"
    )
    rows = run(conn, "quality", stmt, {**_scope_params(members), "start": start, "end": end})
    for r in rows:
        for k in ("produced", "good", "scrap", "rework"):
            r[k] = int(r[k] or 0)
    return rows


def scrap_by_reason(
    conn: Conn, members: Sequence[Member], start: datetime, end: datetime
) -> list[dict[str, Any]]:
    """Scrap per equipment and scrap reason from count events: each carries the scrap reason
    in force when its scrap was counted (equipment with a scrap_reason signal); scrap without
    one is under "unspecified". Sums to the scrap of `quality`."""
    if not members:
        return []
    stmt = _SCOPE_CTE + sql.SQL(
        "SELECT e.site_id, e.equipment_id,"
        " COALESCE(e.body->>'scrap_reason', 'unspecified') AS reason,"
        " sum((e.body->>'scrap')::bigint) AS scrap"
        " FROM facts.events e JOIN scope s USING (site_id, equipment_id)"
        " WHERE e.kind = 'count' AND e.ts >= %(start)s AND e.ts < %(end)s"
        " AND COALESCE((e.body->>'in_plan')::boolean, true)"
        " AND COALESCE((e.body->>'scrap')::numeric, 0) <> 0 AND "
        + _COUNTS_IN_RANGE
        + " GROUP BY 1, 2, 3 ORDER BY sum((e.body->>'scrap')::bigint) DESC, 1, 2, 3"
    )
    rows = run(
        conn, "scrap_by_reason", stmt, {**_scope_params(members), "start": start, "end": end}
    )
    for r in rows:
        r["scrap"] = int(r["scrap"] or 0)
    return rows


# -- events -------------------------------------------------------------------------------


# A cursor this API returns has about 110 characters.
MAX_CURSOR = 256


def encode_cursor(ts: datetime, event_id: str) -> str:
    raw = json.dumps([ts.isoformat(), str(event_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raises ValueError for anything that is not a cursor this API returned: the shape is
    checked here, so that no value of it reaches PostgreSQL as a cast that fails there."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, event_id = json.loads(raw)
        if not isinstance(ts, str) or not isinstance(event_id, str):
            raise TypeError("a cursor holds two strings")
        at = datetime.fromisoformat(ts)
        if at.utcoffset() is None:
            raise ValueError("a cursor's time has an offset")
        return at.astimezone(UTC), str(uuid.UUID(event_id))
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError("not a cursor returned by this API") from exc


def events_page(
    conn: Conn,
    site_ids: Sequence[str],
    members: Sequence[Member] | None,
    start: datetime,
    end: datetime,
    kinds: Sequence[str] | None,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Events in (ts, event_id) order after the cursor; `members` None means whole sites."""
    stmt = sql.SQL(
        "SELECT site_id, ts, event_id::text AS event_id, agent_id, epoch, seq, equipment_id, "
        "kind, body FROM facts.events WHERE site_id = ANY(%(sites)s) "
        "AND ts >= %(start)s AND ts < %(end)s "
        "AND (%(kinds)s::text[] IS NULL OR kind = ANY(%(kinds)s)) "
        "AND (%(eqs)s::text[] IS NULL OR equipment_id = ANY(%(eqs)s)) "
        "AND (%(cts)s::timestamptz IS NULL OR (ts, event_id) > (%(cts)s, %(cid)s::uuid)) "
        "ORDER BY ts, event_id LIMIT %(limit)s"
    )
    return run(
        conn,
        "events",
        stmt,
        {
            "sites": list(site_ids),
            "start": start,
            "end": end,
            "kinds": list(kinds) if kinds else None,
            "eqs": [m.equipment_id for m in members] if members is not None else None,
            "cts": after[0] if after else None,
            "cid": after[1] if after else None,
            "limit": limit,
        },
    )


# -- hierarchy and fleet ------------------------------------------------------------------


def sites_list(conn: Conn, sites: list[str] | None) -> list[dict[str, Any]]:
    return run(
        conn,
        "sites",
        sql.SQL(
            "SELECT s.site_id, s.name, s.timezone,"
            " (SELECT count(*) FROM registry.lines l WHERE l.site_id = s.site_id) AS lines,"
            " (SELECT count(*) FROM registry.equipment e WHERE e.site_id = s.site_id)"
            " AS equipment,"
            " (SELECT count(*) FROM registry.agents a WHERE a.site_id = s.site_id) AS agents"
            " FROM registry.sites s"
            " WHERE (%(sites)s::text[] IS NULL OR s.site_id = ANY(%(sites)s)) ORDER BY 1"
        ),
        {"sites": sites},
    )


def lines_list(conn: Conn, site: str | None, sites: list[str] | None) -> list[dict[str, Any]]:
    return run(
        conn,
        "lines",
        sql.SQL(
            "SELECT l.site_id, l.line_id, (SELECT count(*) FROM registry.equipment e"
            " WHERE e.site_id = l.site_id AND e.line_id = l.line_id) AS equipment"
            " FROM registry.lines l WHERE (%(sites)s::text[] IS NULL OR l.site_id = ANY(%(sites)s))"
            " AND (%(site)s::text IS NULL OR l.site_id = %(site)s) ORDER BY 1, 2"
        ),
        {"sites": sites, "site": site},
    )


def equipment_list(
    conn: Conn,
    site: str | None,
    line: str | None,
    equipment: str | None,
    sites: list[str] | None,
) -> list[dict[str, Any]]:
    return run(
        conn,
        "equipment",
        sql.SQL(
            "SELECT e.site_id, e.equipment_id, e.line_id, e.agent_id, e.config, e.updated_at,"
            " COALESCE((SELECT jsonb_object_agg(r.code, r.reason) FROM registry.reason_codes r"
            " WHERE r.site_id = e.site_id AND r.equipment_id = e.equipment_id), '{}'::jsonb)"
            " AS reasons"
            " FROM registry.equipment e"
            " WHERE (%(sites)s::text[] IS NULL OR e.site_id = ANY(%(sites)s))"
            " AND (%(site)s::text IS NULL OR e.site_id = %(site)s)"
            " AND (%(line)s::text IS NULL OR e.line_id = %(line)s)"
            " AND (%(eq)s::text IS NULL OR e.equipment_id = %(eq)s) ORDER BY 1, 2"
        ),
        {"sites": sites, "site": site, "line": line, "eq": equipment},
    )


def agents_list(
    conn: Conn, agent: str | None, site: str | None, sites: list[str] | None
) -> list[dict[str, Any]]:
    """Fleet view: status as last reported, ingest lag, sequence gaps, rejects by reason
    (verified ones only), batches the agent declared lost by reason."""
    rows = run(
        conn,
        "agents",
        sql.SQL(
            "SELECT a.agent_id, a.site_id, a.enrolled_at, a.last_seen, a.version, a.status,"
            " a.status_reported_at, a.last_batch_created,"
            " (SELECT jsonb_build_object('created', b.created, 'received_at', b.received_at,"
            "   'lag_s', extract(epoch FROM b.received_at - b.created))"
            "  FROM facts.batches b WHERE b.site_id = a.site_id AND b.agent_id = a.agent_id"
            "  ORDER BY b.received_at DESC LIMIT 1) AS last_batch,"
            " (SELECT COALESCE(jsonb_agg(g ORDER BY g.epoch, g.from_seq), '[]'::jsonb) FROM ("
            "   SELECT epoch, seq + 1 AS from_seq, nxt - 1 AS to_seq FROM ("
            "    SELECT epoch, seq, lead(seq) OVER (PARTITION BY epoch ORDER BY seq) AS nxt"
            "    FROM facts.batches b WHERE b.site_id = a.site_id AND b.agent_id = a.agent_id) s"
            "   WHERE nxt > seq + 1) g) AS gaps,"
            " ops.agent_rejects(a.agent_id) AS rejects, ops.agent_losses(a.agent_id) AS losses"
            " FROM registry.agents a"
            " WHERE (%(sites)s::text[] IS NULL OR a.site_id = ANY(%(sites)s))"
            " AND (%(site)s::text IS NULL OR a.site_id = %(site)s)"
            " AND (%(agent)s::text IS NULL OR a.agent_id = %(agent)s) ORDER BY 2, 1"
        ),
        {"sites": sites, "site": site, "agent": agent},
    )
    now = datetime.now(UTC)
    out = []
    for r in rows:
        status = r["status"] or {}
        last = r["last_batch"] or {}
        gaps = r["gaps"] or []
        reported_at = r["status_reported_at"]
        out.append(
            {
                "agent_id": r["agent_id"],
                "site_id": r["site_id"],
                "enrolled_at": r["enrolled_at"],
                "last_seen": r["last_seen"],
                "seconds_since_seen": (now - r["last_seen"]).total_seconds()
                if r["last_seen"]
                else None,
                "version": r["version"],
                "status_reported_at": reported_at,
                "outbox_depth": status.get("outbox_depth"),
                "outbox_events": status.get("outbox_events"),
                "outbox_bytes": status.get("outbox_bytes"),
                "outbox_oldest_unacked_s": status.get("outbox_oldest_unacked_s"),
                "clock_offset_s": status.get("clock_offset_s"),
                "connectors": status.get("connectors"),
                "ingest_lag_s": float(last["lag_s"]) if last.get("lag_s") is not None else None,
                "last_batch_created": r["last_batch_created"],
                "sequence_gaps": gaps,
                "missing_batches": sum(int(g["to_seq"]) - int(g["from_seq"]) + 1 for g in gaps),
                "rejected_batches": r["rejects"] or {},
                "lost_batches": r["losses"] or {},
            }
        )
    return out


def quantities(c: Components) -> dict[str, int]:
    return {k: int(getattr(c, k)) for k in QUANTITY_FIELDS}


def times(c: Components) -> dict[str, float]:
    return {k: float(getattr(c, k)) for k in TIME_FIELDS}
