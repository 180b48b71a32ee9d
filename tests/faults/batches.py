"""Sealed batches made the way the agent makes them, for the in-process fault tests."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from buffer.outbox import Outbox, Sealer
from oee.events import AgentEvent, Event, dump_events
from sync.envelope import EnvelopeHeader, envelope_digest, seal
from sync.keys import CloudPublicKey, ed25519_key_id


def agent_events(agent_id: str, site_id: str, n: int) -> list[Event]:
    now = datetime.now(UTC)
    return [
        AgentEvent(agent_id=agent_id, site_id=site_id, ts=now, code="test", message=f"event {i}")
        for i in range(n)
    ]


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
