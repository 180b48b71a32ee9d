"""Configuration versions of agents in PostgreSQL: push, list, show, diff, rollback, status.

Every function runs in the caller's transaction (the API's site-scoped checkout or a CLI
connection) and writes its audit row there, so a version and its audit row commit together.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import psycopg
import yaml
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from oee.events import AgentEvent
from sync.config_message import MAX_CONFIG_TEXT, config_digest

RESULT_CODE = "config_result"  # the agent event that reports an outcome (agent/remote_config.py)
_ENV_REFERENCE = "${"
# Keys whose value is a secret: a pushed file may only name an environment variable there.
_SECRET_KEYS = frozenset({"password", "secret", "token", "api_key", "private_key"})


class ConfigRefused(ValueError):
    """A pushed configuration or a rollback cannot be stored; the message says why."""


class UnknownAgent(LookupError):
    """No such agent (or not visible to the caller)."""


@dataclass(frozen=True)
class Current:
    """The version the cloud wants an agent to run, as published."""

    agent_id: str
    site_id: str
    version: int
    serial: int
    rollback: bool
    yaml: str
    digest: str
    comment: str


def check_text(text: str, agent_id: str) -> None:
    """What the cloud checks before storing a file (the agent validates it in full): size,
    YAML mapping, the agent it names, and no secret written as a value."""
    if len(text) > MAX_CONFIG_TEXT:
        raise ConfigRefused(f"the file exceeds {MAX_CONFIG_TEXT} characters")
    if "\x00" in text:
        raise ConfigRefused("the file holds a NUL character")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigRefused(f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigRefused("expected a mapping with agent, equipment, ... at the top")
    agent = data.get("agent")
    named = agent.get("id") if isinstance(agent, dict) else None
    if named != agent_id:
        raise ConfigRefused(f"agent.id is {named!r}, not {agent_id!r}")
    for path in _secret_values(data, ""):
        raise ConfigRefused(
            f"{path} holds a secret as a value: write a reference such as ${{MQTT_PASSWORD}} "
            "and set it on the edge box (secrets never leave it)"
        )


def _secret_values(node: Any, path: str) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if str(key) in _SECRET_KEYS and value is not None:
                if not (isinstance(value, str) and value.strip().startswith(_ENV_REFERENCE)):
                    found.append(where)
            else:
                found += _secret_values(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _secret_values(value, f"{path}[{i}]")
    return found


def agent_site(conn: psycopg.Connection[Any], agent_id: str) -> str:
    row = conn.execute(
        "SELECT site_id FROM registry.agents WHERE agent_id = %s", (agent_id,)
    ).fetchone()
    if row is None:
        raise UnknownAgent(f"no agent {agent_id!r}")
    return str(row[0])


def _lock(conn: psycopg.Connection[Any], agent_id: str) -> None:
    # One writer per agent at a time: version and serial numbers are max + 1.
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('agent_config:' || %s, 0))",
                 (agent_id,))  # fmt: skip


def _next_serial(conn: psycopg.Connection[Any], agent_id: str) -> int:
    row = conn.execute(
        "SELECT serial FROM registry.agent_config_current WHERE agent_id = %s", (agent_id,)
    ).fetchone()
    return int(row[0]) + 1 if row else 1


def _set_current(
    conn: psycopg.Connection[Any],
    site_id: str,
    agent_id: str,
    version: int,
    serial: int,
    *,
    rollback: bool,
    actor: str,
) -> None:
    conn.execute(
        "INSERT INTO registry.agent_config_current(site_id, agent_id, version, serial, rollback,"
        " changed_by) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (agent_id) DO UPDATE SET"
        " version = excluded.version, serial = excluded.serial, rollback = excluded.rollback,"
        " changed_by = excluded.changed_by, changed_at = now(), published_at = NULL",
        (site_id, agent_id, version, serial, rollback, actor),
    )


def push(
    conn: psycopg.Connection[Any],
    agent_id: str,
    text: str,
    *,
    author: str,
    comment: str = "",
    trace_id: str | None = None,
) -> tuple[str, int, int]:
    """Store a new version and make it current; returns (site, version, serial)."""
    site_id = agent_site(conn, agent_id)
    check_text(text, agent_id)
    _lock(conn, agent_id)
    row = conn.execute(
        "SELECT COALESCE(max(version), 0) + 1 FROM registry.agent_configs WHERE agent_id = %s",
        (agent_id,),
    ).fetchone()
    assert row is not None
    version = int(row[0])
    serial = _next_serial(conn, agent_id)
    conn.execute(
        "INSERT INTO registry.agent_configs(site_id, agent_id, version, yaml, digest, author,"
        " comment, trace_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (site_id, agent_id, version, text, config_digest(text), author, comment, trace_id),
    )
    _set_current(conn, site_id, agent_id, version, serial, rollback=False, actor=author)
    return site_id, version, serial


def rollback(
    conn: psycopg.Connection[Any], agent_id: str, to: int, *, actor: str
) -> tuple[str, int]:
    """Make an earlier version current again; returns (site, serial)."""
    site_id = agent_site(conn, agent_id)
    _lock(conn, agent_id)
    row = conn.execute(
        "SELECT 1 FROM registry.agent_configs WHERE agent_id = %s AND version = %s",
        (agent_id, to),
    ).fetchone()
    if row is None:
        raise ConfigRefused(f"agent {agent_id} has no configuration version {to}")
    serial = _next_serial(conn, agent_id)
    _set_current(conn, site_id, agent_id, to, serial, rollback=True, actor=actor)
    return site_id, serial


def current(conn: psycopg.Connection[Any], agent_id: str) -> Current | None:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT c.agent_id, c.site_id, c.version, c.serial, c.rollback, v.yaml, v.digest,"
            " v.comment FROM registry.agent_config_current c JOIN registry.agent_configs v"
            " USING (agent_id, version) WHERE c.agent_id = %s",
            (agent_id,),
        ).fetchone()
    return Current(**row) if row else None


def mark_published(conn: psycopg.Connection[Any], agent_id: str, serial: int) -> None:
    conn.execute(
        "UPDATE registry.agent_config_current SET published_at = now() "
        "WHERE agent_id = %s AND serial = %s",
        (agent_id, serial),
    )


def versions(conn: psycopg.Connection[Any], agent_id: str) -> list[dict[str, Any]]:
    """Every version, newest first, without the text; `current` marks the desired one."""
    agent_site(conn, agent_id)
    with conn.cursor(row_factory=dict_row) as cur:
        rows: list[dict[str, Any]] = cur.execute(
            "SELECT v.version, v.digest, v.author, v.created_at, v.comment, v.trace_id,"
            " (c.version IS NOT NULL) AS current FROM registry.agent_configs v"
            " LEFT JOIN registry.agent_config_current c"
            "  ON c.agent_id = v.agent_id AND c.version = v.version"
            " WHERE v.agent_id = %s ORDER BY v.version DESC",
            (agent_id,),
        ).fetchall()
    return rows


def show(conn: psycopg.Connection[Any], agent_id: str, version: int) -> dict[str, Any]:
    agent_site(conn, agent_id)
    with conn.cursor(row_factory=dict_row) as cur:
        row: dict[str, Any] | None = cur.execute(
            "SELECT site_id, agent_id, version, yaml, digest, author, created_at, comment,"
            " trace_id FROM registry.agent_configs WHERE agent_id = %s AND version = %s",
            (agent_id, version),
        ).fetchone()
    if row is None:
        raise UnknownAgent(f"agent {agent_id} has no configuration version {version}")
    return row


def diff(conn: psycopg.Connection[Any], agent_id: str, old: int, new: int) -> str:
    """A unified diff of two versions' texts."""
    a, b = show(conn, agent_id, old), show(conn, agent_id, new)
    return "".join(
        difflib.unified_diff(
            a["yaml"].splitlines(keepends=True),
            b["yaml"].splitlines(keepends=True),
            fromfile=f"{agent_id} version {old}",
            tofile=f"{agent_id} version {new}",
        )
    )


def record_result(conn: psycopg.Connection[Any], event: AgentEvent) -> None:
    """Keep the newest `config_result` of an agent (ingest, in the batch's transaction)."""
    data = event.data
    running = data.get("running_version")
    last = {
        "result": data.get("result"),
        "version": data.get("version"),
        "serial": data.get("serial"),
        "reason": data.get("reason"),
        "problems": data.get("problems") or [],
        "at": event.ts.isoformat(),
    }
    conn.execute(
        "INSERT INTO registry.agent_config_reported AS r(site_id, agent_id, running_version,"
        " last_result, reported_at) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (agent_id) DO UPDATE"
        " SET running_version = excluded.running_version, last_result = excluded.last_result,"
        " reported_at = excluded.reported_at WHERE r.reported_at <= excluded.reported_at",
        (
            event.site_id,
            event.agent_id,
            running if isinstance(running, int) else None,
            Jsonb(last),
            event.ts,
        ),
    )


def statuses(conn: psycopg.Connection[Any], agent_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Per agent: the desired version (the cloud's), the running version and the last result
    (as the agent last reported them)."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT a.agent_id, c.version, c.serial, c.published_at, r.running_version,"
            " r.last_result, r.reported_at FROM unnest(%s::text[]) AS a(agent_id)"
            " LEFT JOIN registry.agent_config_current c ON c.agent_id = a.agent_id"
            " LEFT JOIN registry.agent_config_reported r ON r.agent_id = a.agent_id",
            (agent_ids,),
        ).fetchall()
    return {
        r["agent_id"]: {
            "desired_version": r["version"],
            "desired_serial": r["serial"],
            "published_at": r["published_at"],
            "running_version": r["running_version"],
            "reported_at": r["reported_at"],
            "last_result": r["last_result"],
        }
        for r in rows
    }


def status(conn: psycopg.Connection[Any], agent_id: str) -> dict[str, Any]:
    return statuses(conn, [agent_id])[agent_id]
