"""`/v1/targets`: targets of OEE and the other KPIs per site, line or equipment.

Targets come from the agents' YAML (source `config`) and from `PUT /v1/targets` (source
`api`, overriding the YAML's at the same scope; admins and engineers of the site, audited).
Answers of `/v1/oee`, `/v1/kpis`, `/v1/equipment/{id}/oee` and `/v1/plant/live` carry the
targets in force beside the values (cloud_api/api/targets.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cloud_api.access import audit
from cloud_api.access.auth import SITE_ID, Principal
from cloud_api.access.security import CurrentPrincipal, require
from cloud_api.api.targets import TargetBook
from cloud_api.problems import Problem
from oee.targets import target_error

router = APIRouter(prefix="/v1", tags=["targets"])

TargetScope = Literal["site", "line", "equipment"]
SETTERS = frozenset({"admin", "engineer"})


class TargetsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    site: str = Field(max_length=64, pattern=SITE_ID.pattern)
    scope: TargetScope
    id: str | None = Field(
        default=None, min_length=1, max_length=200, description="line or equipment; none for site"
    )
    targets: dict[str, float | None] = Field(
        max_length=64,
        description="KPI (oee.kpis) -> target; null removes the API's target (the YAML's, if "
        "any, applies again)",
    )

    @field_validator("targets")
    @classmethod
    def _known(cls, value: dict[str, float | None]) -> dict[str, float | None]:
        for kpi, target in value.items():
            if target is not None and (problem := target_error(kpi, target)) is not None:
                raise ValueError(problem)
            if target is None and (problem := target_error(kpi, 0.0)) is not None:
                raise ValueError(problem)
        return value


def _scope_id(scope: TargetScope, ident: str | None) -> str:
    if scope == "site":
        if ident is not None:
            raise Problem(422, "a site target takes no id", slug="invalid-parameter")
        return ""
    if ident is None:
        raise Problem(422, f"a {scope} target needs the {scope}'s id", slug="invalid-parameter")
    return ident


def _exists(cur: Any, site: str, scope: TargetScope, scope_id: str) -> bool:
    # Row-level security hides other sites: they read as unknown.
    if scope == "site":
        stmt, args = "SELECT 1 FROM registry.sites WHERE site_id = %s", (site,)
    elif scope == "line":
        stmt = "SELECT 1 FROM registry.equipment WHERE site_id = %s AND line_id = %s LIMIT 1"
        args = (site, scope_id)  # type: ignore[assignment]
    else:
        stmt = "SELECT 1 FROM registry.equipment WHERE site_id = %s AND equipment_id = %s"
        args = (site, scope_id)  # type: ignore[assignment]
    return cur.execute(stmt, args).fetchone() is not None


def _listing(cur: Any, site: str, scope: TargetScope, scope_id: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = cur.execute(
        "SELECT site_id, scope, scope_id, kpi, source, value, set_by, set_at, trace_id "
        "FROM registry.targets WHERE site_id = %s ORDER BY scope, scope_id, kpi, source",
        (site,),
    ).fetchall()
    book = TargetBook()
    for r in sorted(rows, key=lambda r: r["source"] == "api"):
        book.layers.setdefault((r["site_id"], r["scope"], r["scope_id"]), {})[r["kpi"]] = r["value"]
    line: str | None = None
    if scope == "equipment":
        found = cur.execute(
            "SELECT line_id FROM registry.equipment WHERE site_id = %s AND equipment_id = %s",
            (site, scope_id),
        ).fetchone()
        line = found["line_id"] if found else None
        effective = book.of_equipment(site, scope_id, line)
    elif scope == "line":
        effective = book.of_line(site, scope_id)
    else:
        effective = book.of_site(site)
    own = [
        {k: r[k] for k in ("kpi", "source", "value", "set_by", "set_at")}
        for r in rows
        if r["scope"] == scope and r["scope_id"] == scope_id
    ]
    return {
        "site": site,
        "scope": scope,
        "id": scope_id or None,
        "line": line,
        "targets": effective,
        "set_here": own,
    }


@router.get(
    "/targets",
    summary="Targets in force for a site, line or equipment, and those set at that scope",
    description="`targets`: per KPI the target of the most specific scope that has one "
    "(equipment > line > site; at one scope the API's overrides the YAML's). `set_here`: the "
    "targets set at this very scope, by source.",
)
async def get_targets(
    request: Request,
    principal: CurrentPrincipal,
    site: Annotated[str, Query(max_length=64, pattern=SITE_ID.pattern)],
    scope: Annotated[TargetScope, Query()] = "site",
    id: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
) -> dict[str, Any]:
    scope_id = _scope_id(scope, id)
    if not principal.sees(site):
        raise Problem(404, f"no {scope} {id or site!r} at site {site!r}", slug="not-found")
    pool = request.app.state.pool

    def read() -> dict[str, Any] | None:
        with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            if not _exists(cur, site, scope, scope_id):
                return None
            return _listing(cur, site, scope, scope_id)

    found = await run_in_threadpool(read)
    if found is None:
        raise Problem(404, f"no {scope} {id or site!r} at site {site!r}", slug="not-found")
    return found


@router.put(
    "/targets",
    summary="Set (or with null remove) targets of a site, line or equipment (audited)",
)
async def put_targets(
    request: Request,
    body: TargetsIn,
    principal: Annotated[Principal, Depends(require("write"))],
) -> dict[str, Any]:
    if principal.role not in SETTERS:
        raise Problem(403, "only admins and engineers of the site set targets", slug="forbidden")
    scope_id = _scope_id(body.scope, body.id)
    if not principal.sees(body.site):
        raise Problem(404, f"no site {body.site!r}", slug="not-found")
    trace_id = request.scope.get("state", {}).get("trace_id")
    pool = request.app.state.pool

    def write() -> dict[str, Any] | None:
        with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            if not _exists(cur, body.site, body.scope, scope_id):
                return None
            for kpi, value in body.targets.items():
                if value is None:
                    cur.execute(
                        "DELETE FROM registry.targets WHERE site_id = %s AND scope = %s "
                        "AND scope_id = %s AND kpi = %s AND source = 'api'",
                        (body.site, body.scope, scope_id, kpi),
                    )
                else:
                    cur.execute(
                        "INSERT INTO registry.targets AS t (site_id, scope, scope_id, kpi, "
                        "source, value, set_by, set_at, trace_id) "
                        "VALUES (%s, %s, %s, %s, 'api', %s, %s, now(), %s) "
                        "ON CONFLICT (site_id, scope, scope_id, kpi, source) DO UPDATE SET "
                        "value = excluded.value, set_by = excluded.set_by, "
                        "set_at = excluded.set_at, trace_id = excluded.trace_id",
                        (body.site, body.scope, scope_id, kpi, value, principal.subject,
                         trace_id),
                    )  # fmt: skip
            audit.record_principal(
                conn,
                principal,
                "targets.set",
                target=f"{body.site}/{body.scope}/{scope_id}",
                site_id=body.site,
                detail={"targets": body.targets},
                trace_id=trace_id,
            )
            return _listing(cur, body.site, body.scope, scope_id)

    found = await run_in_threadpool(write)
    if found is None:
        raise Problem(
            404, f"no {body.scope} {body.id or body.site!r} at site {body.site!r}", slug="not-found"
        )
    request.app.state.data_marks.forget_all()
    return found
