"""Rules, alerts and the delivery outbox in PostgreSQL (schema `alerts`, 0034_alerts.sql).

Transaction boundaries:
- `evaluate_due_rule`: one transaction per rule. It locks the rule's row (SKIP LOCKED, so
  another worker takes another rule), reads the facts, opens and resolves alerts, writes their
  audit rows and one delivery row per receiver, and moves the rule's next evaluation. All of it
  commits together or not at all: an alert is never open without its notifications queued.
- `deliver_next`: one transaction per notification. It holds the receiver's advisory lock and
  the delivery's row lock while sending, then records the outcome. Another worker skips the
  receiver meanwhile, so a notification is sent by one worker, and a receiver gets its
  notifications in the order they were queued (the oldest pending one first; a later one
  waits for it to be sent or dead-lettered).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import structlog
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from cloud_api.access import audit
from cloud_api.alerts.rules import Evaluation, Finding, RuleSpec, evaluate
from cloud_api.alerts.settings import DeliverySettings

log = structlog.get_logger("cloud_api.alerts")

# Advisory lock keys (two-int form): the class of our locks, then the object.
LOCK_CLASS = 727_275
RULE_SYNC_LOCK = 0
WORKER_ACTOR_KIND = "alerts"


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.isoformat()))


# --- rules ----------------------------------------------------------------------------------


def sync_file_rules(conn: psycopg.Connection[Any], rules: Iterable[RuleSpec], origin: str) -> int:
    """Make the `source = 'file'` rules those of the cloud YAML; returns how many changed.

    Changed, added and removed rules are audited with the file as actor. A rule of the same
    name made through the API is taken over by the file (audited). Several workers starting
    together apply the file one after the other.
    """
    changed = 0
    wanted = {r.name: r for r in rules}
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, RULE_SYNC_LOCK))
        current = {
            r[0]: (r[1], r[2], r[3])
            for r in conn.execute(
                "SELECT rule_id, spec, source, deleted_at FROM alerts.rules FOR UPDATE"
            ).fetchall()
        }
        for name, rule in wanted.items():
            spec = rule.public()
            had = current.get(name)
            if had is not None and had[0] == spec and had[1] == "file" and had[2] is None:
                continue
            _put(conn, rule, source="file", actor=f"file:{origin}")
            audit.record(
                conn,
                actor=f"file:{origin}",
                actor_kind="config",
                action="alert_rule.put",
                target=name,
                site_id=rule.site,
                detail={"rule": spec, "replaced_source": had[1] if had else None},
            )
            changed += 1
        for name, (_spec, source, deleted) in current.items():
            if source == "file" and deleted is None and name not in wanted:
                delete_rule(conn, name, actor=f"file:{origin}")
                audit.record(
                    conn,
                    actor=f"file:{origin}",
                    actor_kind="config",
                    action="alert_rule.delete",
                    target=name,
                )
                changed += 1
    return changed


def _put(conn: psycopg.Connection[Any], rule: RuleSpec, *, source: str, actor: str) -> None:
    conn.execute(
        "INSERT INTO alerts.rules(rule_id, kind, site_id, spec, source, enabled, updated_by) "
        "VALUES (%(id)s, %(kind)s, %(site)s, %(spec)s, %(source)s, %(enabled)s, %(actor)s) "
        "ON CONFLICT (rule_id) DO UPDATE SET kind = excluded.kind, site_id = excluded.site_id, "
        "spec = excluded.spec, source = excluded.source, enabled = excluded.enabled, "
        "deleted_at = NULL, updated_at = now(), updated_by = excluded.updated_by, "
        "next_eval_at = now(), last_error = NULL",
        {
            "id": rule.name,
            "kind": rule.kind,
            "site": rule.site,
            "spec": Jsonb(rule.public()),
            "source": source,
            "enabled": rule.enabled,
            "actor": actor,
        },
    )


def put_api_rule(conn: psycopg.Connection[Any], rule: RuleSpec, actor: str) -> str | None:
    """Create or replace a rule made through the API; returns why not (a file rule), or None.
    Runs in the caller's transaction (the caller writes the audit row)."""
    row = conn.execute(
        "SELECT source, deleted_at FROM alerts.rules WHERE rule_id = %s FOR UPDATE", (rule.name,)
    ).fetchone()
    if row is not None and row[0] == "file" and row[1] is None:
        return f"rule {rule.name!r} is defined in the cloud configuration file; change it there"
    _put(conn, rule, source="api", actor=actor)
    return None


def delete_rule(conn: psycopg.Connection[Any], name: str, *, actor: str) -> bool:
    """Mark a rule deleted; its open alerts are resolved by the next evaluation (which the
    workers run at once). Returns whether a live rule was deleted."""
    row = conn.execute(
        "UPDATE alerts.rules SET deleted_at = now(), enabled = false, updated_at = now(), "
        "updated_by = %s, next_eval_at = now() WHERE rule_id = %s AND deleted_at IS NULL "
        "RETURNING rule_id",
        (actor, name),
    ).fetchone()
    return row is not None


def list_rules(conn: psycopg.Connection[Any], sites: list[str] | None) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT rule_id AS name, kind, site_id AS site, spec, source, enabled, updated_at, "
            "updated_by, evaluated_at, last_error FROM alerts.rules WHERE deleted_at IS NULL "
            "AND (%(sites)s::text[] IS NULL OR site_id = ANY(%(sites)s)) ORDER BY rule_id",
            {"sites": sites},
        ).fetchall()


# --- evaluation -----------------------------------------------------------------------------


def make_due(conn: psycopg.Connection[Any], sites: set[str]) -> None:
    """Make the live rules of `sites` (all of them if it holds '') and those of every site
    due now; in its own statement (autocommit)."""
    conn.execute(
        "UPDATE alerts.rules SET next_eval_at = now() WHERE deleted_at IS NULL AND enabled "
        "AND next_eval_at > now() AND (site_id IS NULL OR site_id = ANY(%s) OR %s)",
        (sorted(sites), "" in sites),
    )


@dataclass(frozen=True)
class Outcome:
    rule: str
    opened: int
    resolved: int


def evaluate_due_rule(
    conn: psycopg.Connection[Any],
    *,
    every_s: float,
    actor: str,
    receivers: Callable[[], set[str]] | None = None,
) -> Outcome | None:
    """Evaluate one rule that is due and not being evaluated elsewhere; None if there is none.

    A rule whose stored spec no longer validates, or whose evaluation fails, is put back with
    its error and evaluated again after `every_s`; the failure is logged, never raised (other
    rules go on).
    """
    with conn.transaction():
        row = conn.execute(
            "SELECT rule_id, spec, enabled, deleted_at FROM alerts.rules "
            "WHERE next_eval_at <= now() ORDER BY next_eval_at, rule_id "
            "LIMIT 1 FOR UPDATE SKIP LOCKED"
        ).fetchone()
        if row is None:
            return None
        name, spec, enabled, deleted = row
        try:
            with conn.transaction():  # a savepoint: a failed evaluation leaves the lock held
                if not enabled or deleted is not None:
                    rule = None
                    found = Evaluation({}, set())
                else:
                    rule = RuleSpec.model_validate(spec)
                    found = evaluate(conn, rule)
                opened, resolved = _apply(conn, name, rule, found, actor)
        except (psycopg.Error, ValueError) as exc:
            if isinstance(exc, psycopg.OperationalError):
                raise
            log.error("rule evaluation failed", rule=name, error=str(exc)[:500])
            conn.execute(
                "UPDATE alerts.rules SET next_eval_at = now() + make_interval(secs => %s), "
                "evaluated_at = now(), last_error = %s WHERE rule_id = %s",
                (every_s, str(exc)[:1000], name),
            )
            return Outcome(name, 0, 0)
        # A disabled or deleted rule has nothing more to do once its alerts are resolved.
        conn.execute(
            "UPDATE alerts.rules SET evaluated_at = now(), last_error = NULL, next_eval_at = "
            "CASE WHEN %(live)s THEN LEAST(now() + make_interval(secs => %(every)s), "
            "%(wake)s::timestamptz) ELSE 'infinity' END WHERE rule_id = %(name)s",
            {"live": rule is not None, "every": every_s, "wake": found.wake_at, "name": name},
        )
    if opened or resolved:
        log.info("alerts changed", rule=name, opened=opened, resolved=resolved)
    return Outcome(name, opened, resolved)


def _payload(event: str, alert: dict[str, Any]) -> dict[str, Any]:
    payload: dict[str, Any] = _json(
        {
            "event": event,
            "alert": {
                "id": alert["alert_id"],
                "rule": alert["rule_id"],
                "kind": alert["kind"],
                "subject": alert["subject"],
                "site": alert["site_id"],
                "equipment": alert["equipment_id"],
                "agent": alert["agent_id"],
                "since": alert["since"],
                "opened_at": alert["opened_at"],
                "resolved_at": alert["resolved_at"],
                "summary": alert["summary"],
                "resolution": alert["resolution"],
                "detail": alert["detail"],
            },
        }
    )
    return payload


_ALERT_COLUMNS = (
    "alert_id, rule_id, kind, subject, site_id, equipment_id, agent_id, since, opened_at, "
    "resolved_at, summary, resolution, detail"
)


def _apply(
    conn: psycopg.Connection[Any],
    name: str,
    rule: RuleSpec | None,
    found: Evaluation,
    actor: str,
) -> tuple[int, int]:
    opened = resolved = 0
    with conn.cursor(row_factory=dict_row) as cur:
        open_rows = cur.execute(
            f"SELECT {_ALERT_COLUMNS} FROM alerts.alerts "
            "WHERE rule_id = %s AND resolved_at IS NULL",
            (name,),
        ).fetchall()
        open_subjects = {r["subject"] for r in open_rows}
        for row in open_rows:
            if row["subject"] in found.holding:
                continue
            why = "rule deleted or disabled" if rule is None else "condition cleared"
            done = cur.execute(
                f"UPDATE alerts.alerts SET resolved_at = now(), resolution = %s "
                f"WHERE alert_id = %s AND resolved_at IS NULL RETURNING {_ALERT_COLUMNS}",
                (why, row["alert_id"]),
            ).fetchone()
            if done is None:
                continue
            _queue(cur, "resolved", done, _receivers(conn, name))
            audit.record(
                conn,
                actor=actor,
                actor_kind=WORKER_ACTOR_KIND,
                action="alert.resolve",
                target=f"{name}/{done['subject']}",
                site_id=done["site_id"],
                detail={"alert_id": done["alert_id"], "resolution": why},
            )
            resolved += 1
        if rule is None:
            return opened, resolved
        for subject, finding in found.firing.items():
            if subject in open_subjects:
                continue
            new = _open(cur, name, rule, finding)
            if new is None:
                continue  # opened meanwhile (cannot happen under the rule lock; guarded anyway)
            _queue(cur, "opened", new, rule.receivers)
            audit.record(
                conn,
                actor=actor,
                actor_kind=WORKER_ACTOR_KIND,
                action="alert.open",
                target=f"{name}/{subject}",
                site_id=finding.site_id,
                detail={"alert_id": new["alert_id"], "summary": finding.summary},
            )
            opened += 1
    return opened, resolved


def _receivers(conn: psycopg.Connection[Any], name: str) -> list[str]:
    """The receivers a rule names now (a resolution goes where the rule sends today)."""
    row = conn.execute("SELECT spec->'receivers' FROM alerts.rules WHERE rule_id = %s", (name,))
    value = row.fetchone()
    return [str(r) for r in (value[0] if value and isinstance(value[0], list) else [])]


def _open(
    cur: psycopg.Cursor[dict[str, Any]], name: str, rule: RuleSpec, f: Finding
) -> dict[str, Any] | None:
    return cur.execute(
        "INSERT INTO alerts.alerts(rule_id, kind, subject, site_id, equipment_id, agent_id, "
        "since, summary, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (rule_id, subject) WHERE resolved_at IS NULL DO NOTHING "
        f"RETURNING {_ALERT_COLUMNS}",
        (
            name,
            rule.kind,
            f.subject,
            f.site_id,
            f.equipment_id,
            f.agent_id,
            f.since,
            f.summary,
            Jsonb(_json(f.detail)),
        ),
    ).fetchone()


def _queue(
    cur: psycopg.Cursor[dict[str, Any]], event: str, alert: dict[str, Any], receivers: list[str]
) -> None:
    payload = Jsonb(_payload(event, alert))
    for receiver in receivers:
        cur.execute(
            "INSERT INTO alerts.deliveries(alert_id, event, receiver, site_id, payload) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (alert_id, event, receiver) DO NOTHING",
            (alert["alert_id"], event, receiver, alert["site_id"], payload),
        )


# --- delivery -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    delivery_id: int
    alert_id: int
    event: str
    receiver: str
    payload: dict[str, Any]
    attempts: int


class DeliveryFailed(Exception):
    """A receiver did not take a notification; the message says why (never a secret)."""


def due_receivers(conn: psycopg.Connection[Any]) -> list[str]:
    """Receivers whose oldest pending notification is due."""
    rows = conn.execute(
        "SELECT receiver FROM (SELECT DISTINCT ON (receiver) receiver, next_attempt_at "
        "FROM alerts.deliveries WHERE status = 'pending' ORDER BY receiver, delivery_id) h "
        "WHERE next_attempt_at <= now()"
    ).fetchall()
    conn.rollback()
    return [r[0] for r in rows]


def deliver_next(
    conn: psycopg.Connection[Any],
    receiver: str,
    send: Callable[[Delivery], None],
    bounds: DeliverySettings,
) -> bool:
    """Send the receiver's oldest pending notification if it is due and no other worker
    serves the receiver; returns whether one was attempted (successfully or not)."""
    with conn.transaction():
        got = conn.execute(
            "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (LOCK_CLASS, receiver)
        ).fetchone()
        if not got or not got[0]:
            return False
        row = conn.execute(
            "SELECT delivery_id, alert_id, event, receiver, payload, attempts, "
            "next_attempt_at <= now() AS due FROM alerts.deliveries "
            "WHERE receiver = %s AND status = 'pending' ORDER BY delivery_id LIMIT 1 FOR UPDATE",
            (receiver,),
        ).fetchone()
        if row is None or not row[6]:
            return False
        delivery = Delivery(row[0], row[1], row[2], row[3], row[4], row[5])
        try:
            send(delivery)
        except DeliveryFailed as exc:
            attempts = delivery.attempts + 1
            dead = attempts >= bounds.max_attempts
            wait = min(bounds.backoff_max, bounds.backoff_first * 2 ** (attempts - 1))
            conn.execute(
                "UPDATE alerts.deliveries SET attempts = %s, last_error = %s, status = %s, "
                "next_attempt_at = now() + make_interval(secs => %s) WHERE delivery_id = %s",
                (attempts, str(exc)[:1000], "dead" if dead else "pending", wait,
                 delivery.delivery_id),
            )  # fmt: skip
            log.warning(
                "notification dead-lettered" if dead else "notification failed, will retry",
                receiver=receiver,
                delivery=delivery.delivery_id,
                attempts=attempts,
                error=str(exc)[:200],
            )
            return True
        conn.execute(
            "UPDATE alerts.deliveries SET attempts = attempts + 1, status = 'sent', "
            "sent_at = now(), last_error = NULL WHERE delivery_id = %s",
            (delivery.delivery_id,),
        )
    return True


def list_alerts(
    conn: psycopg.Connection[Any],
    *,
    state: str,
    sites: list[str] | None,
    site: str | None,
    rule: str | None,
    start: datetime | None,
    end: datetime | None,
    limit: int,
) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT {_ALERT_COLUMNS} FROM alerts.alerts WHERE "
            "(%(sites)s::text[] IS NULL OR site_id = ANY(%(sites)s)) "
            "AND (%(site)s::text IS NULL OR site_id = %(site)s) "
            "AND (%(rule)s::text IS NULL OR rule_id = %(rule)s) "
            "AND (%(state)s = 'all' OR (%(state)s = 'open') = (resolved_at IS NULL)) "
            "AND (%(start)s::timestamptz IS NULL OR opened_at >= %(start)s) "
            "AND (%(end)s::timestamptz IS NULL OR opened_at < %(end)s) "
            "ORDER BY opened_at DESC, alert_id DESC LIMIT %(limit)s",
            {
                "sites": sites,
                "site": site,
                "rule": rule,
                "state": state,
                "start": start,
                "end": end,
                "limit": limit,
            },
        ).fetchall()


def list_deliveries(
    conn: psycopg.Connection[Any], *, status: str, sites: list[str] | None, limit: int
) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "SELECT delivery_id, alert_id, event, receiver, site_id, status, attempts, "
            "created_at, sent_at, next_attempt_at, last_error FROM alerts.deliveries "
            "WHERE status = %(status)s AND (%(sites)s::text[] IS NULL OR site_id = ANY(%(sites)s)) "
            "ORDER BY delivery_id DESC LIMIT %(limit)s",
            {"status": status, "sites": sites, "limit": limit},
        ).fetchall()
