"""Alert rules: what each kind of rule finds in the stored facts.

A rule has a name, a kind, a scope (site, line, equipment; unset parts match everything),
the receivers it notifies and the parameters of its kind:

    machine_stopped    the equipment's newest state event is a stop (`states`, default fault
                       and idle) older than `for`
    shift_kpi_below    the KPI (`kpi`: any of oee.kpis, default oee) of the equipment's
                       running shift, computed from the summed components of its buckets, is
                       worse than its threshold once the shift has `min_planned` of planned
                       busy time: below `below` for a higher-is-better KPI (OEE, MTBF), above
                       `above` for a lower-is-better one (scrap ratio, MTTR, failures), by the
                       KPI's one direction (oee.kpis.BETTER). The running shift: that of the
                       newest bucket, if it ended within the last hour; its calendar time runs
                       from the shift's start to the end of that bucket
    agent_silent       no batch from the agent for `for` (enrolled agents with an active key)
    outbox_age         the agent's oldest unacked batch is older than `oldest_over` now: the
                       age its last status reported plus the time since that report (an
                       agent gone silent with a full outbox still alerts as it ages)
    sequence_gap       an open gap in the agent's batch sequence older than `for`
    rejected_batches   a batch of the agent was refused (signature verified) within `window`

`evaluate` returns what fires now and what still holds: an open alert is resolved only when
its subject no longer holds (a machine stopped for less than `for` after a change from fault
to idle is still stopped; its alert stays open).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import psycopg
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.duration import Duration
from oee.components import COMPONENT_FIELDS, Components
from oee.events import State
from oee.kpis import BETTER, KPI_DEFINITIONS, KPI_NAMES, KpiValue, kpis
from oee.targets import MAX_TARGET, target_error

RuleKind = Literal[
    "machine_stopped",
    "shift_kpi_below",
    "agent_silent",
    "outbox_age",
    "sequence_gap",
    "rejected_batches",
]
RULE_KINDS: tuple[RuleKind, ...] = (
    "machine_stopped",
    "shift_kpi_below",
    "agent_silent",
    "outbox_age",
    "sequence_gap",
    "rejected_batches",
)
_UNITS = {d.name: d.unit for d in KPI_DEFINITIONS}
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
ScopeId = Annotated[str, Field(min_length=1, max_length=128)]
# A shift is "running" while its newest bucket ended at most this long ago.
RUNNING_SHIFT_S = 3600.0

# Parameters each kind takes; any other parameter set on a rule is an error.
_PARAMS: dict[RuleKind, frozenset[str]] = {
    "machine_stopped": frozenset({"for_", "states"}),
    "shift_kpi_below": frozenset({"kpi", "below", "above", "min_planned"}),
    "agent_silent": frozenset({"for_"}),
    "outbox_age": frozenset({"oldest_over"}),
    "sequence_gap": frozenset({"for_"}),
    "rejected_batches": frozenset({"window"}),
}
_REQUIRED: dict[RuleKind, frozenset[str]] = {
    "machine_stopped": frozenset({"for_"}),
    "shift_kpi_below": frozenset(),
    "agent_silent": frozenset({"for_"}),
    "outbox_age": frozenset({"oldest_over"}),
    "sequence_gap": frozenset(),
    "rejected_batches": frozenset(),
}
_ALIASES = {"for_": "for"}


class RuleSpec(BaseModel):
    """One rule, as written in the cloud YAML (`alerts.rules`) or sent to the API."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: Name
    kind: RuleKind
    site: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    line: ScopeId | None = None
    equipment: ScopeId | None = None
    receivers: list[Name] = Field(min_length=1, max_length=20)
    enabled: bool = True
    for_: Duration | None = Field(default=None, alias="for")
    states: list[State] | None = Field(default=None, min_length=1)
    kpi: Annotated[str, Field(max_length=64)] | None = None
    below: float | None = Field(default=None, ge=0, le=MAX_TARGET, allow_inf_nan=False)
    above: float | None = Field(default=None, ge=0, le=MAX_TARGET, allow_inf_nan=False)
    min_planned: Duration | None = None
    oldest_over: Duration | None = None
    window: Duration | None = None

    @model_validator(mode="after")
    def _params_of_kind(self) -> RuleSpec:
        allowed = _PARAMS[self.kind]
        for name in {n for group in _PARAMS.values() for n in group} - allowed:
            if getattr(self, name) is not None:
                raise ValueError(
                    f"`{_ALIASES.get(name, name)}` does not apply to a {self.kind} rule "
                    f"(it takes {', '.join(sorted(_ALIASES.get(n, n) for n in allowed))})"
                )
        for name in _REQUIRED[self.kind]:
            if getattr(self, name) is None:
                raise ValueError(f"a {self.kind} rule needs `{_ALIASES.get(name, name)}`")
        if len(set(self.receivers)) != len(self.receivers):
            raise ValueError("a receiver is named twice")
        if self.kind == "shift_kpi_below":
            self._threshold_of_direction()
        return self

    def _threshold_of_direction(self) -> None:
        """A higher-is-better KPI takes `below`, a lower-is-better one `above`."""
        kpi = self.kpi or "oee"
        if kpi not in KPI_NAMES:
            raise ValueError(f"unknown KPI {kpi[:40]!r}; known: {', '.join(KPI_NAMES)}")
        wanted, other = ("below", "above") if BETTER[kpi] == "higher" else ("above", "below")
        if getattr(self, other) is not None:
            raise ValueError(
                f"`{other}` does not apply to {kpi} ({BETTER[kpi]} is better): use `{wanted}`"
            )
        threshold = getattr(self, wanted)
        if threshold is None:
            raise ValueError(f"a {self.kind} rule needs `{wanted}` for {kpi}")
        problem = target_error(kpi, threshold)
        if problem is not None:
            raise ValueError(problem.replace("the target of", f"`{wanted}` for"))

    def public(self) -> dict[str, Any]:
        """The rule as written (aliases, unset parameters left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


@dataclass(frozen=True)
class Finding:
    """One subject of a rule that fires (or holds): an equipment, an agent or a gap."""

    subject: str
    site_id: str
    summary: str
    since: datetime | None = None
    equipment_id: str | None = None
    agent_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    firing: dict[str, Finding]
    holding: set[str]
    # The earliest moment a subject that holds now crosses the rule's `for`: the rule is
    # evaluated again then (if before its regular next evaluation), so a machine stopped
    # for N minutes is reported after N minutes, not up to `evaluate_every` later.
    wake_at: datetime | None = None

    def wake(self, at: datetime) -> None:
        if self.wake_at is None or at < self.wake_at:
            self.wake_at = at


def _scope(rule: RuleSpec) -> dict[str, Any]:
    return {"site": rule.site, "line": rule.line, "eq": rule.equipment}


_EQUIPMENT_SCOPE = (
    "(%(site)s::text IS NULL OR e.site_id = %(site)s) "
    "AND (%(line)s::text IS NULL OR e.line_id = %(line)s) "
    "AND (%(eq)s::text IS NULL OR e.equipment_id = %(eq)s)"
)
# An agent is in scope when its site is, and (with a line or equipment) when it reported
# equipment matching them.
_AGENT_SCOPE = (
    "(%(site)s::text IS NULL OR a.site_id = %(site)s) "
    "AND ((%(line)s::text IS NULL AND %(eq)s::text IS NULL) OR EXISTS ("
    " SELECT 1 FROM registry.equipment e WHERE e.agent_id = a.agent_id AND e.site_id = a.site_id"
    " AND (%(line)s::text IS NULL OR e.line_id = %(line)s)"
    " AND (%(eq)s::text IS NULL OR e.equipment_id = %(eq)s)))"
)


def _minutes(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def evaluate(conn: psycopg.Connection[Any], rule: RuleSpec) -> Evaluation:
    """What `rule` finds now, read in the caller's transaction."""
    return _KINDS[rule.kind](conn, rule)


def _rows(
    conn: psycopg.Connection[Any], query: str, params: dict[str, Any]
) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query.encode(), params).fetchall()


def _machine_stopped(conn: psycopg.Connection[Any], rule: RuleSpec) -> Evaluation:
    states = list(rule.states or ("fault", "idle"))
    rows = _rows(
        conn,
        "SELECT e.site_id, e.equipment_id, e.line_id, s.ts, s.body->>'state' AS state, "
        "s.body->>'reason' AS reason, extract(epoch FROM now() - s.ts)::float8 AS age_s "
        "FROM registry.equipment e CROSS JOIN LATERAL ("
        " SELECT f.ts, f.body FROM facts.events f WHERE f.site_id = e.site_id"
        " AND f.equipment_id = e.equipment_id AND f.kind = 'state'"
        " ORDER BY f.ts DESC, f.event_id DESC LIMIT 1) s "
        f"WHERE {_EQUIPMENT_SCOPE} AND s.body->>'state' = ANY(%(states)s)",
        {**_scope(rule), "states": states},
    )
    out = Evaluation({}, set())
    for r in rows:
        subject = f"{r['site_id']}/{r['equipment_id']}"
        out.holding.add(subject)
        if r["age_s"] < (rule.for_ or 0.0):
            out.wake(r["ts"] + timedelta(seconds=rule.for_ or 0.0))
            continue
        why = f"{r['state']}: {r['reason']}" if r["reason"] else r["state"]
        out.firing[subject] = Finding(
            subject=subject,
            site_id=r["site_id"],
            equipment_id=r["equipment_id"],
            since=r["ts"],
            summary=f"{r['equipment_id']} at {r['site_id']} stopped ({why}) "
            f"for {_minutes(r['age_s'])}",
            detail={"state": r["state"], "reason": r["reason"], "line": r["line_id"]},
        )
    return out


def _shift_kpi_below(conn: psycopg.Connection[Any], rule: RuleSpec) -> Evaluation:
    sums = ", ".join(f"sum(b.{c})::float8 AS {c}" for c in COMPONENT_FIELDS)
    rows = _rows(
        conn,
        "WITH running AS (SELECT e.site_id, e.equipment_id, l.shift, l.shift_start "
        " FROM registry.equipment e CROSS JOIN LATERAL ("
        "  SELECT b.shift, b.shift_start, b.bucket_end FROM facts.oee_buckets b"
        "  WHERE b.site_id = e.site_id AND b.equipment_id = e.equipment_id"
        "  AND b.bucket_start >= now() - interval '2 days'"
        "  ORDER BY b.bucket_start DESC LIMIT 1) l"
        f" WHERE {_EQUIPMENT_SCOPE} AND l.shift_start IS NOT NULL"
        "  AND l.bucket_end >= now() - make_interval(secs => %(running)s)) "
        f"SELECT r.site_id, r.equipment_id, r.shift, r.shift_start, "
        f"max(b.bucket_end) AS until, {sums} "
        "FROM running r JOIN facts.oee_buckets b ON b.site_id = r.site_id "
        "AND b.equipment_id = r.equipment_id AND b.shift_start = r.shift_start "
        "AND b.bucket_start >= r.shift_start GROUP BY 1, 2, 3, 4",
        {**_scope(rule), "running": RUNNING_SHIFT_S},
    )
    kpi = rule.kpi or "oee"
    higher = BETTER[kpi] == "higher"
    threshold = rule.below if higher else rule.above
    if threshold is None:  # the model refuses such a rule
        return Evaluation({}, set())
    out = Evaluation({}, set())
    for r in rows:
        components = Components.from_mapping(r)
        if components.planned_busy_s < (rule.min_planned or 0.0):
            continue
        calendar_s = (r["until"] - r["shift_start"]).total_seconds()
        value = kpis(components, calendar_s)[kpi]
        if value is None or (value >= threshold if higher else value <= threshold):
            continue
        subject = f"{r['site_id']}/{r['equipment_id']}"
        out.holding.add(subject)
        side = "below" if higher else "above"
        out.firing[subject] = Finding(
            subject=subject,
            site_id=r["site_id"],
            equipment_id=r["equipment_id"],
            since=r["shift_start"],
            summary=f"{kpi} of {r['equipment_id']} at {r['site_id']} in shift "
            f"{r['shift'] or ''} is {_shown(kpi, value)} ({side} {_shown(kpi, threshold)})",
            detail={
                "kpi": kpi,
                "value": value,
                side: threshold,
                "better": BETTER[kpi],
                "shift": r["shift"],
                "shift_start": r["shift_start"].isoformat(),
                "planned_busy_s": components.planned_busy_s,
            },
        )
    return out


def _shown(kpi: str, value: KpiValue) -> str:
    """A KPI's value in its unit, for a summary."""
    if value is None:
        return "undefined"
    unit = _UNITS[kpi]
    if unit == "ratio":
        return f"{value:.1%}"
    if unit == "seconds":
        return _minutes(float(value))
    if unit == "count":
        return f"{value:g}"
    return f"{value:.1f} {unit}"


def _agent_silent(conn: psycopg.Connection[Any], rule: RuleSpec) -> Evaluation:
    rows = _rows(
        conn,
        "SELECT a.agent_id, a.site_id, a.last_seen, "
        "COALESCE(a.last_seen, a.enrolled_at) AS heard, "
        "extract(epoch FROM now() - COALESCE(a.last_seen, a.enrolled_at))::float8 AS age_s "
        f"FROM registry.agents a WHERE {_AGENT_SCOPE} "
        "AND EXISTS (SELECT 1 FROM registry.agent_keys k WHERE k.agent_id = a.agent_id "
        "AND k.revoked_at IS NULL)",
        _scope(rule),
    )
    out = Evaluation({}, set())
    for r in rows:
        subject = r["agent_id"]
        if r["age_s"] < (rule.for_ or 0.0):
            out.wake(r["heard"] + timedelta(seconds=rule.for_ or 0.0))
            continue
        out.holding.add(subject)
        seen = "never sent a batch" if r["last_seen"] is None else "sent no batch"
        out.firing[subject] = Finding(
            subject=subject,
            site_id=r["site_id"],
            agent_id=r["agent_id"],
            since=r["last_seen"],
            summary=f"agent {r['agent_id']} at {r['site_id']} {seen} for {_minutes(r['age_s'])}",
            detail={"last_seen": r["last_seen"].isoformat() if r["last_seen"] else None},
        )
    return out


def _outbox_age(conn: psycopg.Connection[Any], rule: RuleSpec) -> Evaluation:
    # The age now: the age the agent last reported plus the time since that report. An agent
    # that went silent with batches unacked still has them (acks come from the cloud, and
    # none reached it since, or it would have reported them), so its outbox keeps ageing.
    rows = _rows(
        conn,
        "SELECT agent_id, site_id, status_reported_at, reported_s, depth,"
        " reported_s + greatest(0, extract(epoch FROM now()"
        "  - COALESCE(status_reported_at, now())))::float8 AS age_s FROM ("
        " SELECT a.agent_id, a.site_id, a.status_reported_at,"
        " CASE WHEN jsonb_typeof(a.status->'outbox_oldest_unacked_s') = 'number'"
        "  THEN (a.status->>'outbox_oldest_unacked_s')::float8 END AS reported_s,"
        " a.status->'outbox_depth' AS depth"
        f" FROM registry.agents a WHERE {_AGENT_SCOPE}) s WHERE reported_s IS NOT NULL",
        _scope(rule),
    )
    over = rule.oldest_over or 0.0
    out = Evaluation({}, set())
    for r in rows:
        subject = r["agent_id"]
        reported_at = r["status_reported_at"]
        if r["age_s"] <= over:
            if reported_at is not None:
                # The moment the oldest batch crosses the limit if nothing is acked before.
                out.wake(reported_at + timedelta(seconds=over - r["reported_s"]))
            continue
        out.holding.add(subject)
        out.firing[subject] = Finding(
            subject=subject,
            site_id=r["site_id"],
            agent_id=r["agent_id"],
            summary=f"outbox of agent {r['agent_id']} at {r['site_id']}: oldest unacked batch "
            f"{_minutes(r['age_s'])} old",
            detail={
                "outbox_oldest_unacked_s": r["age_s"],
                "reported_oldest_unacked_s": r["reported_s"],
                "outbox_depth": r["depth"],
                "reported_at": reported_at.isoformat() if reported_at else None,
            },
        )
    return out


def _sequence_gap(conn: psycopg.Connection[Any], rule: RuleSpec) -> Evaluation:
    rows = _rows(
        conn,
        "SELECT g.id, g.site_id, g.agent_id, g.epoch, g.first_seq, g.last_seq, g.detected_at, "
        "extract(epoch FROM now() - g.detected_at)::float8 AS age_s "
        "FROM ops.seq_gaps g JOIN registry.agents a "
        "ON a.site_id = g.site_id AND a.agent_id = g.agent_id "
        f"WHERE g.resolved_at IS NULL AND {_AGENT_SCOPE}",
        _scope(rule),
    )
    out = Evaluation({}, set())
    for r in rows:
        subject = f"{r['agent_id']}/{r['epoch']}/{r['first_seq']}-{r['last_seq']}"
        out.holding.add(subject)
        if r["age_s"] < (rule.for_ or 0.0):
            out.wake(r["detected_at"] + timedelta(seconds=rule.for_ or 0.0))
            continue
        count = r["last_seq"] - r["first_seq"] + 1
        out.firing[subject] = Finding(
            subject=subject,
            site_id=r["site_id"],
            agent_id=r["agent_id"],
            since=r["detected_at"],
            summary=f"agent {r['agent_id']} at {r['site_id']}: {count} batch(es) missing "
            f"(seq {r['first_seq']}..{r['last_seq']} of epoch {r['epoch']})",
            detail={"epoch": r["epoch"], "first_seq": r["first_seq"], "last_seq": r["last_seq"]},
        )
    return out


def _rejected_batches(conn: psycopg.Connection[Any], rule: RuleSpec) -> Evaluation:
    # Only refusals charged after the agent's signature verified: anyone can send unsigned
    # frames naming an agent (0031_verified_rejects.sql), which must not page anyone.
    rows = _rows(
        conn,
        "SELECT a.agent_id, a.site_id, jsonb_object_agg(r.reason, r.count) AS reasons, "
        "max(r.last_at) AS last_at FROM ("
        " SELECT agent_id, reason, sum(count) AS count, max(last_at) AS last_at"
        " FROM ops.reject_counts WHERE verified AND agent_id <> '' GROUP BY 1, 2) r "
        "JOIN registry.agents a ON a.agent_id = r.agent_id "
        f"WHERE {_AGENT_SCOPE} AND r.last_at > now() - make_interval(secs => %(window)s) "
        "GROUP BY 1, 2",
        {**_scope(rule), "window": rule.window or 3600.0},
    )
    out = Evaluation({}, set())
    for r in rows:
        subject = r["agent_id"]
        out.holding.add(subject)
        reasons = ", ".join(f"{k} ({v})" for k, v in sorted(r["reasons"].items()))
        out.firing[subject] = Finding(
            subject=subject,
            site_id=r["site_id"],
            agent_id=r["agent_id"],
            since=r["last_at"],
            summary=f"agent {r['agent_id']} at {r['site_id']}: batches refused: {reasons}",
            detail={"rejected_batches": r["reasons"]},
        )
    return out


_KINDS = {
    "machine_stopped": _machine_stopped,
    "shift_kpi_below": _shift_kpi_below,
    "agent_silent": _agent_silent,
    "outbox_age": _outbox_age,
    "sequence_gap": _sequence_gap,
    "rejected_batches": _rejected_batches,
}
