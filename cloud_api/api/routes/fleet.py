"""Read routes over the registry and raw facts: sites, lines, equipment (with configuration
as last reported), agents (fleet health) and the event log with cursor pagination."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from cloud_api.api import queries
from cloud_api.api.queries import Conn, ScopeKind
from cloud_api.api.routes.common import allowed_sites, db, respond, window
from cloud_api.fleetconfig import store as config_store
from cloud_api.problems import Problem, invalid_parameter

router = APIRouter(prefix="/v1", tags=["fleet"])
EVENT_KINDS = ("state", "count", "oee", "sample", "agent")


def _unsafe_integers(value: Any, path: str) -> list[str]:
    """Replace, in place, each integer of an event body beyond queries.SAFE_INTEGER by its
    decimal text; returns their paths (`produced`, `data.counters.0`).

    Ingest refuses such values now; events stored before may hold them, and a number no JSON
    consumer reads exactly (or that orjson cannot write at all, beyond 64 bits) is better
    shown as text and flagged than answered with a 500 or a rounded value.
    """
    found: list[str] = []
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return found
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(item, int) and not isinstance(item, bool):
            if abs(item) > queries.SAFE_INTEGER:
                value[key] = str(item)
                found.append(where)
        else:
            found.extend(_unsafe_integers(item, where))
    return found


@router.get("/sites", summary="Sites with their counts of lines, equipment and agents")
async def sites(request: Request) -> Response:
    visible = allowed_sites(request)
    rows = await db(request, lambda conn: queries.sites_list(conn, visible))
    return respond(request, {"sites": rows}, rows)


@router.get("/lines", summary="Lines, optionally of one site")
async def lines(request: Request, site: Annotated[str | None, Query()] = None) -> Response:
    visible = allowed_sites(request)
    rows = await db(request, lambda conn: queries.lines_list(conn, site, visible))
    return respond(request, {"lines": rows}, rows)


@router.get("/equipment", summary="Equipment with the configuration its agent last reported")
async def equipment(
    request: Request,
    site: Annotated[str | None, Query()] = None,
    line: Annotated[str | None, Query()] = None,
) -> Response:
    visible = allowed_sites(request)
    rows = await db(request, lambda conn: queries.equipment_list(conn, site, line, None, visible))
    return respond(request, {"equipment": rows}, rows)


@router.get("/equipment/{equipment_id}", summary="One equipment and its reported configuration")
async def equipment_one(
    request: Request, equipment_id: str, site: Annotated[str | None, Query()] = None
) -> Response:
    visible = allowed_sites(request)
    rows = await db(
        request, lambda conn: queries.equipment_list(conn, site, None, equipment_id, visible)
    )
    if not rows:
        raise Problem(404, f"no equipment {equipment_id!r}")
    if len(rows) > 1:
        raise Problem(409, f"equipment {equipment_id!r} exists at several sites: pass site=")
    return respond(request, rows[0])


def with_config(conn: Conn, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each agent's configuration: desired and running versions, the last result."""
    found = config_store.statuses(conn, [r["agent_id"] for r in rows])
    for row in rows:
        row["config"] = found.get(row["agent_id"])
    return rows


@router.get("/agents", summary="Fleet health of every agent")
async def agents(request: Request, site: Annotated[str | None, Query()] = None) -> Response:
    visible = allowed_sites(request)
    rows = await db(
        request, lambda conn: with_config(conn, queries.agents_list(conn, None, site, visible))
    )
    return respond(request, {"agents": rows}, rows)


@router.get("/agents/{agent_id}", summary="Fleet health of one agent")
async def agent(request: Request, agent_id: str) -> Response:
    visible = allowed_sites(request)

    rows = await db(
        request, lambda conn: with_config(conn, queries.agents_list(conn, agent_id, None, visible))
    )
    if not rows:
        raise Problem(404, f"no agent {agent_id!r}")
    return respond(request, rows[0])


@router.get("/events", summary="Stored events in time order, cursor-paginated")
async def events(
    request: Request,
    scope: Annotated[ScopeKind, Query()],
    id: Annotated[str, Query(min_length=1, max_length=200)],
    from_: Annotated[datetime, Query(alias="from")],
    to: Annotated[datetime, Query()],
    site: Annotated[str | None, Query()] = None,
    kind: Annotated[list[str] | None, Query(description=f"any of {', '.join(EVENT_KINDS)}")] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
    cursor: Annotated[
        str | None,
        Query(max_length=queries.MAX_CURSOR, description="`next_cursor` of the previous page"),
    ] = None,
) -> Response:
    start, end = window(from_, to)
    for k in kind or []:
        if k not in EVENT_KINDS:
            raise invalid_parameter("kind", f"{k[:40]!r} is not one of {', '.join(EVENT_KINDS)}")
    try:
        after = queries.decode_cursor(cursor) if cursor else None
    except ValueError as exc:
        raise invalid_parameter("cursor", str(exc)) from None
    visible = allowed_sites(request)

    def load(conn: Conn) -> list[dict[str, Any]]:
        if scope == "site":
            found = queries.sites_list(conn, visible)
            if not any(s["site_id"] == id for s in found):
                raise queries.NotFound(f"no site {id!r}")
            return queries.events_page(conn, [id], None, start, end, kind, after, limit + 1)
        members = queries.resolve_scope(conn, scope, id, site, visible)
        site_ids = sorted({m.site_id for m in members})
        return queries.events_page(conn, site_ids, members, start, end, kind, after, limit + 1)

    rows = await db(request, load)
    more = len(rows) > limit
    rows = rows[:limit]
    for row in rows:
        unsafe = _unsafe_integers(row["body"], "")
        if unsafe:
            row["out_of_range"] = unsafe
    next_cursor = queries.encode_cursor(rows[-1]["ts"], rows[-1]["event_id"]) if more else None
    payload = {"events": rows, "next_cursor": next_cursor}
    return respond(request, payload, rows, closed=end <= datetime.now(UTC))
