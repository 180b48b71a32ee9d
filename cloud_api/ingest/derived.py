"""What ingest derives from a stored batch besides facts and rollups, in the same transaction.

- Data versions: one row per (site, equipment, UTC day) of rollup data, bumped from a global
  sequence whenever a batch adds buckets to that day. The query API's result cache keys on
  the largest version over a query's scope and window, so late data invalidates exactly the
  cached results whose window it touches.
- Agent status, from `agent` events with code ``status``. Data keys read (all optional):
  ``version`` (str), ``outbox_depth`` (int, batches not yet acked), ``outbox_events`` (int),
  ``outbox_bytes`` (int), ``outbox_oldest_unacked_s`` (float, age of the oldest unacked
  batch), ``clock_offset_s`` (float, agent clock minus a reference clock such as NTP; positive
  means the agent is ahead), ``connectors`` (object, free form). The newest report wins.
- Reported configuration, from `agent` events with code ``config``. Data keys read:
  ``timezone`` (IANA name), ``shifts`` (list, as in the agent's YAML), ``equipment`` (list of
  objects with ``id``, optional ``line``, optional ``reasons`` mapping code -> reason text,
  anything else is kept as the equipment's configuration), ``targets`` (site and line targets:
  ``{"site": {kpi: value}, "lines": {line: {kpi: value}}}``; an equipment's under its own
  ``targets``). Targets of the newest report of an agent replace that agent's earlier ones
  (source ``config`` of registry.targets; targets set through the API are left alone).
- Configuration outcome, from `agent` events with code ``config_result`` (agent/remote_config.py):
  the running version and the last result, newest report wins (cloud_api/fleetconfig/).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg

from cloud_api.fleetconfig import store as config_store
from cloud_api.ingest.sequence import LOSS_CODE, REJECTED_CODE
from oee.events import AgentEvent, Event
from oee.targets import target_error

STATUS_CODE = "status"
CONFIG_CODE = "config"
STATUS_KEYS: tuple[str, ...] = (
    "version",
    "outbox_depth",
    "outbox_events",
    "outbox_bytes",
    "outbox_oldest_unacked_s",
    "clock_offset_s",
    "connectors",
)

# Reads the ingest's staging table of the current batch's OEE buckets.
DATA_VERSIONS_SQL = (
    "INSERT INTO rollups.data_versions AS v (site_id, equipment_id, day, version) "
    "SELECT site_id, equipment_id, (bucket_start AT TIME ZONE 'UTC')::date, "
    "nextval('rollups.data_version_seq') FROM _new_buckets GROUP BY 1, 2, 3 "
    "ON CONFLICT (site_id, equipment_id, day) DO UPDATE SET version = excluded.version"
)


def record_batch(
    conn: psycopg.Connection[Any], events: Sequence[Event], *, has_buckets: bool
) -> None:
    """Apply everything derived from one batch; runs inside the ingest transaction."""
    if has_buckets:
        conn.execute(DATA_VERSIONS_SQL)
    record_reports(conn, events)


# Agent events whose effects only record_reports and record_declared_losses apply, with
# statements of their own; a batch without them is stored by one call (ops.ingest_batch).
STATEMENT_CODES = frozenset({CONFIG_CODE, config_store.RESULT_CODE, LOSS_CODE, REJECTED_CODE})


def needs_statements(events: Sequence[Event]) -> bool:
    """Whether the batch holds reports or loss records applied by statements of their own
    (configuration, configuration outcome, loss records); a status report does not."""
    return any(isinstance(e, AgentEvent) and e.code in STATEMENT_CODES for e in events)


def status_report(events: Sequence[Event]) -> tuple[str, str | None, datetime] | None:
    """The newest status report of a batch as stored: its kept keys (JSON), the version it
    names and its time; None without one."""
    status = _latest(events, STATUS_CODE)
    return None if status is None else _status_values(status)


def _status_values(status: AgentEvent) -> tuple[str, str | None, datetime]:
    data = {k: status.data[k] for k in STATUS_KEYS if k in status.data}
    version = data.get("version")
    return json.dumps(data), str(version) if version is not None else None, status.ts


def record_reports(conn: psycopg.Connection[Any], events: Sequence[Event]) -> None:
    """The agent's status, configuration and configuration outcome reported in one batch."""
    status = _latest(events, STATUS_CODE)
    if status is not None:
        data, version, ts = _status_values(status)
        conn.execute(
            "UPDATE registry.agents SET status = %s::jsonb, "
            "version = COALESCE(%s, version), status_reported_at = %s "
            "WHERE agent_id = %s AND (status_reported_at IS NULL OR status_reported_at < %s)",
            (data, version, ts, status.agent_id, ts),
        )
    config = _latest(events, CONFIG_CODE)
    if config is not None:
        _record_config(conn, config)
    result = _latest(events, config_store.RESULT_CODE)
    if result is not None:
        config_store.record_result(conn, result)


def _latest(events: Sequence[Event], code: str) -> AgentEvent | None:
    found = [e for e in events if isinstance(e, AgentEvent) and e.code == code]
    return max(found, key=lambda e: e.ts) if found else None


def _record_config(conn: psycopg.Connection[Any], event: AgentEvent) -> None:
    data = event.data
    timezone = data.get("timezone")
    if isinstance(timezone, str):
        conn.execute(
            "UPDATE registry.sites SET timezone = %s WHERE site_id = %s", (timezone, event.site_id)
        )
    shifts = data.get("shifts")
    conn.execute(
        "INSERT INTO registry.shift_calendars(site_id, agent_id, timezone, shifts, reported_at) "
        "VALUES (%s, %s, %s, %s::jsonb, %s) ON CONFLICT (site_id, agent_id) DO UPDATE SET "
        "timezone = excluded.timezone, shifts = excluded.shifts, "
        "reported_at = excluded.reported_at "
        "WHERE registry.shift_calendars.reported_at <= excluded.reported_at",
        (
            event.site_id,
            event.agent_id,
            timezone if isinstance(timezone, str) else None,
            json.dumps(shifts if isinstance(shifts, list) else []),
            event.ts,
        ),
    )
    equipment = data.get("equipment")
    if not isinstance(equipment, list):
        equipment = []
    _record_targets(conn, event, equipment)
    for item in equipment:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        line = item.get("line") if isinstance(item.get("line"), str) else None
        if line is not None:
            conn.execute(
                "INSERT INTO registry.lines(site_id, line_id) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING",
                (event.site_id, line),
            )
        conn.execute(
            "INSERT INTO registry.equipment(site_id, equipment_id, line_id, agent_id, config) "
            "VALUES (%s, %s, %s, %s, %s::jsonb) ON CONFLICT (site_id, equipment_id) DO UPDATE "
            "SET line_id = excluded.line_id, agent_id = excluded.agent_id, "
            "config = excluded.config, updated_at = now()",
            (event.site_id, item["id"], line, event.agent_id, json.dumps(item)),
        )
        reasons = item.get("reasons")
        if isinstance(reasons, dict):
            for code, reason in reasons.items():
                conn.execute(
                    "INSERT INTO registry.reason_codes(site_id, equipment_id, code, reason) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (site_id, equipment_id, code) "
                    "DO UPDATE SET reason = excluded.reason",
                    (event.site_id, item["id"], str(code), str(reason)),
                )


def _target_rows(data: dict[str, Any], equipment: list[Any]) -> dict[tuple[str, str, str], float]:
    """(scope, scope id, kpi) -> value of the targets a config event reports (entries that
    oee.targets refuses are left out: an agent validated them already)."""
    out: dict[tuple[str, str, str], float] = {}

    def add(scope: str, scope_id: str, targets: object) -> None:
        if isinstance(targets, dict):
            for kpi, value in targets.items():
                if isinstance(kpi, str) and target_error(kpi, value) is None:
                    out[(scope, scope_id, kpi)] = float(value)

    reported = data.get("targets")
    if isinstance(reported, dict):
        add("site", "", reported.get("site"))
        lines = reported.get("lines")
        for line, targets in lines.items() if isinstance(lines, dict) else ():
            add("line", str(line), targets)
    for item in equipment:
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            add("equipment", item["id"], item.get("targets"))
    return out


def _record_targets(conn: psycopg.Connection[Any], event: AgentEvent, equipment: list[Any]) -> None:
    """Replace the agent's configured targets with those of this report, if it is the newest
    (the calendar upsert just before keeps the newest report's time). Only rows that change
    are written: each written row bumps the data versions it applies to (migration 0037)."""
    newest = conn.execute(
        "SELECT 1 FROM registry.shift_calendars WHERE site_id = %s AND agent_id = %s "
        "AND reported_at = %s",
        (event.site_id, event.agent_id, event.ts),
    ).fetchone()
    if newest is None:
        return
    rows = _target_rows(event.data, equipment)
    stored = conn.execute(
        "SELECT scope, scope_id, kpi FROM registry.targets "
        "WHERE site_id = %s AND source = 'config' AND agent_id = %s",
        (event.site_id, event.agent_id),
    ).fetchall()
    for scope, scope_id, kpi in stored:
        if (scope, scope_id, kpi) not in rows:
            conn.execute(
                "DELETE FROM registry.targets WHERE site_id = %s AND scope = %s "
                "AND scope_id = %s AND kpi = %s AND source = 'config'",
                (event.site_id, scope, scope_id, kpi),
            )
    for (scope, scope_id, kpi), value in rows.items():
        conn.execute(
            "INSERT INTO registry.targets AS t (site_id, scope, scope_id, kpi, source, value, "
            "agent_id, set_by, set_at) VALUES (%s, %s, %s, %s, 'config', %s, %s, %s, %s) "
            "ON CONFLICT (site_id, scope, scope_id, kpi, source) DO UPDATE SET "
            "value = excluded.value, agent_id = excluded.agent_id, set_by = excluded.set_by, "
            "set_at = excluded.set_at "
            "WHERE t.value IS DISTINCT FROM excluded.value OR t.agent_id <> excluded.agent_id",
            (event.site_id, scope, scope_id, kpi, value, event.agent_id,
             f"agent:{event.agent_id}", event.ts),
        )  # fmt: skip
