"""Sealed batches made the way the agent makes them, for the in-process fault tests."""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from buffer.outbox import Outbox, Sealer
from common.checks import validate, validated
from connectors.sample import Sample
from oee.calendar import ShiftCalendar
from oee.checking import build_unchecked
from oee.config import CounterSpec, EquipmentSpec, ShiftSpec
from oee.engine import EquipmentEngine
from oee.events import AgentEvent, Event, dump_events
from sync.envelope import EnvelopeHeader, envelope_digest, seal
from sync.keys import CloudPublicKey, ed25519_key_id
from sync.uplink import Uplink
from tests.faults.harness import wait_for


def agent_events(agent_id: str, site_id: str, n: int) -> list[Event]:
    now = datetime.now(UTC)
    return [
        AgentEvent(agent_id=agent_id, site_id=site_id, ts=now, code="test", message=f"event {i}")
        for i in range(n)
    ]


T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


def engine_events(agent_id: str, site_id: str) -> list[Event]:
    """A fault with a reason, parts and closed buckets, as the engine reports them."""
    spec = validate(
        EquipmentSpec,
        {
            "id": "press-1",
            "ideal_cycle_time": 1.0,
            "state_map": {0: "idle", 1: "running", 2: "fault"},
            "reason_map": {3: "jam"},
            "counters": {"total_count": CounterSpec(width=32)},
        },
    )
    calendar = ShiftCalendar(
        [validated(ShiftSpec, name="day", start="00:00", end="00:00")],
        "UTC",
    )
    engine = EquipmentEngine(spec, calendar, agent_id=agent_id, site_id=site_id)
    events: list[Event] = [*engine.start(T0)]
    events += engine.feed(Sample("press-1", "total_count", 100, T0))
    events += engine.feed(Sample("press-1", "state", 1, T0))
    events += engine.feed(Sample("press-1", "total_count", 160, T0 + timedelta(seconds=70)))
    events += engine.feed(Sample("press-1", "reason", 3, T0 + timedelta(seconds=80)))
    events += engine.feed(Sample("press-1", "state", 2, T0 + timedelta(seconds=80)))
    events += engine.finish(T0 + timedelta(seconds=150))
    return events


def first(events: list[Event], kind: type[Event]) -> Event:
    return next(e for e in events if isinstance(e, kind))


def poisoned(events: list[Event], kind: type[Event], **update: object) -> list[Event]:
    """The engine's events with one field set to what the engine does not produce.

    The copy skips the field check on purpose (`build_unchecked`): these values come from a
    PLC, an older or a buggy agent; the engine cleans them (and the event model refuses them
    where it has bounds), so a poison batch can only be built this way. The batch is sealed
    and signed by the agent's own key like any other."""
    target = first(events, kind)
    changed = build_unchecked(
        type(target), **{f.name: getattr(target, f.name) for f in fields(target)} | update
    )
    return [changed if e is target else e for e in events]


def sealer(
    events: list[Event],
    *,
    agent_id: str,
    site_id: str,
    key: Ed25519PrivateKey,
    cloud: CloudPublicKey,
) -> Sealer:
    plaintext = dump_events(events)

    def seal_it(epoch: str, seq: int) -> tuple[bytes, str]:
        header = EnvelopeHeader(
            agent_id=agent_id,
            site_id=site_id,
            epoch=epoch,
            seq=seq,
            count=len(events),
            signing_key_id=ed25519_key_id(key.public_key()),
            cloud_key_id=cloud.key_id,
            suite=cloud.suite,
            trace_id=secrets.token_hex(8),
        )
        raw = seal(plaintext, header, key, cloud)
        return raw, envelope_digest(raw)

    return seal_it


def fill_outbox(
    path: Path,
    batches: int,
    events_per_batch: int,
    *,
    agent_id: str,
    site_id: str,
    key: Ed25519PrivateKey,
    cloud: CloudPublicKey,
) -> Outbox:
    outbox = Outbox(path)
    for _ in range(batches):
        events = agent_events(agent_id, site_id, events_per_batch)
        seal_it = sealer(events, agent_id=agent_id, site_id=site_id, key=key, cloud=cloud)
        outbox.append([(len(events), seal_it)], None)
    return outbox


def file_depth(path: Path) -> int:
    """Batches in an outbox file, acked or not (as a reader beside its owner sees them)."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        return int(conn.execute("SELECT count(*) FROM batches").fetchone()[0])


async def all_acked(uplink: Uplink, outbox: Outbox, batches: int, limit_s: float) -> None:
    """Until the uplink has taken an ack for each of `batches`; then they leave the file at
    once (the outbox deletes acked batches together, seconds later on its own) and it is empty."""
    await wait_for(lambda: uplink.stats.acked_batches >= batches, limit_s, "every batch acked")
    outbox.flush_acks()
    assert file_depth(outbox.path) == 0
