"""Operator annotations: where operator identity enters the cloud.

An engineer (or a service key with the `write` scope) annotates a downtime or quality event of
one equipment with a reason, an optional note and optionally the operator who reported it.
The operator's identity is personal data: it is sealed (cloud_api.pii) before it reaches the
database and opened only for callers with the `pii` permission; everyone else sees
`operator_status: "redacted"`. The author (`created_by`, the caller's subject, often an
e-mail address) is personal data as well: shown under the same rule, null for everyone else.
Each annotation leaves an audit row (without the operator's identity).

A downtime annotation classifies one stop: its `ts` must be the start of a stop of that
equipment (the instant of the state event, fault or idle, that began it), else it is refused.
The stop's newest annotation gives its effective reason in every view (queries.py, "stops
that people classify"); a later one supersedes it, and deleting it (DELETE, audited) brings
back the one before, or the PLC's reason. Each such write bumps the data version of the days
the stop touches in its own transaction, so cached views of them are forgotten at once.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from cloud_api.access import audit
from cloud_api.access.auth import SITE_ID, Principal
from cloud_api.access.pii import PiiError, PiiKeyring
from cloud_api.access.security import CurrentPrincipal, require
from cloud_api.api.routes.common import outside_calendar, window
from cloud_api.db import with_retry
from cloud_api.problems import Problem

router = APIRouter(prefix="/v1/equipment", tags=["annotations"])

EquipmentId = Annotated[str, Path(min_length=1, max_length=128, description="equipment id")]
SiteId = Annotated[str, Field(min_length=1, max_length=64, pattern=SITE_ID.pattern)]


class _Text(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("NUL characters are not allowed")
        return value


class AnnotationIn(_Text):
    site: SiteId
    ts: AwareDatetime = Field(description="when the annotated downtime or quality event happened")
    kind: Literal["downtime", "quality"]
    reason: str = Field(min_length=1, max_length=200)
    note: str | None = Field(default=None, max_length=2000)
    event_id: uuid.UUID | None = Field(default=None, description="the annotated stored event")
    operator: str | None = Field(
        default=None, min_length=1, max_length=200, description="personal data: stored sealed"
    )

    @field_validator("ts", mode="after")
    @classmethod
    def _in_calendar(cls, value: datetime) -> datetime:
        reason = outside_calendar(value)
        if reason is not None:
            raise ValueError(reason)
        return value


class AnnotationOut(BaseModel):
    annotation_id: uuid.UUID
    site: str
    equipment_id: str
    ts: datetime
    kind: str
    reason: str
    note: str | None
    event_id: uuid.UUID | None
    operator: str | None
    operator_status: Literal["none", "clear", "redacted", "unavailable"]
    created_at: datetime
    created_by: str | None = Field(description="personal data: only for the pii permission")
    trace_id: str | None


def _aad(site: str, equipment_id: str, annotation_id: uuid.UUID) -> bytes:
    return f"annotation\x1f{site}\x1f{equipment_id}\x1f{annotation_id}".encode()


def _pii(request: Request) -> PiiKeyring:
    keyring: PiiKeyring = request.app.state.security.pii()
    return keyring


def _render(row: dict[str, Any], principal: Principal, keyring: PiiKeyring) -> AnnotationOut:
    operator, status = None, "none"
    if row["operator_sealed"] is not None:
        if not principal.can("pii"):
            status = "redacted"
        else:
            try:
                operator = keyring.open(
                    row["operator_key_id"],
                    bytes(row["operator_sealed"]),
                    _aad(row["site_id"], row["equipment_id"], row["annotation_id"]),
                )
                status = "clear"
            except PiiError:
                status = "unavailable"
    return AnnotationOut(
        annotation_id=row["annotation_id"],
        site=row["site_id"],
        equipment_id=row["equipment_id"],
        ts=row["ts"],
        kind=row["kind"],
        reason=row["reason"],
        note=row["note"],
        event_id=row["event_id"],
        operator=operator,
        operator_status=status,  # type: ignore[arg-type]
        created_at=row["created_at"],
        created_by=row["created_by"] if principal.can("pii") else None,
        trace_id=row["trace_id"],
    )


_COLUMNS = (
    "site_id, annotation_id, equipment_id, ts, kind, reason, note, event_id, operator_key_id, "
    "operator_sealed, created_at, created_by, trace_id"
)


@router.post(
    "/{equipment_id}/annotations",
    status_code=201,
    summary="Annotate a downtime or quality event (reason, note, reporting operator)",
)
async def create_annotation(
    request: Request,
    equipment_id: EquipmentId,
    body: AnnotationIn,
    principal: Annotated[Principal, Depends(require("write"))],
) -> AnnotationOut:
    if not principal.sees(body.site):
        raise Problem(404, f"no equipment {equipment_id!r} at site {body.site!r}", slug="not-found")
    keyring = _pii(request)
    annotation_id = uuid.uuid4()
    sealed: tuple[str, bytes] | None = None
    if body.operator is not None:
        try:
            sealed = keyring.seal(body.operator, _aad(body.site, equipment_id, annotation_id))
        except PiiError:
            raise Problem(
                503,
                "operator identities cannot be stored: no personal-data key is configured",
                slug="pii-key-missing",
            ) from None
    trace_id = request.scope.get("state", {}).get("trace_id")
    pool = request.app.state.pool

    def write() -> dict[str, Any] | None:
        from psycopg.rows import dict_row

        with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            # Row-level security hides equipment of other sites: it reads as unknown.
            known = cur.execute(
                "SELECT 1 FROM registry.equipment WHERE site_id = %s AND equipment_id = %s",
                (body.site, equipment_id),
            ).fetchone()
            if known is None:
                return None
            stop: dict[str, Any] | None = None
            if body.kind == "downtime":
                stop = _stop_at(cur, body.site, equipment_id, body.ts.astimezone(UTC))
                if stop is None:
                    return {"refused": "no-stop"}
            row: dict[str, Any] | None = cur.execute(
                f"INSERT INTO facts.annotations(site_id, annotation_id, equipment_id, ts, kind, "
                f"reason, note, event_id, operator_key_id, operator_sealed, created_by, trace_id) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
                (
                    body.site,
                    annotation_id,
                    equipment_id,
                    body.ts.astimezone(UTC),
                    body.kind,
                    body.reason,
                    body.note,
                    body.event_id,
                    sealed[0] if sealed else None,
                    sealed[1] if sealed else None,
                    principal.subject,
                    trace_id,
                ),
            ).fetchone()
            audit.record_principal(
                conn,
                principal,
                "annotation.create",
                target=f"{body.site}/{equipment_id}/{annotation_id}",
                site_id=body.site,
                detail={
                    "kind": body.kind,
                    "reason": body.reason,
                    "operator": bool(sealed),
                    **(
                        {
                            "stop_start": stop["ts"].isoformat(),
                            "plc_reason": stop["plc_reason"],
                            "supersedes": stop["current"],
                        }
                        if stop is not None
                        else {}
                    ),
                },
                trace_id=trace_id,
            )
            if stop is not None:
                _touch_days(cur, body.site, equipment_id, stop["ts"], stop["until"])
            return row

    row = await run_in_threadpool(write)
    request.app.state.data_marks.forget_all()
    if row is None:
        raise Problem(404, f"no equipment {equipment_id!r} at site {body.site!r}", slug="not-found")
    if row.get("refused") == "no-stop":
        raise Problem(
            422,
            f"no stop of {equipment_id!r} at site {body.site!r} starts at {body.ts.isoformat()}: "
            "a downtime annotation names a stop by its start (`stop_start` in "
            "/v1/downtime/events and /states)",
            slug="no-such-stop",
        )
    return _render(row, principal, keyring)


def _stop_at(cur: Any, site: str, equipment_id: str, ts: datetime) -> dict[str, Any] | None:
    """The stop of the equipment that starts at `ts`: its start, the next state change (None
    while it lasts), the PLC's reason and the annotation in force (None), or None if no stop
    starts there."""
    found: dict[str, Any] | None = cur.execute(
        "SELECT e.ts, e.body->>'reason' AS plc_reason,"
        " (SELECT n.ts FROM facts.events n WHERE n.site_id = e.site_id"
        "  AND n.equipment_id = e.equipment_id AND n.kind = 'state' AND n.ts > e.ts"
        "  ORDER BY n.ts LIMIT 1) AS until,"
        " (SELECT a.annotation_id::text FROM facts.annotations a WHERE a.site_id = e.site_id"
        "  AND a.equipment_id = e.equipment_id AND a.ts = e.ts AND a.kind = 'downtime'"
        "  AND a.deleted_at IS NULL ORDER BY a.created_at DESC, a.annotation_id DESC LIMIT 1)"
        "  AS current"
        " FROM facts.events e WHERE e.site_id = %s AND e.equipment_id = %s AND e.kind = 'state'"
        " AND e.ts = %s AND e.body->>'state' IN ('fault', 'idle') LIMIT 1",
        (site, equipment_id, ts),
    ).fetchone()
    return found


def _touch_days(
    cur: Any, site: str, equipment_id: str, start: datetime, until: datetime | None
) -> None:
    """Bump the data version of every UTC day the stop touches (until now while it lasts):
    the change notification makes every cache forget its views of those days."""
    end = min(until, datetime.now(UTC)) if until is not None else datetime.now(UTC)
    cur.execute(
        "INSERT INTO rollups.data_versions AS v (site_id, equipment_id, day, version)"
        " SELECT %(site)s, %(eq)s, d::date, nextval('rollups.data_version_seq')"
        " FROM generate_series((%(start)s AT TIME ZONE 'UTC')::date,"
        " (greatest(%(start)s, %(end)s) AT TIME ZONE 'UTC')::date, interval '1 day') d"
        " ON CONFLICT (site_id, equipment_id, day) DO UPDATE SET version = excluded.version",
        {"site": site, "eq": equipment_id, "start": start, "end": end},
    )


@router.delete(
    "/{equipment_id}/annotations/{annotation_id}",
    status_code=204,
    summary="Delete an annotation: the stop's earlier annotation, or the PLC's reason, holds again",
)
async def delete_annotation(
    request: Request,
    equipment_id: EquipmentId,
    annotation_id: uuid.UUID,
    site: Annotated[str, Query(min_length=1, max_length=64, pattern=SITE_ID.pattern)],
    principal: Annotated[Principal, Depends(require("write"))],
) -> Response:
    missing = Problem(
        404, f"no annotation {annotation_id} of {equipment_id!r} at site {site!r}", slug="not-found"
    )
    if not principal.sees(site):
        raise missing
    trace_id = request.scope.get("state", {}).get("trace_id")
    pool = request.app.state.pool

    def write() -> bool:
        from psycopg.rows import dict_row

        with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "UPDATE facts.annotations SET deleted_at = now(), deleted_by = %s,"
                " deleted_trace_id = %s WHERE site_id = %s AND equipment_id = %s"
                " AND annotation_id = %s AND deleted_at IS NULL RETURNING ts, kind, reason",
                (principal.subject, trace_id, site, equipment_id, annotation_id),
            ).fetchone()
            if row is None:
                return False
            stop = (
                _stop_at(cur, site, equipment_id, row["ts"]) if row["kind"] == "downtime" else None
            )
            audit.record_principal(
                conn,
                principal,
                "annotation.delete",
                target=f"{site}/{equipment_id}/{annotation_id}",
                site_id=site,
                detail={
                    "kind": row["kind"],
                    "reason": row["reason"],
                    # What the stop's reason is now: an earlier annotation's, or the PLC's.
                    **(
                        {
                            "stop_start": stop["ts"].isoformat(),
                            "restored_annotation": stop["current"],
                            "plc_reason": stop["plc_reason"],
                        }
                        if stop is not None
                        else {}
                    ),
                },
                trace_id=trace_id,
            )
            if stop is not None:
                _touch_days(cur, site, equipment_id, stop["ts"], stop["until"])
            return True

    if not await run_in_threadpool(write):
        raise missing
    request.app.state.data_marks.forget_all()
    return Response(status_code=204)


@router.get(
    "/{equipment_id}/annotations",
    summary="Annotations of one equipment in a window (operator only for the pii permission)",
)
async def list_annotations(
    request: Request,
    equipment_id: EquipmentId,
    principal: CurrentPrincipal,
    from_: Annotated[AwareDatetime, Query(alias="from", description="inclusive, ISO 8601")],
    to: Annotated[AwareDatetime, Query(description="exclusive, ISO 8601")],
    site: Annotated[str | None, Query(max_length=64, pattern=SITE_ID.pattern)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[AnnotationOut]:
    start, end = window(from_, to)
    if site is not None and not principal.sees(site):
        return []
    keyring = _pii(request)
    pool = request.app.state.pool
    sites = principal.site_list

    def read() -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            rows: list[dict[str, Any]] = cur.execute(
                f"SELECT {_COLUMNS} FROM facts.annotations WHERE equipment_id = %(eq)s "
                "AND ts >= %(start)s AND ts < %(end)s AND deleted_at IS NULL "
                "AND (%(site)s::text IS NULL OR site_id = %(site)s) "
                "AND (%(sites)s::text[] IS NULL OR site_id = ANY(%(sites)s)) "
                "ORDER BY ts, annotation_id LIMIT %(limit)s",
                {
                    "eq": equipment_id,
                    "start": start,
                    "end": end,
                    "site": site,
                    "sites": sites,
                    "limit": limit,
                },
            ).fetchall()
            return rows

    rows = await run_in_threadpool(with_retry, read, attempts=3)
    return [_render(r, principal, keyring) for r in rows]
