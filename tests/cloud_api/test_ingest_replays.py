"""A resent batch that is byte for byte a stored envelope is re-acked before it is opened
(BatchWriter.find_replays); anything else, whatever its header says, takes the full path."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

from cloud_api.ingest.worker import REPLAY_MIN_AGE_S, BatchWriter
from sync.envelope import envelope_digest
from sync.keys import CloudKeyring
from sync.uplink import batch_topic
from tests.cloud_api.ingestion import Agent, enrolled_agent

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)


def sealed(agent: Agent, seq: int, *, age_s: float) -> bytes:
    """A batch of agent `agent` created `age_s` seconds ago (a resend's age)."""
    events = [agent.bucket("press-1", T0 + timedelta(minutes=seq), produced=seq, good=seq)]
    return agent.sealed(events, seq=seq, created=datetime.now(UTC) - timedelta(seconds=age_s))


def replay_counts(pg_url: str, agent_id: str) -> tuple[int, int]:
    """(replay rows kept in quarantine, the replay count charged to the agent)."""
    with psycopg.connect(pg_url) as conn:
        kept = conn.execute(
            "SELECT count(*) FROM ops.quarantine WHERE reason = 'replay' AND agent_id = %s "
            "AND payload IS NULL",
            (agent_id,),
        ).fetchone()
        counted = conn.execute(
            "SELECT coalesce(sum(count), 0) FROM ops.reject_counts WHERE reason = 'replay' "
            "AND agent_id = %s AND verified",
            (agent_id,),
        ).fetchone()
    assert kept is not None and counted is not None
    return int(kept[0]), int(counted[0])


def test_a_resent_batch_is_reacked_without_being_opened(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path / "a", agent_id="e-1", site_id="s-1")
    raws = [sealed(agent, seq, age_s=REPLAY_MIN_AGE_S + 60) for seq in (1, 2)]
    assert [agent.store.process(agent.topic, r).status for r in raws] == ["stored", "stored"]

    # An ingest process without the cloud's decryption key: the full path cannot open the
    # batch (unknown_key), so a re-ack from find_replays shows the batch was not opened.
    blind = BatchWriter(pool, dataclasses.replace(cloud_keys, hpke={}), topic_prefix="test/")
    fresh = sealed(agent, 3, age_s=REPLAY_MIN_AGE_S + 60)  # old enough, never stored
    replays, framed = blind.find_replays([(agent.topic, r) for r in (*raws, fresh)])
    assert sorted(replays) == [0, 1]
    assert sorted(framed) == [0, 1, 2]
    for i, raw in enumerate(raws):
        outcome = replays[i]
        assert outcome.status == "duplicate" and outcome.acked
        assert outcome.digest == envelope_digest(raw)
        assert outcome.header is not None and outcome.header.seq == i + 1
        assert outcome.ack_topic is not None and outcome.ack_topic.endswith("/e-1/v1/acks")
    assert blind.process(agent.topic, fresh).reason == "unknown_key"
    assert replay_counts(pg_url, "e-1") == (2, 2)

    # The full path answers a replay the same way (as before the check existed).
    again = agent.store.process(agent.topic, raws[0])
    assert again.status == "duplicate" and again.acked and again.digest == envelope_digest(raws[0])
    assert replay_counts(pg_url, "e-1") == (3, 3)
    with psycopg.connect(pg_url) as conn:
        stored = conn.execute("SELECT count(*) FROM facts.batches").fetchone()
        epochs = conn.execute("SELECT max_seq, batches FROM ops.agent_epochs").fetchall()
    assert stored is not None and stored[0] == 2
    assert epochs == [(2, 2)]  # replays advance no sequence


def test_the_replay_check_trusts_no_header(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path / "a", agent_id="e-1", site_id="s-1")
    other = enrolled_agent(pg_url, pool, cloud_keys, tmp_path / "b", agent_id="e-2", site_id="s-1")
    raw = sealed(agent, 1, age_s=REPLAY_MIN_AGE_S + 60)
    recent = sealed(agent, 2, age_s=0)
    for r in (raw, recent):
        assert agent.store.process(agent.topic, r).status == "stored"

    # The stored header with another signature, another agent's signature over the stored
    # header and ciphertext, the stored envelope on another agent's topic, a stored batch
    # too recent to be looked up: none is a replay before it is verified.
    bad_signature = raw[:-1] + bytes([raw[-1] ^ 1])
    resigned = raw[:-64] + other.keys.signing_key.sign(raw[:-64])
    wrong_topic = batch_topic("test/", "s-1", "e-2")
    messages = [
        (agent.topic, bad_signature),
        (agent.topic, resigned),
        (wrong_topic, raw),
        (agent.topic, recent),
    ]
    replays, _ = agent.store.find_replays(messages)
    assert replays == {}
    assert agent.store.process(agent.topic, bad_signature).reason == "bad_signature"
    assert agent.store.process(agent.topic, resigned).reason == "bad_signature"
    assert agent.store.process(wrong_topic, raw).reason == "wrong_topic"
    assert agent.store.process(agent.topic, recent).status == "duplicate"  # the full path

    # A revoked signing key: the stored envelope is no longer re-acked on either path.
    with psycopg.connect(pg_url) as conn, conn.transaction():
        conn.execute("UPDATE registry.agent_keys SET revoked_at = now() WHERE agent_id = 'e-1'")
    revoked = BatchWriter(pool, cloud_keys, topic_prefix="test/")
    assert revoked.find_replays([(agent.topic, raw)])[0] == {}
    refused = revoked.process(agent.topic, raw)
    assert refused.status == "rejected" and not refused.acked
