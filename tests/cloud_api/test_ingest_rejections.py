"""Permanent refusals at ingest: kept whole in quarantine and answered with a signed rejection
naming the batch; transient ones are not answered; refusals are charged to an agent only once
its signature has verified the header that names it."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from cloud_api.ingest.worker import PERMANENT, Outcome
from oee.checking import build_unchecked
from oee.components import Components
from oee.events import CountEvent, Event, OeeEvent, StateEvent
from sync.envelope import RejectionBody, envelope_digest, parse_header, verify_cloud_message
from sync.keys import CloudKeyring
from sync.uplink import ack_topic, batch_topic
from tests.cloud_api.ingestion import Agent, enrolled_agent
from tests.faults.batches import engine_events, poisoned


def verified_rejection(outcome: Outcome, ring: CloudKeyring, agent: Agent) -> RejectionBody:
    assert outcome.rejection is not None, f"no rejection for {outcome.reason}"
    body = verify_cloud_message(
        outcome.rejection, verify_keys=ring.ack_verify_keys(), agent_id=agent.agent_id
    )
    assert isinstance(body, RejectionBody)
    return body


def quarantined(pg_url: str) -> list[tuple[str, str, int, bytes]]:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT reason, epoch, seq, payload FROM ops.quarantine ORDER BY id"
        ).fetchall()
    return [(str(r[0]), str(r[1]), int(r[2]), bytes(r[3])) for r in rows]


def stored_batches(pg_url: str) -> int:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT count(*) FROM facts.batches").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    ("kind", "update"),
    [
        # A PLC string with a NUL: PostgreSQL refuses it in text and in jsonb.
        (StateEvent, {"reason": "jam\x00at station 3"}),
        (CountEvent, {"product": "A\x00"}),
        # Beyond bigint: the OEE bucket's column refuses it.
        (OeeEvent, {"components": build_unchecked(Components, produced=10**30)}),
        # An id that is not a UUID: the events' key column refuses it.
        (CountEvent, {"event_id": "not-a-uuid"}),
    ],
    ids=["nul-reason", "nul-product", "produced-1e30", "event-id"],
)
def test_a_batch_that_can_never_be_stored_is_quarantined_whole_and_answered(
    pg_url: str,
    pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    tmp_path: Path,
    kind: type[Event],
    update: dict[str, object],
) -> None:
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="edge-p", site_id="s-p")
    good = engine_events("edge-p", "s-p")
    raw = agent.sealed(poisoned(good, kind, **update))
    outcome = agent.store.process(agent.topic, raw)
    assert outcome.status == "rejected"
    # The event model (where it bounds the field) or PostgreSQL (where it does not yet)
    # refuses it; both are permanent.
    assert outcome.reason in ("invalid_schema", "invalid_content")
    assert not outcome.acked
    assert outcome.ack_topic == ack_topic("test/", "s-p", "edge-p")
    rejection = verified_rejection(outcome, cloud_keys, agent)
    header = parse_header(raw)
    assert (rejection.epoch, rejection.seq) == (header.epoch, header.seq)
    assert rejection.digest == envelope_digest(raw)
    assert rejection.reason == outcome.reason
    assert "\x00" not in rejection.detail
    if any(isinstance(v, str) and "\x00" in v for v in update.values()):
        # Said in words, not as the pattern that refused it.
        assert "text holds a NUL character" in rejection.detail, rejection.detail
        assert "pattern" not in rejection.detail, rejection.detail
    # Nothing of it is stored, and the whole envelope is kept (the only copy once dropped).
    assert stored_batches(pg_url) == 0
    assert quarantined(pg_url) == [(outcome.reason, header.epoch, header.seq, raw)]
    # The agent goes on: its next batch, the same events without the poison, is stored.
    assert agent.send(good) == "stored"


def test_a_resent_poison_batch_is_answered_again(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="edge-r", site_id="s-r")
    raw = agent.sealed(poisoned(engine_events("edge-r", "s-r"), StateEvent, reason="a\x00"))
    first_answer = verified_rejection(agent.store.process(agent.topic, raw), cloud_keys, agent)
    # The agent crashed before dropping it, or the answer was lost: it comes again.
    again = verified_rejection(agent.store.process(agent.topic, raw), cloud_keys, agent)
    assert (again.seq, again.digest) == (first_answer.seq, first_answer.digest)
    assert again.rejection_id != first_answer.rejection_id


def test_a_key_reused_with_other_content_is_answered(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="edge-c", site_id="s-c")
    events = engine_events("edge-c", "s-c")
    assert agent.send(events[:2], seq=1) == "stored"
    other = agent.sealed(events[2:], seq=1)  # an outbox restored from a backup, say
    outcome = agent.store.process(agent.topic, other)
    assert outcome.reason == "conflict"
    assert verified_rejection(outcome, cloud_keys, agent).digest == envelope_digest(other)


def test_refusals_that_may_pass_later_are_not_answered(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="edge-u", site_id="s-u")
    raw = agent.sealed(engine_events("edge-u", "s-u"))
    tampered = raw[:-1] + bytes([raw[-1] ^ 1])
    unanswered = [
        agent.store.process(agent.topic, tampered),  # not the agent's: nothing to answer
        agent.store.process(batch_topic("test/", "s-u", "other"), raw),  # wrong topic
    ]
    assert [o.reason for o in unanswered] == ["bad_signature", "wrong_topic"]
    assert all(o.rejection is None for o in unanswered)
    assert not {"bad_signature", "wrong_topic", "unknown_key", "undecryptable"} & PERMANENT


def agent_rejects(pg_url: str, agent_id: str) -> dict[str, int]:
    """What the fleet view of `agent_id` shows (the API reads it through this function)."""
    with psycopg.connect(pg_url) as conn:
        conn.execute("SELECT set_config('app.sites', '*', false)")
        row = conn.execute("SELECT ops.agent_rejects(%s)", (agent_id,)).fetchone()
    assert row is not None
    return dict(row[0])


def test_unverified_refusals_are_counted_under_their_topic_not_the_named_agent(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    a = enrolled_agent(pg_url, pool, cloud_keys, tmp_path / "a", agent_id="agent-a", site_id="p-a")
    b = enrolled_agent(pg_url, pool, cloud_keys, tmp_path / "b", agent_id="agent-b", site_id="p-b")
    raw = a.sealed(engine_events("agent-a", "p-a"))
    unsigned = raw[:-64] + bytes(64)  # names agent-a, signed by nobody
    for _ in range(3):
        assert b.store.process(b.topic, unsigned).reason == "bad_signature"
    # Published on agent-b's topic, it still proves nothing about agent-a or agent-b.
    assert agent_rejects(pg_url, "agent-a") == {}
    assert agent_rejects(pg_url, "agent-b") == {}
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT reason, agent_id, topic, verified, count FROM ops.reject_counts"
        ).fetchall()
    assert rows == [("bad_signature", "", b.topic, False, 3)]
    # The same batch signed by agent-a but on agent-b's topic: agent-a's own doing (or a
    # replay of its batch), charged to agent-a.
    assert b.store.process(b.topic, raw).reason == "wrong_topic"
    assert agent_rejects(pg_url, "agent-a") == {"wrong_topic": 1}
    assert agent_rejects(pg_url, "agent-b") == {}
