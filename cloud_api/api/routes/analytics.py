"""Read routes over OEE data: OEE and counts per interval, downtime Pareto and stops, state
timelines, quality by product. Ratios always come from summed components."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response

from cloud_api.api import queries
from cloud_api.api import targets as target_book
from cloud_api.api.cache import SeriesCaching
from cloud_api.api.queries import (
    INTERVAL_SECONDS,
    MAX_POINTS,
    Bucket,
    Conn,
    GroupBy,
    Interval,
    ScopeKind,
)
from cloud_api.api.routes.common import (
    EARLIEST,
    LATEST,
    MAX_ZONE_NAME,
    allowed_sites,
    db,
    respond,
    wants_csv,
    window,
    zone,
)
from cloud_api.problems import invalid_parameter
from oee.components import QUANTITY_FIELDS, Components, ratio_values

router = APIRouter(prefix="/v1", tags=["oee"])

From = Annotated[datetime, Query(alias="from", description="inclusive, ISO 8601 with offset")]
To = Annotated[datetime, Query(description="exclusive, ISO 8601 with offset")]
Scope = Annotated[ScopeKind, Query(description="what `id` names")]
Ident = Annotated[str, Query(min_length=1, max_length=200, description="site, line or equipment")]
Site = Annotated[str | None, Query(description="site id, when line/equipment ids repeat")]
Tz = Annotated[
    str, Query(max_length=MAX_ZONE_NAME, description="IANA time zone buckets are aligned to")
]
IntervalQ = Annotated[Interval | None, Query(description="omitted: chosen from max_points")]
MaxPoints = Annotated[int, Query(ge=1, le=MAX_POINTS, description="bucket budget")]
GroupQ = Annotated[GroupBy, Query(description="one series per site, line or equipment")]


RATIO_NAMES = ("availability", "performance", "quality", "oee")


def ratios_of(c: Components) -> dict[str, float | None]:
    availability, performance, quality, oee = ratio_values(c)
    return {
        "availability": availability,
        "performance": performance,
        "quality": quality,
        "oee": oee,
    }


def series_interval(
    start: datetime, end: datetime, interval: Interval | None, max_points: int
) -> Any:
    chosen = interval or queries.choose_interval(start, end, max_points)
    if chosen != "shift" and (end - start).total_seconds() / INTERVAL_SECONDS[chosen] > MAX_POINTS:
        raise invalid_parameter(
            "interval", f"{chosen} gives more than {MAX_POINTS} buckets for this window"
        )
    return chosen


def _series_payload(
    buckets: list[Bucket],
    start: datetime,
    end: datetime,
    tz_name: str,
    group_by: GroupBy,
    fields: Literal["oee", "counts"],
    targets: tuple[target_book.TargetBook, ScopeKind, str, list[queries.Member]] | None = None,
) -> dict[str, Any]:
    """`targets` (book, scope kind, scope id, members): totals carry the targets of the
    ratios shown."""
    tz = zone(tz_name)
    groups: dict[tuple[str | None, str | None], list[Bucket]] = {}
    for b in buckets:
        groups.setdefault(b.group, []).append(b)

    def values(c: Components) -> dict[str, Any]:
        if fields == "counts":
            return {k: getattr(c, k) for k in QUANTITY_FIELDS}
        return {**ratios_of(c), "components": dict(c.__dict__)}

    out_groups = []
    key_name = {"none": None, "site": "site", "line": "line", "equipment": "equipment"}[group_by]
    for (g_site, g_id), items in groups.items():
        series = []
        for b in items:
            row: dict[str, Any] = {
                "start": max(b.start, start).astimezone(tz),
                "end": min(b.end, end).astimezone(tz) if b.end is not None else None,
            }
            if b.shift is not None:
                row["shift"] = b.shift
            row.update(values(b.components))
            series.append(row)
        group: dict[str, Any] = {}
        if group_by != "none":
            group["site"] = g_site
            if key_name != "site":
                group[key_name or "id"] = g_id
        group["total"] = values(queries.pooled(b.components for b in items))
        if targets is not None:
            book, _, _, members = targets
            shown = book.of_group(group_by, (g_site, g_id), members)
            group["total"].update(
                target_book.beside(group["total"], target_book.only(shown, RATIO_NAMES))
            )
        group["buckets"] = series
        out_groups.append(group)
    total = values(queries.pooled(b.components for b in buckets))
    if targets is not None:
        book, kind, ident, members = targets
        shown = book.of_scope(kind, ident, members)
        total.update(target_book.beside(total, target_book.only(shown, RATIO_NAMES)))
    return {"total": total, "groups": out_groups}


def series_table(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per bucket (group keys, bounds, ratios or KPIs, components) for CSV; also
    the CSV of /v1/kpis."""
    table = []
    for group in payload["groups"]:
        keys = {k: v for k, v in group.items() if k not in ("total", "buckets")}
        for bucket in group["buckets"]:
            flat = {**keys, "start": bucket["start"], "end": bucket["end"]}
            flat["shift"] = bucket.get("shift")
            for k, v in bucket.items():
                if k == "components":
                    flat.update(v)
                elif k not in flat:
                    flat[k] = v
            table.append(flat)
    return table


async def series_response(
    request: Request,
    route: str,
    scope: ScopeKind,
    ident: str,
    site: str | None,
    from_: datetime,
    to: datetime,
    interval: Interval | None,
    max_points: int,
    tz: str,
    group_by: GroupBy,
    fields: Literal["oee", "counts"],
) -> Response:
    start, end = window(from_, to)
    tzinfo = zone(tz)
    chosen = series_interval(start, end, interval, max_points)
    sites = allowed_sites(request)
    closed = end <= datetime.now(UTC)
    visible = tuple(sites) if sites is not None else None
    caching = SeriesCaching(
        request,
        (route, scope, ident, site, start, end, chosen, tz, group_by, visible),
        (scope, ident, site, visible),
        queries.day_span(start, end),
        closed=closed,
    )
    hit = caching.cached()
    if hit is not None:
        result, known = hit
        table = series_table(result) if wants_csv(request) else None
        response = respond(request, result, table, closed=closed, cache="hit")
        caching.remember(known, response)
        return response

    def load(conn: Conn) -> tuple[str, dict[str, Any], int | None, bytes | None]:
        members = caching.members(lambda: queries.resolve_scope(conn, scope, ident, site, sites))
        # The series, for a closed window its watermark, and the targets the answer shows in
        # one statement: a miss costs one round trip.
        series = queries.oee_series(
            conn,
            members,
            start,
            end,
            chosen,
            tzinfo,
            group_by,
            marked=closed,
            with_targets=fields == "oee",
        )
        buckets, source, mark = series.buckets, series.source, series.mark
        # Cached with the answer: a change of a target bumps the data versions the cache is
        # keyed on (migration 0037).
        targets = None
        if series.targets is not None:
            targets = (target_book.book_of(series.targets), scope, ident, members)
        payload = {
            "scope": {"kind": scope, "id": ident, "site": site},
            "from": start.astimezone(tzinfo),
            "to": end.astimezone(tzinfo),
            "tz": tz,
            "interval": chosen,
            "group_by": group_by,
            "source": source,
            **_series_payload(buckets, start, end, tz, group_by, fields, targets),
        }
        encoded = None
        if mark is not None:
            encoded = caching.computed(members, mark, payload)
        return ("miss" if closed else "open"), payload, mark, encoded

    # Every shape of the series statement runs its generic plan (security.GENERIC_PLANS).
    outcome, payload, mark, encoded = await db(request, load, generic_plans=True)
    table = series_table(payload) if wants_csv(request) else None
    # The JSON the result cache keeps is the answer's body: encoded once.
    response = respond(request, payload, table, closed=closed, cache=outcome, encoded=encoded)
    if mark is not None:
        caching.remember(mark, response)
    return response


@router.get("/oee", summary="OEE per interval and for the whole window, from summed components")
async def oee(
    request: Request,
    scope: Scope,
    id: Ident,
    from_: From,
    to: To,
    site: Site = None,
    interval: IntervalQ = None,
    max_points: MaxPoints = 1000,
    tz: Tz = "UTC",
    group_by: GroupQ = "none",
) -> Response:
    return await series_response(
        request, "oee", scope, id, site, from_, to, interval, max_points, tz, group_by, "oee"
    )


@router.get(
    "/equipment/{equipment_id}/oee",
    summary="OEE of one equipment over the whole window (the total of /v1/oee)",
)
async def equipment_oee(
    request: Request,
    equipment_id: str,
    from_: Annotated[datetime, Query(alias="from", description="inclusive, ISO 8601")],
    to: Annotated[datetime, Query(description="exclusive, ISO 8601")],
    site: Annotated[str | None, Query(description="site id, if ids repeat")] = None,
) -> dict[str, Any]:
    start, end = window(from_, to)
    sites = allowed_sites(request)
    # The interval /v1/oee chooses by default: its total and this one are the same sums.
    interval = queries.choose_interval(start, end, 1000)

    def load(conn: Conn) -> tuple[list[Bucket], list[queries.Member], dict[str, float]]:
        members = queries.resolve_scope(conn, "equipment", equipment_id, site, sites)
        series = queries.oee_series(
            conn, members, start, end, interval, zone("UTC"), "none", with_targets=True
        )
        buckets = series.buckets
        book = target_book.book_of(series.targets or [])
        shown = book.of_scope("equipment", equipment_id, members)
        return buckets, members, target_book.only(shown, RATIO_NAMES)

    buckets, members, targets = await db(request, load)
    total = queries.pooled(b.components for b in buckets)
    values = ratios_of(total)
    return {
        "equipment": equipment_id,
        # The site the data came from; with none, the one asked for (if any).
        "site": members[0].site_id if buckets else site,
        "from": start.isoformat(),
        "to": end.isoformat(),
        **values,
        "components": total.as_dict(),
        **target_book.beside(values, targets),
    }


@router.get("/counts", summary="Produced, good, scrap and rework per interval")
async def counts(
    request: Request,
    scope: Scope,
    id: Ident,
    from_: From,
    to: To,
    site: Site = None,
    interval: IntervalQ = None,
    max_points: MaxPoints = 1000,
    tz: Tz = "UTC",
    group_by: GroupQ = "none",
) -> Response:
    return await series_response(
        request, "counts", scope, id, site, from_, to, interval, max_points, tz, group_by, "counts"
    )


@router.get("/downtime/pareto", summary="Downtime by reason or loss class, largest first")
async def downtime_pareto(
    request: Request,
    scope: Scope,
    id: Ident,
    from_: From,
    to: To,
    site: Site = None,
    by: Annotated[Literal["reason", "class"], Query()] = "reason",
    top: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> Response:
    start, end = window(from_, to)
    sites = allowed_sites(request)

    def load(conn: Conn) -> list[tuple[str, float]]:
        members = queries.resolve_scope(conn, scope, id, site, sites)
        return queries.pareto(conn, members, start, end, by)

    items = await db(request, load)
    total = sum(s for _, s in items)
    head = items[:top]
    rest = sum(s for _, s in items[top:])
    rows: list[dict[str, Any]] = []
    cumulative = 0.0
    for label, seconds in head:
        cumulative += seconds
        rows.append(
            {
                by: label,
                "seconds": seconds,
                "share": seconds / total if total else None,
                "cumulative_share": cumulative / total if total else None,
            }
        )
    payload = {
        "scope": {"kind": scope, "id": id, "site": site},
        "from": start,
        "to": end,
        "by": by,
        "total_s": total,
        "other_s": rest,
        "items": rows,
    }
    return respond(request, payload, rows, closed=end <= datetime.now(UTC))


@router.get(
    "/downtime/events",
    summary="Stops (fault and idle intervals) with their planned seconds",
    description=(
        "Each stop keeps its `start` and `end` as the PLC set them (clipped to [from, to) and "
        "to now); `duration_s` is its downtime, the planned seconds within it (breaks and time "
        "outside every shift are off plan, as in /v1/oee and the Pareto), and `wall_s` its "
        "wall-clock length. A stop with no planned second is left out; `min_duration_s` "
        "applies to `duration_s`. `stop_start` is the instant the stop began (before "
        "`from` when the window cuts it): the `ts` an annotation names the stop by."
    ),
)
async def downtime_events(
    request: Request,
    scope: Scope,
    id: Ident,
    from_: From,
    to: To,
    site: Site = None,
    min_duration_s: Annotated[
        float, Query(ge=0, le=(LATEST - EARLIEST).total_seconds(), allow_inf_nan=False)
    ] = 0.0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    start, end = window(from_, to)
    sites = allowed_sites(request)

    def load(conn: Conn) -> list[dict[str, Any]]:
        members = queries.resolve_scope(conn, scope, id, site, sites)
        return queries.stops(conn, members, start, end, min_duration_s=min_duration_s, limit=limit)

    rows = await db(request, load)
    payload = {"from": start, "to": end, "stops": rows}
    return respond(request, payload, rows, closed=end <= datetime.now(UTC))


@router.get(
    "/downtime/unexplained",
    summary="Stops without a reason (or with a configured unknown one), longest first",
    description=(
        "The stops of /v1/downtime/events whose effective reason (the newest annotation's, "
        "else the PLC's) is missing or one of the cloud's `unknown_reasons`, ordered by "
        "their planned seconds (`duration_s`), longest first. Annotating a stop's start "
        "(POST /v1/equipment/{id}/annotations, kind downtime) takes it off this list."
    ),
)
async def downtime_unexplained(
    request: Request,
    scope: Scope,
    id: Ident,
    from_: From,
    to: To,
    site: Site = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> Response:
    start, end = window(from_, to)
    sites = allowed_sites(request)
    unknown: frozenset[str] = getattr(request.app.state, "unknown_reasons", frozenset())

    def load(conn: Conn) -> list[dict[str, Any]]:
        members = queries.resolve_scope(conn, scope, id, site, sites)
        return queries.stops(conn, members, start, end)

    rows = [r for r in await db(request, load) if r["reason"] is None or r["reason"] in unknown]
    rows.sort(key=lambda r: (-r["duration_s"], r["start"], r["site_id"], r["equipment_id"]))
    payload = {
        "from": start,
        "to": end,
        "unknown_reasons": sorted(unknown),
        "total": len(rows),
        "stops": rows[:limit],
    }
    return respond(request, payload, rows[:limit], closed=end <= datetime.now(UTC))


@router.get(
    "/equipment/{equipment_id}/states",
    summary="State timeline of one equipment",
    description="Intervals clipped to [from, to) and to now. A stop's interval (fault, idle) "
    "carries `stop_start`, the instant the stop began (before `start` when the window cuts "
    "it), which is the `ts` a downtime annotation names it by; null for other states.",
)
async def equipment_states(
    request: Request,
    equipment_id: str,
    from_: From,
    to: To,
    site: Site = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
) -> Response:
    start, end = window(from_, to)
    sites = allowed_sites(request)

    def load(conn: Conn) -> list[dict[str, Any]]:
        members = queries.resolve_scope(conn, "equipment", equipment_id, site, sites)
        return queries.state_intervals(conn, members, start, end, limit=limit)

    rows = await db(request, load)
    totals: dict[str, float] = {}
    for r in rows:
        totals[r["state"]] = totals.get(r["state"], 0.0) + r["duration_s"]
    payload = {
        "equipment": equipment_id,
        "from": start,
        "to": end,
        "seconds_by_state": totals,
        "intervals": rows,
    }
    return respond(request, payload, rows, closed=end <= datetime.now(UTC))


@router.get(
    "/quality",
    summary="Produced, good, scrap and rework by equipment and product; scrap by reason",
)
async def quality(
    request: Request,
    scope: Scope,
    id: Ident,
    from_: From,
    to: To,
    site: Site = None,
) -> Response:
    start, end = window(from_, to)
    sites = allowed_sites(request)

    def load(conn: Conn) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        members = queries.resolve_scope(conn, scope, id, site, sites)
        left_out = queries.counts_out_of_range(conn, members, start, end)
        return (
            queries.quality(conn, members, start, end),
            queries.scrap_by_reason(conn, members, start, end),
            left_out,
        )

    rows, by_reason, left_out = await db(request, load)
    totals = {k: sum(r[k] for r in rows) for k in ("produced", "good", "scrap", "rework")}
    payload = {
        "from": start,
        "to": end,
        "total": totals,
        "by_product": rows,
        # Scrap per equipment and scrap reason (in force when the scrap counter incremented);
        # "unspecified" without one. Sums to total.scrap.
        "by_reason": by_reason,
        # Count events stored before ingest bounded quantities, holding one no JSON consumer
        # can read exactly: not in the sums above.
        "out_of_range_events": left_out,
    }
    return respond(request, payload, rows, closed=end <= datetime.now(UTC))
