"""`/v1/agents/{agent_id}/config`: push, list, show, diff and roll back configuration versions.

Writing needs the `write` permission as an admin, or as an engineer of the agent's site
(service keys cannot push configurations); row-level security hides other sites' agents.
Every push and rollback leaves an audit row in its own transaction; the signed message is
published after the commit (a version the broker did not take stays current and is
published again by the next push, rollback or `cloud-api agents config publish`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from cloud_api.access import audit
from cloud_api.access.auth import Principal
from cloud_api.access.security import CurrentPrincipal, require
from cloud_api.config import CloudSettings
from cloud_api.db import with_retry
from cloud_api.fleetconfig import store
from cloud_api.fleetconfig.publish import PublishError, publish, signed_message
from cloud_api.problems import Problem
from sync.config_message import MAX_CONFIG_TEXT
from sync.keys import CloudKeyring, KeyFileError

router = APIRouter(prefix="/v1/agents", tags=["fleet configuration"])

AgentId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]
WRITERS = frozenset({"admin", "engineer"})


class ConfigIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    yaml: str = Field(min_length=1, max_length=MAX_CONFIG_TEXT, description="the agent's file")
    comment: str = Field(default="", max_length=500)


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: int = Field(ge=1, description="the version to make current again")


def _writer(principal: Principal) -> Principal:
    if principal.role not in WRITERS:
        raise Problem(
            403,
            "pushing a configuration needs an admin, or an engineer of the agent's site",
            slug="forbidden",
        )
    return principal


def _refused(exc: Exception) -> Problem:
    if isinstance(exc, store.UnknownAgent):
        return Problem(404, str(exc), slug="not-found")
    return Problem(422, str(exc), slug="configuration-refused")


def publish_current(settings: CloudSettings, current: store.Current) -> str:
    """Sign and publish; raises PublishError (also when the cloud keys cannot be read)."""
    try:
        ring = CloudKeyring.load(settings.keys_dir)
    except (KeyFileError, OSError) as exc:
        raise PublishError(f"the cloud's ack-signing key is not usable: {exc}") from exc
    return publish(settings.mqtt, current, signed_message(current, ring))


async def _write_and_publish(
    request: Request, agent_id: str, write: Any, action: str
) -> dict[str, Any]:
    pool = request.app.state.pool
    settings: CloudSettings = request.app.state.fleetconfig_settings

    def run() -> store.Current:
        with pool.connection() as conn:
            write(conn)
            found = store.current(conn, agent_id)
            assert found is not None
            return found

    try:
        found = await run_in_threadpool(run)
    except (store.UnknownAgent, store.ConfigRefused) as exc:
        raise _refused(exc) from None
    published, problem = False, None
    try:
        await run_in_threadpool(publish_current, settings, found)
        published = True

        def mark() -> None:
            with pool.connection() as conn:
                store.mark_published(conn, agent_id, found.serial)

        await run_in_threadpool(with_retry, mark, attempts=3)
    except PublishError as exc:
        problem = str(exc)
    return {
        "agent_id": agent_id,
        "site_id": found.site_id,
        "version": found.version,
        "serial": found.serial,
        "rollback": found.rollback,
        "digest": found.digest,
        "action": action,
        "published": published,
        "publish_problem": problem,
    }


@router.post("/{agent_id}/config", status_code=201, summary="Push a new configuration version")
async def push_config(
    request: Request,
    agent_id: AgentId,
    body: ConfigIn,
    principal: Annotated[Principal, Depends(require("write"))],
) -> dict[str, Any]:
    _writer(principal)
    trace_id = request.scope.get("state", {}).get("trace_id")

    def write(conn: Any) -> None:
        site, version, serial = store.push(
            conn,
            agent_id,
            body.yaml,
            author=principal.subject,
            comment=body.comment,
            trace_id=trace_id,
        )
        audit.record_principal(
            conn,
            principal,
            "agents.config.push",
            target=agent_id,
            site_id=site,
            detail={"version": version, "serial": serial, "comment": body.comment},
            trace_id=trace_id,
        )

    return await _write_and_publish(request, agent_id, write, "push")


@router.post(
    "/{agent_id}/config/rollback",
    status_code=201,
    summary="Make an earlier configuration version current again",
)
async def rollback_config(
    request: Request,
    agent_id: AgentId,
    body: RollbackIn,
    principal: Annotated[Principal, Depends(require("write"))],
) -> dict[str, Any]:
    _writer(principal)
    trace_id = request.scope.get("state", {}).get("trace_id")

    def write(conn: Any) -> None:
        site, serial = store.rollback(conn, agent_id, body.to, actor=principal.subject)
        audit.record_principal(
            conn,
            principal,
            "agents.config.rollback",
            target=agent_id,
            site_id=site,
            detail={"version": body.to, "serial": serial},
            trace_id=trace_id,
        )

    return await _write_and_publish(request, agent_id, write, "rollback")


Version = Annotated[int | None, Query(ge=1, le=2**31 - 1)]


@router.get(
    "/{agent_id}/config",
    summary="Configuration versions of an agent and its status, or one version (and a diff)",
)
async def read_configs(
    request: Request,
    agent_id: AgentId,
    principal: CurrentPrincipal,
    version: Annotated[Version, Query(description="show this version with its text")] = None,
    diff_from: Annotated[
        Version, Query(description="with `version`: a unified diff from this version")
    ] = None,
) -> dict[str, Any]:
    pool = request.app.state.pool

    def read() -> dict[str, Any]:
        with pool.connection() as conn:
            if version is not None:
                row = store.show(conn, agent_id, version)
                if diff_from is not None:
                    row["diff"] = store.diff(conn, agent_id, diff_from, version)
                return row
            site = store.agent_site(conn, agent_id)
            return {
                "agent_id": agent_id,
                "site_id": site,
                "status": store.status(conn, agent_id),
                "versions": store.versions(conn, agent_id),
            }

    try:
        return await run_in_threadpool(with_retry, read, attempts=3)
    except store.UnknownAgent as exc:
        raise _refused(exc) from None
