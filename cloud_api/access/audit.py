"""The audit trail: one append-only row per write (who, what, when, on what, trace id).

Writers call `record()` inside the transaction of the change itself, so a change and its audit
row commit together or not at all. The table refuses UPDATE, DELETE and TRUNCATE for everyone
(a trigger), and the API and ingest roles are granted only INSERT and SELECT on it.
"""

from __future__ import annotations

import getpass
import os
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from cloud_api.access.auth import Principal


def record(
    conn: psycopg.Connection[Any],
    *,
    actor: str,
    actor_kind: str,
    action: str,
    target: str | None = None,
    site_id: str | None = None,
    detail: dict[str, Any] | None = None,
    trace_id: str | None = None,
) -> int:
    """Append one audit row in the caller's transaction; returns its id. Never pass secrets."""
    row = conn.execute(
        "INSERT INTO audit.records(actor, actor_kind, action, target, site_id, detail, trace_id) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (actor, actor_kind, action, target, site_id, Jsonb(detail or {}), trace_id),
    ).fetchone()
    assert row is not None
    return int(row[0])


def record_principal(
    conn: psycopg.Connection[Any],
    principal: Principal,
    action: str,
    *,
    target: str | None = None,
    site_id: str | None = None,
    detail: dict[str, Any] | None = None,
    trace_id: str | None = None,
) -> int:
    """Audit a write made through the HTTP API by `principal`."""
    return record(
        conn,
        actor=principal.subject,
        actor_kind=f"{principal.kind}:{principal.role}",
        action=action,
        target=target,
        site_id=site_id,
        detail={"credential": principal.credential_id, **(detail or {})},
        trace_id=trace_id,
    )


def record_cli(
    conn: psycopg.Connection[Any],
    action: str,
    *,
    target: str | None = None,
    site_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> int:
    """Audit a write made by an operator through a `cloud-api` command."""
    return record(
        conn,
        actor=cli_actor(),
        actor_kind="cli",
        action=action,
        target=target,
        site_id=site_id,
        detail=detail,
    )


def cli_actor() -> str:
    """The operator running a `cloud-api` command (the sudo caller when run through sudo)."""
    user = os.environ.get("SUDO_USER") or getpass.getuser()
    return f"cli:{user}"
