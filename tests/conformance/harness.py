"""What the conformance tests share: the agent process with a given configuration, the ground
truth a PLC server logs, and the end of every test (settle, check every view, compare with
the truth, leave the table)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from sync.keys import CloudKeyring
from tests.conftest import MQTT_PORT, enroll, make_agent_keys
from tests.faults.harness import Agent, settle, wait_for
from tests.invariants import (
    Truth,
    Views,
    api_client,
    check_views,
    compare_with_truth,
    dump_events,
    report,
    wait_counted,
)

SITE = "plant-conformance"
AGENT_ID = "edge-conformance"
STATE_MAP = "{0: idle, 1: running, 2: fault, 3: setup, 4: planned_stop}"
REASONS = {1: "no material", 2: "tool change", 3: "jam"}
REASON_MAP = "{" + ", ".join(f"{k}: {v}" for k, v in REASONS.items()) + "}"
STOP_STATES = ("fault", "idle")

AGENT_HEAD = """
agent:
  id: {agent_id}
  site: {site}
  timezone: UTC
  state_dir: {state}
  bucket_seconds: 2
mqtt:
  host: 127.0.0.1
  port: {mqtt_port}
  topic_prefix: "{prefix}"
health:
  port: {health_port}
uplink:
  flush_interval: 200ms
  ack_timeout: 2s
  drain_timeout: 3s
shifts:
  - name: all-day
    start: "00:00"
    end: "00:00"
"""


@dataclass
class ConfiguredAgent(Agent):
    """`edge-agent run` with `connections:` and `equipment:` given as YAML text."""

    body: str = ""

    def write_config(self) -> None:
        head = AGENT_HEAD.format(
            agent_id=self.agent_id,
            site=self.site,
            state=self.state,
            mqtt_port=self.mqtt_port,
            prefix=self.prefix,
            health_port=self.health_port,
        )
        self.config_path.write_text(head + self.body, encoding="utf-8")


def new_agent(
    folder: Path, ring: CloudKeyring, pg_url: str, prefix: str, body: str
) -> ConfiguredAgent:
    agent = ConfiguredAgent(
        folder=folder,
        plc_port=0,
        mqtt_port=MQTT_PORT,
        prefix=prefix,
        agent_id=AGENT_ID,
        site=SITE,
        body=body,
    )
    folder.mkdir(parents=True, exist_ok=True)
    enroll(pg_url, AGENT_ID, SITE, make_agent_keys(agent.keys_dir, ring))
    return agent


@dataclass(frozen=True)
class Change:
    """A PLC set a machine's state and reason at `t` (its own clock)."""

    machine: str
    t: datetime
    state: str
    reason: str | None


@dataclass
class GroundTruth:
    """What the PLC server logged: state and reason changes, and parts made per machine."""

    changes: list[Change] = field(default_factory=list)
    made: dict[str, tuple[int, int]] = field(default_factory=dict)  # produced, scrap

    def add(self, change: Change) -> None:
        self.changes.append(change)

    def truths(self) -> dict[str, Truth]:
        """Per machine: parts, scrap and the stops in order with their seconds by reason.
        A restarted server repeats the state it starts in: that is no change."""
        out = {}
        for machine, (produced, scrap) in self.made.items():
            timeline: list[Change] = []
            for c in sorted((c for c in self.changes if c.machine == machine), key=lambda c: c.t):
                if timeline and (timeline[-1].state, timeline[-1].reason) == (c.state, c.reason):
                    continue
                timeline.append(c)
            seconds: dict[str, float] = {}
            for c, nxt in itertools.pairwise(timeline):
                if c.state in STOP_STATES:
                    key = c.reason or "unspecified"
                    seconds[key] = seconds.get(key, 0.0) + (nxt.t - c.t).total_seconds()
            out[machine] = Truth(
                produced=produced,
                scrap=scrap,
                stops=[(c.state, c.reason) for c in timeline if c.state in STOP_STATES],
                stop_seconds=seconds,
            )
        return out


def stored_states(pg_url: str) -> dict[str, int]:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT equipment_id, count(*) FROM facts.events WHERE kind = 'state' GROUP BY 1"
        ).fetchall()
    return {str(r[0]): int(r[1]) for r in rows}


async def wait_for_states(pg_url: str, machines: Iterable[str], state: str) -> None:
    """Until the cloud has each machine's current state `state` (its baseline is read)."""

    def current() -> bool:
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute(
                "SELECT DISTINCT ON (equipment_id) equipment_id, body->>'state' FROM facts.events "
                "WHERE kind = 'state' ORDER BY equipment_id, ts DESC"
            ).fetchall()
        now = {str(r[0]): str(r[1]) for r in rows}
        return all(now.get(m) == state for m in machines)

    await wait_for(current, 60, f"every machine {state} in the cloud")


async def finish(
    name: str,
    agent: Agent,
    pg_url: str,
    tmp_path: Path,
    truths: dict[str, Truth],
    after: datetime,
    *,
    tolerance_s: float,
) -> dict[str, Views]:
    """Let the agent close the buckets past `after` (the PLC's last change), stop it, let
    everything ship; then every view against the others and against the PLC."""
    await wait_counted(pg_url, {m: (t.produced, t.scrap) for m, t in truths.items()}, after)
    await settle(agent)
    try:
        with api_client(pg_url, tmp_path / "views-keys") as api:
            views = await asyncio.to_thread(check_views, api, pg_url, truths=truths)
        report(name, views, truths)
        compare_with_truth(views, truths, tolerance_s=tolerance_s)
    except AssertionError:
        dump_events(pg_url, tmp_path / "events.jsonl")  # the database goes with the test
        raise
    return views


def utc_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def parse_line(line: str) -> dict[str, object] | None:
    """One ground-truth line of a PLC server (JSON), or None for its other output."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
