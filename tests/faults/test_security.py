"""Security negatives over the real broker and database (scenario 8) and a fuzz of the
worker-level entry points (scenario 9): everything is rejected, counted by reason, kept in
quarantine; nothing is stored twice; no forged or replayed ack deletes anything."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from psycopg_pool import ConnectionPool

from cloud_api.ingest.worker import BatchWriter
from oee.events import dump_events
from sync.envelope import AckBody, EnvelopeHeader, parse_header, seal, sign_ack
from sync.keys import CloudKeyring, CloudPrivateKey, ed25519_key_id, ed25519_line
from sync.uplink import BrokerSettings, Uplink, ack_topic, batch_topic
from tests.conftest import MQTT_HOST, MQTT_PORT, enroll
from tests.faults.batches import agent_events, file_depth, fill_outbox, sealer
from tests.faults.conftest import start_ingest
from tests.faults.harness import wait_for

SITE = "plant-sec"


def publisher() -> mqtt.Client:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect(MQTT_HOST, MQTT_PORT)
    client.loop_start()
    return client


def reject_counts(pg_url: str) -> dict[str, int]:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT reason, sum(count) FROM ops.reject_counts GROUP BY 1")
        return {str(r[0]): int(r[1]) for r in rows}


async def test_tampered_foreign_and_replayed_batches_are_rejected_and_counted(
    tmp_path: Path, pg_url: str, fault_pool: ConnectionPool, ring: CloudKeyring
) -> None:
    prefix = f"sec/{secrets.token_hex(4)}/"
    key_a, key_b, key_c = (Ed25519PrivateKey.generate() for _ in range(3))
    enroll(pg_url, "agent-a", SITE, ed25519_line(key_a.public_key()))
    enroll(pg_url, "agent-b", SITE, ed25519_line(key_b.public_key()))
    cloud = ring.current_hpke.public
    worker = start_ingest(fault_pool, ring, prefix, MQTT_PORT)
    worker.store.max_envelope_bytes = 256 * 1024
    client = publisher()
    try:
        events = agent_events("agent-a", SITE, 5)
        valid, _ = sealer(events, agent_id="agent-a", site_id=SITE, key=key_a, cloud=cloud)("e1", 1)
        topic_a = batch_topic(prefix, SITE, "agent-a")
        header_end = 12 + len(parse_header(valid).to_bytes())
        tampered_ct = bytearray(valid)
        tampered_ct[header_end + 40] ^= 0x01
        tampered_header = valid.replace(b'"seq":1', b'"seq":7', 1)
        wrong_key = valid[:-64] + Ed25519PrivateKey.generate().sign(valid[:-64])
        unknown, _ = sealer(
            agent_events("agent-c", SITE, 1), agent_id="agent-c", site_id=SITE, key=key_c,
            cloud=cloud,
        )("e1", 1)  # fmt: skip
        # Signed by A but encrypted to a key the cloud does not hold under that id.
        foreign = CloudPrivateKey.generate().public.key
        header = EnvelopeHeader(
            agent_id="agent-a", site_id=SITE, epoch="e1", seq=2, count=5,
            signing_key_id=ed25519_key_id(key_a.public_key()), cloud_key_id=cloud.key_id,
        )  # fmt: skip
        undecryptable = seal(dump_events(events), header, key_a, foreign)
        header3 = EnvelopeHeader(
            agent_id="agent-a", site_id=SITE, epoch="e1", seq=3, count=1,
            signing_key_id=ed25519_key_id(key_a.public_key()), cloud_key_id=cloud.key_id,
        )  # fmt: skip
        bad_schema = seal(b'[{"kind": "nope"}]', header3, key_a, cloud)
        messages = [
            (topic_a, valid),
            (topic_a, bytes(tampered_ct)),
            (topic_a, tampered_header),
            (topic_a, wrong_key),
            (batch_topic(prefix, SITE, "agent-c"), unknown),
            (batch_topic(prefix, SITE, "agent-b"), valid),  # A's batch on B's topic
            (topic_a, valid),  # replay
            (topic_a, undecryptable),
            (topic_a, bad_schema),
            (topic_a, b"not an envelope"),
            (topic_a, secrets.token_bytes(300 * 1024)),
        ]
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
        expected = {
            "bad_signature": 3,
            "unknown_agent": 1,
            "wrong_topic": 1,
            "replay": 1,
            "undecryptable": 1,
            "invalid_schema": 1,
            "malformed": 1,
            "oversize": 1,
        }
        await wait_for(
            lambda: all(reject_counts(pg_url).get(r, 0) >= n for r, n in expected.items()),
            30,
            f"every rejection counted ({expected})",
        )
        assert reject_counts(pg_url) == expected
        with psycopg.connect(pg_url) as conn:
            kept = dict(conn.execute("SELECT reason, count(*) FROM ops.quarantine GROUP BY 1"))
            stored = conn.execute("SELECT count(*), sum(event_count) FROM facts.batches").fetchone()
            rows = conn.execute("SELECT count(*) FROM facts.events").fetchone()
        assert kept == expected  # every rejection is kept, with its reason
        assert stored == (1, 5) and rows == (5,)  # the valid batch once, nothing twice
    finally:
        client.loop_stop()
        client.disconnect()
        worker.stop()


async def test_forged_and_replayed_acks_delete_nothing(tmp_path: Path, ring: CloudKeyring) -> None:
    prefix = f"ack/{secrets.token_hex(4)}/"  # no ingest listens here: only our acks arrive
    key = Ed25519PrivateKey.generate()
    cloud = ring.current_hpke.public
    outbox = fill_outbox(
        tmp_path / "outbox.db", 3, 2, agent_id="agent-a", site_id=SITE, key=key, cloud=cloud
    )
    old = fill_outbox(
        tmp_path / "old.db", 3, 2, agent_id="agent-a", site_id=SITE, key=key, cloud=cloud
    )
    pending = {b.seq: b.digest for b in outbox.pending(10)}
    old_digests = {b.seq: b.digest for b in old.pending(10)}
    _, ack_key = ring.current_ack
    uplink = Uplink(
        outbox,
        BrokerSettings(host=MQTT_HOST, port=MQTT_PORT),
        site=SITE,
        agent="agent-a",
        ack_keys=ring.ack_verify_keys(),
        topic_prefix=prefix,
        ack_timeout=60,
    )
    task = asyncio.create_task(uplink.run())
    client = publisher()

    def ack(
        epoch: str,
        digests: dict[int, str],
        signer: Ed25519PrivateKey,
        *,
        agent: str = "agent-a",
        forge_sig: bool = False,
    ) -> bytes:
        body = AckBody(
            agent_id=agent,
            epoch=epoch,
            ranges=[(min(digests), max(digests))],
            digests={str(s): d for s, d in digests.items()},
            key_id=ed25519_key_id(signer.public_key()),
        )
        raw = sign_ack(body, signer)
        if forge_sig:  # the cloud's key id with a signature nobody made
            outer = json.loads(raw)
            outer["sig"] = base64.b64encode(secrets.token_bytes(64)).decode()
            raw = json.dumps(outer).encode()
        return raw

    stranger = Ed25519PrivateKey.generate()
    try:
        await wait_for(lambda: uplink.stats.published >= 3, 20, "the batches on the wire")
        topic = ack_topic(prefix, SITE, "agent-a")
        forged = [
            ack(outbox.epoch, pending, stranger),  # a key the agent does not trust
            ack(outbox.epoch, pending, ack_key, forge_sig=True),  # cloud's key id, bad signature
            ack(outbox.epoch, pending, ack_key, agent="agent-b"),  # genuine, other agent
            ack(old.epoch, old_digests, ack_key),  # genuine ack of another epoch, replayed
            ack(outbox.epoch, {s: "0" * 64 for s in pending}, ack_key),  # wrong digests
            ack(outbox.epoch, old_digests, ack_key),  # right seqs, digests of other batches
            b"{not json",
        ]
        for payload in forged:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
        # Acks arrive in order: once this genuine ack for seq 1 has been applied, every
        # forgery before it has been seen and must have deleted nothing.
        # The outbox deletes acked batches from its file in groups, seconds later: once the
        # ack is taken, the deletion is made due at once and the file is looked at.
        client.publish(topic, ack(outbox.epoch, {1: pending[1]}, ack_key), qos=1)
        await wait_for(lambda: uplink.stats.acked_batches >= 1, 20, "the genuine ack applied")
        outbox.flush_acks()
        assert file_depth(outbox.path) == 2
        assert uplink.stats.acks_rejected == 4  # unknown key, bad signature, agent, malformed
        assert [b.seq for b in outbox.pending(10)] == [2, 3]
        # Replaying the genuine ack later deletes nothing more.
        client.publish(topic, ack(outbox.epoch, {1: pending[1]}, ack_key), qos=1)
        client.publish(topic, ack(outbox.epoch, {2: pending[2]}, ack_key), qos=1)
        await wait_for(lambda: uplink.stats.acked_batches >= 2, 20, "the second genuine ack")
        outbox.flush_acks()
        assert file_depth(outbox.path) == 1
        assert uplink.stats.acked_batches == 2
        assert [b.seq for b in outbox.pending(10)] == [3]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        client.loop_stop()
        client.disconnect()
        outbox.close()
        old.close()


# 9: fuzz of what the long-running processes do with untrusted bytes ---------------------------


def _mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    flips = st.tuples(st.integers(0, len(valid) - 1), st.integers(1, 255)).map(
        lambda t: valid[: t[0]] + bytes([valid[t[0]] ^ t[1]]) + valid[t[0] + 1 :]
    )
    cuts = st.integers(0, len(valid)).map(lambda n: valid[:n])
    splices = st.tuples(st.integers(0, len(valid)), st.binary(max_size=64)).map(
        lambda t: valid[: t[0]] + t[1] + valid[t[0] :]
    )
    return st.one_of(flips, cuts, splices, st.binary(max_size=2048))


def test_fuzz_ingest_process_never_raises(
    tmp_path: Path, pg_url: str, fault_pool: ConnectionPool, ring: CloudKeyring
) -> None:
    key = Ed25519PrivateKey.generate()
    enroll(pg_url, "agent-f", SITE, ed25519_line(key.public_key()))
    store = BatchWriter(fault_pool, ring, topic_prefix="fz/")
    events = agent_events("agent-f", SITE, 3)
    cloud = ring.current_hpke.public
    valid, _ = sealer(events, agent_id="agent-f", site_id=SITE, key=key, cloud=cloud)("e1", 1)
    topic = batch_topic("fz/", SITE, "agent-f")
    topics = st.sampled_from([topic, batch_topic("fz/", SITE, "other"), "x", "fz/edge/+/#"])
    seen = {"stored": 0}

    @settings(
        max_examples=500,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(payload=_mutations(valid), where=topics)
    def run(payload: bytes, where: str) -> None:
        outcome = store.process(where, payload)  # must never raise on bad input
        if outcome.status == "stored":
            seen["stored"] += 1
            assert payload == valid and where == topic

    run()
    with psycopg.connect(pg_url) as conn:
        batches = conn.execute("SELECT count(*) FROM facts.batches").fetchone()
    assert batches is not None and batches[0] == seen["stored"] <= 1


def test_fuzz_ack_application_never_raises_nor_deletes(tmp_path: Path, ring: CloudKeyring) -> None:
    key = Ed25519PrivateKey.generate()
    outbox = fill_outbox(
        tmp_path / "outbox.db", 4, 1, agent_id="agent-f", site_id=SITE, key=key,
        cloud=ring.current_hpke.public,
    )  # fmt: skip
    uplink = Uplink(
        outbox,
        BrokerSettings(),
        site=SITE,
        agent="agent-f",
        ack_keys=ring.ack_verify_keys(),
    )
    ack_id, ack_key = ring.current_ack
    digests = {b.seq: b.digest for b in outbox.pending(10)}
    genuine = sign_ack(
        AckBody(
            agent_id="agent-f",
            epoch=outbox.epoch,
            ranges=[(1, 4)],
            digests={str(s): d for s, d in digests.items()},
            key_id=ack_id,
        ),
        ack_key,
    )

    @settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(payload=_mutations(genuine))
    def run(payload: bytes) -> None:
        deleted = uplink.apply_ack(payload)  # must never raise
        assert deleted == [] or payload == genuine

    try:
        run()
        assert outbox.stats().depth in (0, 4)
    finally:
        outbox.close()
