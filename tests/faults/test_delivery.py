"""Delivery under broker limits, several ingest workers, and key rotation on both sides."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg_pool import ConnectionPool

from buffer.outbox import Outbox
from cloud_api.ingest.worker import BatchWriter, IngestWorker
from sync.keys import (
    SUITE_X25519,
    AgentKeys,
    CloudKeyring,
    ed25519_line,
    generate_agent_signing_key,
    generate_cloud_ack_key,
    generate_cloud_hpke_keys,
    install_cloud_public_keys,
    load_signing_key,
)
from sync.uplink import BrokerSettings, Uplink, batch_topic
from tests.conftest import MQTT_HOST, MQTT_PORT, enroll
from tests.faults.batches import agent_events, all_acked, fill_outbox, sealer
from tests.faults.harness import EDGE_AGENT, Mosquitto, wait_for

SITE = "plant-del"


def stored(pg_url: str) -> tuple[int, int, int]:
    """(batches, event rows, distinct event ids) in PostgreSQL."""
    with psycopg.connect(pg_url) as conn:
        b = conn.execute("SELECT count(*) FROM facts.batches").fetchone()
        e = conn.execute("SELECT count(*), count(DISTINCT event_id) FROM facts.events").fetchone()
    assert b is not None and e is not None
    return int(b[0]), int(e[0]), int(e[1])


async def test_broker_queue_overflow_drops_are_recovered_by_resend(
    tmp_path: Path, pg_url: str, fault_pool: ConnectionPool, ring: CloudKeyring
) -> None:
    """Mosquitto drops QoS 1 messages queued beyond max_queued_messages for a slow subscriber,
    after the publisher had its PUBACK; the ack timeout brings every one of them back."""
    broker = Mosquitto(
        tmp_path / "mosquitto", extra="max_queued_messages 5\nmax_inflight_messages 2"
    )
    broker.start()
    prefix = "q/"
    key = Ed25519PrivateKey.generate()
    enroll(pg_url, "agent-q", SITE, ed25519_line(key.public_key()))
    outbox = fill_outbox(
        tmp_path / "outbox.db", 60, 10, agent_id="agent-q", site_id=SITE, key=key,
        cloud=ring.current_hpke.public,
    )  # fmt: skip
    # A slow subscriber: one worker, a one-message queue, and a transaction that waits.
    worker = IngestWorker(
        BatchWriter(fault_pool, ring, topic_prefix=prefix),
        BrokerSettings(host=MQTT_HOST, port=broker.port),
        workers=1,
        queue_size=1,
    )
    worker.start()
    assert worker.subscribed.wait(15)
    uplink = Uplink(
        outbox,
        BrokerSettings(host=MQTT_HOST, port=broker.port),
        site=SITE,
        agent="agent-q",
        ack_keys=ring.ack_verify_keys(),
        topic_prefix=prefix,
        ack_timeout=2.0,
        max_in_flight=60,
    )
    task: asyncio.Task[None] | None = None
    try:
        with psycopg.connect(pg_url) as locker:
            locker.execute("LOCK TABLE facts.batches IN ACCESS EXCLUSIVE MODE")
            task = asyncio.create_task(uplink.run())
            await wait_for(
                lambda: "are being dropped" in broker.log_text(), 30, "the broker to drop messages"
            )
            locker.rollback()
        await all_acked(uplink, outbox, 60, 90)
        assert uplink.stats.resent > 0
        assert stored(pg_url) == (60, 600, 600)
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        worker.stop()
        broker.kill()
        outbox.close()


async def test_several_ingest_workers_share_the_subscription(
    tmp_path: Path, pg_url: str, fault_pool: ConnectionPool, ring: CloudKeyring
) -> None:
    prefix = f"mw/{secrets.token_hex(4)}/"
    group = f"g{secrets.token_hex(3)}"
    key = Ed25519PrivateKey.generate()
    enroll(pg_url, "agent-m", SITE, ed25519_line(key.public_key()))
    outbox = fill_outbox(
        tmp_path / "outbox.db", 240, 10, agent_id="agent-m", site_id=SITE, key=key,
        cloud=ring.current_hpke.public,
    )  # fmt: skip
    workers = [
        IngestWorker(
            BatchWriter(fault_pool, ring, topic_prefix=prefix),
            BrokerSettings(host=MQTT_HOST, port=MQTT_PORT),
            share_group=group,
            workers=2,
        )
        for _ in range(3)
    ]
    for w in workers:
        w.start()
        assert w.subscribed.wait(15)
    uplink = Uplink(
        outbox,
        BrokerSettings(host=MQTT_HOST, port=MQTT_PORT),
        site=SITE,
        agent="agent-m",
        ack_keys=ring.ack_verify_keys(),
        topic_prefix=prefix,
        ack_timeout=3.0,
        max_in_flight=64,
    )
    task = asyncio.create_task(uplink.run())
    try:
        await all_acked(uplink, outbox, 240, 90)
        assert stored(pg_url) == (240, 2400, 2400)  # no loss, no duplicate
        assert all(w.processed > 0 for w in workers), [w.processed for w in workers]
        with psycopg.connect(pg_url) as conn:
            open_gaps = conn.execute("SELECT count(*) FROM ops.open_gaps").fetchone()
            top = conn.execute("SELECT max_seq, batches FROM ops.agent_epochs").fetchone()
        assert open_gaps == (0,) and top == (240, 240)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for w in workers:
            w.stop()
        outbox.close()


async def edge_agent(*args: str) -> str:
    done = await asyncio.to_thread(
        subprocess.run, [EDGE_AGENT, *args], capture_output=True, text=True, env=os.environ
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


MINIMAL_CONFIG = """
agent: {{id: agent-r, site: plant-del, state_dir: {state}}}
equipment:
  - id: press-1
    ideal_cycle_time: 1s
    signals:
      state: {{map: {{0: idle, 1: running}}}}
      total_count: {{}}
"""


async def test_key_rotation_on_both_sides_loses_no_batch(
    tmp_path: Path, pg_url: str, fault_pool: ConnectionPool
) -> None:
    cloud_dir = tmp_path / "cloud-keys"
    generate_cloud_hpke_keys(cloud_dir, [SUITE_X25519])
    generate_cloud_ack_key(cloud_dir)
    ring1 = CloudKeyring.load(cloud_dir)
    state = tmp_path / "agent"
    keys_dir = state / "keys"
    old_key = generate_agent_signing_key(keys_dir)
    install_cloud_public_keys(
        keys_dir,
        [k.public.to_line() for k in ring1.current_hpke_keys],
        [ed25519_line(k) for k in ring1.ack_verify_keys().values()],
    )
    enroll(pg_url, "agent-r", SITE, ed25519_line(old_key.public_key()))
    outbox = Outbox(state / "outbox.db")
    config = tmp_path / "agent.yaml"
    config.write_text(MINIMAL_CONFIG.format(state=state), encoding="utf-8")

    def append(n: int, key: Ed25519PrivateKey, keys: AgentKeys) -> None:
        for _ in range(n):
            events = agent_events("agent-r", SITE, 3)
            seal_it = sealer(
                events, agent_id="agent-r", site_id=SITE, key=key, cloud=keys.cloud_public
            )
            outbox.append([(len(events), seal_it)], None)

    append(4, old_key, AgentKeys.load(keys_dir))  # sealed to the old cloud key, old signer
    # Cloud side: new HPKE key and new ack key; the old ones stay for what is in flight.
    generate_cloud_hpke_keys(cloud_dir, [SUITE_X25519])
    generate_cloud_ack_key(cloud_dir)
    ring2 = CloudKeyring.load(cloud_dir)
    assert ring2.current_hpke_id != ring1.current_hpke_id and len(ring2.hpke) == 2
    install_cloud_public_keys(
        keys_dir,
        [k.public.to_line() for k in ring2.current_hpke_keys],
        [ed25519_line(k) for k in ring2.ack_verify_keys().values()],
    )
    # Agent side, through the CLI: a new signing key, then enrolled next to the old one.
    out = await edge_agent("keys", "rotate", "-c", str(config))
    assert out.startswith("ed25519:")
    assert (keys_dir / "signing.key").stat().st_mode & 0o077 == 0
    new_key = load_signing_key(keys_dir / "signing.key")
    enroll(pg_url, "agent-r", SITE, out.strip())
    append(4, new_key, AgentKeys.load(keys_dir))  # new cloud key, new signer
    status = json.loads(await edge_agent("keys", "status", "-c", str(config), "--json"))
    assert sorted(status["unacked_batches_by_signing_key"].values()) == [4, 4]

    prefix = f"rot/{secrets.token_hex(4)}/"
    worker = IngestWorker(
        BatchWriter(fault_pool, ring2, topic_prefix=prefix),
        BrokerSettings(host=MQTT_HOST, port=MQTT_PORT),
        share_group=f"g{secrets.token_hex(3)}",
    )
    worker.start()
    assert worker.subscribed.wait(15)
    uplink = Uplink(
        outbox,
        BrokerSettings(host=MQTT_HOST, port=MQTT_PORT),
        site=SITE,
        agent="agent-r",
        ack_keys=AgentKeys.load(keys_dir).ack_verify_keys,  # old and new ack keys
        topic_prefix=prefix,
        ack_timeout=3.0,
    )
    task = asyncio.create_task(uplink.run())
    try:
        await all_acked(uplink, outbox, 8, 60)
        assert stored(pg_url)[0] == 8
        # Nothing signed by the old key is left: it can be revoked; then it is refused.
        with psycopg.connect(pg_url) as conn:
            conn.execute(
                "UPDATE registry.agent_keys SET revoked_at = now() WHERE key_id = %s",
                (status["retired_signing_key_ids"][0],),
            )
        late, _ = sealer(
            agent_events("agent-r", SITE, 1), agent_id="agent-r", site_id=SITE, key=old_key,
            cloud=ring2.current_hpke.public,
        )("e-late", 1)  # fmt: skip
        outcome = BatchWriter(fault_pool, ring2, topic_prefix=prefix).process(
            batch_topic(prefix, SITE, "agent-r"), late
        )
        assert (outcome.status, outcome.reason) == ("rejected", "unknown_agent")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        worker.stop()
        outbox.close()


def test_sequence_gaps_open_fill_and_are_reported(
    tmp_path: Path, pg_url: str, fault_pool: ConnectionPool, ring: CloudKeyring
) -> None:
    key = Ed25519PrivateKey.generate()
    enroll(pg_url, "agent-g", SITE, ed25519_line(key.public_key()))
    store = BatchWriter(fault_pool, ring, topic_prefix="g/")
    topic = batch_topic("g/", SITE, "agent-g")

    def send(seq: int) -> None:
        events = agent_events("agent-g", SITE, 2)
        raw, _ = sealer(
            events, agent_id="agent-g", site_id=SITE, key=key, cloud=ring.current_hpke.public
        )("e1", seq)
        assert store.process(topic, raw).status == "stored"

    def open_gaps() -> list[tuple[int, int]]:
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute(
                "SELECT first_seq, last_seq FROM ops.open_gaps WHERE agent_id = 'agent-g' "
                "ORDER BY first_seq"
            ).fetchall()
        return [(int(a), int(b)) for a, b in rows]

    for seq in (1, 2, 6):
        send(seq)
    assert open_gaps() == [(3, 5)]
    send(4)
    assert open_gaps() == [(3, 3), (5, 5)]
    send(3)
    send(5)
    assert open_gaps() == []
    send(9)
    assert open_gaps() == [(7, 8)]
    with psycopg.connect(pg_url) as conn:
        history = conn.execute(
            "SELECT count(*) FILTER (WHERE resolution = 'filled'), count(*) FROM ops.seq_gaps"
        ).fetchone()
        top = conn.execute("SELECT max_seq, batches FROM ops.agent_epochs").fetchone()
    assert history == (3, 4) and top == (9, 7)
