"""`GET /v1/kpis`: the KPI catalogue (oee.kpis) per interval, per group and for the window,
from the summed components `/v1/oee` serves (never averaged)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from cloud_api.api import queries
from cloud_api.api import targets as target_book
from cloud_api.api.queries import Bucket, Conn, GroupBy, Member
from cloud_api.api.routes.analytics import (
    From,
    GroupQ,
    Ident,
    IntervalQ,
    MaxPoints,
    Scope,
    Site,
    To,
    Tz,
    series_interval,
    series_table,
)
from cloud_api.api.routes.common import allowed_sites, db, respond, window, zone
from cloud_api.problems import invalid_parameter
from oee.components import Components
from oee.kpis import KPI_DEFINITIONS, KPI_NAMES, kpis, select

router = APIRouter(prefix="/v1", tags=["oee"])

_CATALOGUE = "\n".join(
    f"- `{d.name}` = {d.formula}"
    + (f" (ISO 22400-2: {d.iso_name})" if d.iso_name else "")
    + f"; {d.better} is better"
    for d in KPI_DEFINITIONS
)
_DESCRIPTION = (
    "Every KPI is computed from the components summed over the bucket, group or window "
    "(the components `/v1/oee` serves, shown beside them), null where its denominator is "
    "zero. `calendar_s` is the window's (or bucket's) length times the number of equipment "
    "it covers; null for `interval=shift` buckets, so loading and TEEP are null there. "
    "Totals carry `targets` and `against_targets` (per KPI: target, direction `better`, "
    "and whether the value meets it, `met`).\n\n" + _CATALOGUE
)
MAX_KPI_PARAMS = 2 * len(KPI_NAMES)


def _group_key(m: Member, group_by: GroupBy) -> tuple[str | None, str | None]:
    if group_by == "none":
        return (None, None)
    if group_by == "site":
        return (m.site_id, None)
    if group_by == "line":
        return (m.site_id, m.line_id)
    return (m.site_id, m.equipment_id)


def _values(c: Components, calendar_s: float | None, names: tuple[str, ...]) -> dict[str, Any]:
    every = kpis(c, calendar_s)
    return {
        "calendar_s": calendar_s,
        **{n: every[n] for n in names},
        "components": dict(c.__dict__),
    }


def kpi_payload(
    members: list[Member],
    buckets: list[Bucket],
    start: datetime,
    end: datetime,
    tz_name: str,
    interval: str,
    group_by: GroupBy,
    names: tuple[str, ...],
    targets: tuple[target_book.TargetBook, str, str] | None = None,
) -> dict[str, Any]:
    """Totals and series of the KPIs `names` (the shape of `/v1/oee`, KPIs for ratios);
    with `targets` (book, scope kind, scope id) totals carry the targets of `names`."""
    tz = zone(tz_name)
    window_s = (end - start).total_seconds()
    sizes = Counter(_group_key(m, group_by) for m in members)
    groups: dict[tuple[str | None, str | None], list[Bucket]] = {}
    for b in buckets:
        groups.setdefault(b.group, []).append(b)
    out_groups = []
    for key, items in groups.items():
        n = sizes.get(key, 0)
        series = []
        for b in items:
            lo = max(b.start, start)
            hi = min(b.end, end) if b.end is not None else None
            calendar = None if interval == "shift" or hi is None else (hi - lo).total_seconds() * n
            row: dict[str, Any] = {"start": lo.astimezone(tz), "end": hi and hi.astimezone(tz)}
            if b.shift is not None:
                row["shift"] = b.shift
            row.update(_values(b.components, calendar, names))
            series.append(row)
        group: dict[str, Any] = {}
        if group_by != "none":
            group["site"] = key[0]
            if group_by != "site":
                group[group_by] = key[1]
        group["total"] = _values(queries.pooled(b.components for b in items), window_s * n, names)
        if targets is not None:
            shown = target_book.only(targets[0].of_group(group_by, key, members), names)
            group["total"].update(target_book.beside(group["total"], shown))
        group["buckets"] = series
        out_groups.append(group)
    total = _values(queries.pooled(b.components for b in buckets), window_s * len(members), names)
    if targets is not None:
        book, kind, ident = targets
        shown = target_book.only(book.of_scope(kind, ident, members), names)
        total.update(target_book.beside(total, shown))
    return {"kpis": list(names), "total": total, "groups": out_groups}


@router.get(
    "/kpis",
    summary="ISO 22400 KPIs per interval and for the whole window, from summed components",
    description=_DESCRIPTION,
)
async def kpi_series(
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
    kpi: Annotated[
        list[Annotated[str, Query(max_length=200)]] | None,
        Query(
            max_length=MAX_KPI_PARAMS,
            description="KPIs to return (repeat, or separate by commas); omitted: all of "
            + ", ".join(KPI_NAMES),
        ),
    ] = None,
) -> Response:
    start, end = window(from_, to)
    tzinfo = zone(tz)
    try:
        names = select(None if kpi is None else [n for item in kpi for n in item.split(",")])
    except ValueError as exc:
        raise invalid_parameter("kpi", str(exc)) from None
    chosen = series_interval(start, end, interval, max_points)
    sites = allowed_sites(request)

    def load(conn: Conn) -> dict[str, Any]:
        members = queries.resolve_scope(conn, scope, id, site, sites)
        series = queries.oee_series(
            conn, members, start, end, chosen, tzinfo, group_by, with_targets=True
        )
        book = target_book.book_of(series.targets or [])
        return {
            "scope": {"kind": scope, "id": id, "site": site},
            "from": start.astimezone(tzinfo),
            "to": end.astimezone(tzinfo),
            "tz": tz,
            "interval": chosen,
            "group_by": group_by,
            "source": series.source,
            **kpi_payload(
                members,
                series.buckets,
                start,
                end,
                tz,
                chosen,
                group_by,
                names,
                (book, scope, id),
            ),
        }

    payload = await db(request, load)
    return respond(request, payload, series_table(payload), closed=end <= datetime.now(UTC))
