"""`/v1/alerts`: open alerts and their history, the rules, and dead-lettered notifications.

Reads follow the other read routes: the caller sees the alerts of its sites (filtered in SQL
and by the site policies of 0034_alerts.sql). Rules are written by admins only (the `ops`
permission); a site-bound admin may write rules of its sites only, and only an admin of every
site a rule without a site. Each write leaves an audit row in its own transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import psycopg
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from cloud_api.access import audit
from cloud_api.access.auth import Principal
from cloud_api.access.security import require
from cloud_api.alerts import store
from cloud_api.alerts.rules import NAME_PATTERN, RuleSpec
from cloud_api.api.routes.common import allowed_sites, db, instant, respond
from cloud_api.problems import Problem

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])
RuleName = Annotated[str, Path(pattern=NAME_PATTERN, description="rule name")]
Admin = Annotated[Principal, Depends(require("ops"))]


@router.get("", summary="Alerts: open ones, or the history (newest first)")
async def alerts(
    request: Request,
    state: Annotated[Literal["open", "resolved", "all"], Query()] = "open",
    site: Annotated[str | None, Query(max_length=64)] = None,
    rule: Annotated[str | None, Query(max_length=64)] = None,
    from_: Annotated[datetime | None, Query(alias="from", description="opened at or after")] = None,
    to: Annotated[datetime | None, Query(description="opened before")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> Response:
    start = instant("from", from_) if from_ is not None else None
    end = instant("to", to) if to is not None else None
    visible = allowed_sites(request)
    rows = await db(
        request,
        lambda conn: store.list_alerts(
            conn,
            state=state,
            sites=visible,
            site=site,
            rule=rule,
            start=start,
            end=end,
            limit=limit,
        ),
    )
    return respond(request, {"alerts": rows}, rows)


@router.get("/rules", summary="Alert rules (from the cloud YAML and the API)")
async def rules(request: Request) -> Response:
    visible = allowed_sites(request)
    rows = await db(request, lambda conn: store.list_rules(conn, visible))
    return respond(request, {"rules": rows}, rows)


@router.get("/dead-letters", summary="Notifications given up after the attempt bound")
async def dead_letters(
    request: Request, _: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 200
) -> Response:
    visible = allowed_sites(request)
    rows = await db(
        request, lambda conn: store.list_deliveries(conn, status="dead", sites=visible, limit=limit)
    )
    return respond(request, {"deliveries": rows}, rows)


def _may_write(principal: Principal, site: str | None) -> None:
    if site is None and principal.sites is not None:
        raise Problem(403, "a rule for every site needs an admin of every site", slug="forbidden")
    if site is not None and not principal.sees(site):
        raise Problem(403, f"site {site!r} is not among the caller's sites", slug="forbidden")


async def _write(request: Request, fn: Any) -> Any:
    pool = request.app.state.pool

    def run() -> Any:
        with pool.connection() as conn:
            return fn(conn)

    return await run_in_threadpool(run)


@router.put("/rules/{name}", summary="Create or replace an alert rule (admins; audited)")
async def put_rule(request: Request, name: RuleName, body: RuleSpec, principal: Admin) -> Response:
    if body.name != name:
        raise Problem(422, "the rule's name differs from the path", slug="invalid-parameters")
    _may_write(principal, body.site)
    known = getattr(request.app.state, "alert_receivers", None)
    if known is not None:
        unknown = [r for r in body.receivers if r not in known]
        if unknown:
            raise Problem(
                422,
                f"unknown receiver(s) {', '.join(unknown)}; receivers are configured in the "
                f"cloud YAML (alerts.receivers): {', '.join(sorted(known)) or 'none'}",
                slug="invalid-parameters",
            )
    trace_id = request.scope.get("state", {}).get("trace_id")

    def write(conn: Any) -> str | None:
        refused = store.put_api_rule(conn, body, principal.subject)
        if refused is None:
            audit.record_principal(
                conn,
                principal,
                "alert_rule.put",
                target=name,
                site_id=body.site,
                detail={"rule": body.public()},
                trace_id=trace_id,
            )
        return refused

    try:
        refused = await _write(request, write)
    except psycopg.errors.InsufficientPrivilege:
        # Row-level security: the name belongs to a rule of a site the caller cannot see.
        refused = f"rule {name!r} exists at a site outside the caller's sites"
    if refused is not None:
        raise Problem(409, refused, slug="conflict")
    return respond(request, {"rule": body.public(), "source": "api"})


@router.delete("/rules/{name}", status_code=204, summary="Delete an alert rule (admins; audited)")
async def delete_rule(request: Request, name: RuleName, principal: Admin) -> Response:
    trace_id = request.scope.get("state", {}).get("trace_id")

    def write(conn: Any) -> str | None:
        row = conn.execute(
            "SELECT site_id, source FROM alerts.rules WHERE rule_id = %s AND deleted_at IS NULL",
            (name,),
        ).fetchone()
        if row is None:
            return "missing"
        site, source = row
        if source == "file":
            return "file"
        _may_write(principal, site)
        store.delete_rule(conn, name, actor=principal.subject)
        audit.record_principal(
            conn, principal, "alert_rule.delete", target=name, site_id=site, trace_id=trace_id
        )
        return None

    refused = await _write(request, write)
    if refused == "missing":
        raise Problem(404, f"no alert rule {name!r}", slug="not-found")
    if refused == "file":
        raise Problem(
            409,
            f"rule {name!r} is defined in the cloud configuration file; remove it there",
            slug="conflict",
        )
    return Response(status_code=204)
