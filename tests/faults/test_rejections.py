"""Permanent and transient failures at ingest, over the real broker, agent and database.

A batch that can never be stored is answered with a signed rejection: the agent records a
signed loss (shown by the fleet view and its own metrics), drops the batch and goes on; a
forged or replayed rejection deletes nothing. A database outage is waited out: nothing is
answered, nothing dropped, everything stored once the database is back."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg_pool import ConnectionPool

from buffer.outbox import Outbox
from cloud_api.config import CloudSettings, DatabaseSettings
from cloud_api.db import make_pool, migrate
from oee.events import StateEvent
from sync.envelope import RejectionBody, sign_rejection
from sync.keys import AgentKeys, CloudKeyring, ed25519_key_id, ed25519_line
from sync.uplink import BrokerSettings, Uplink, ack_topic
from tests.cloud_api.test_query_api import served
from tests.conftest import MQTT_HOST, MQTT_PORT, enroll
from tests.faults.batches import all_acked, engine_events, file_depth, fill_outbox, poisoned, sealer
from tests.faults.conftest import Plant, new_agent, start_ingest
from tests.faults.harness import Checker, PgServer, settle, wait_for
from tests.faults.test_scenarios import scalar
from tests.faults.test_security import publisher

SITE = "plant-rej"


async def test_a_poison_batch_is_dropped_with_a_recorded_loss_and_the_agent_goes_on(
    tmp_path: Path,
    pg_url: str,
    fault_pool: ConnectionPool,
    ring: CloudKeyring,
    plant: Plant,
) -> None:
    prefix = f"rej/{secrets.token_hex(4)}/"
    ingest = start_ingest(fault_pool, ring, prefix, MQTT_PORT)
    agent = new_agent(tmp_path, ring, pg_url, plant, prefix=prefix, max_in_flight=4)
    checker = Checker(agent, ring)
    checker.install()
    # Left in the outbox by an earlier run: a PLC string with a NUL that the engine of that
    # day passed on (see tests/faults/batches.poisoned). Sealed by the agent's own key.
    keys = AgentKeys.load(agent.keys_dir)
    poison = poisoned(
        engine_events(agent.agent_id, agent.site), StateEvent, reason="jam\x00station 3"
    )
    outbox = Outbox(agent.outbox_path)
    (poison_seq,) = outbox.append(
        [(len(poison), sealer(poison, agent_id=agent.agent_id, site_id=agent.site,
                              key=keys.signing_key, cloud=keys.cloud_public))],
        None,
    )  # fmt: skip
    epoch = outbox.epoch
    outbox.close()
    try:
        agent.start()
        plant.run()
        await wait_for(
            lambda: agent.metric("edge_agent_batches_rejected_total") == 1.0,
            60,
            f"the agent dropping the refused batch\n{agent.log_tail()}",
        )
        # Its loss record travels signed in a later batch; the fleet view shows it.
        settings = CloudSettings(
            database=DatabaseSettings(url=pg_url), keys_dir=tmp_path / "api-keys"
        )
        with served(settings, fault_pool) as api:

            def lost() -> dict[str, int]:
                body = api.get(f"/v1/agents/{agent.agent_id}").json()
                return dict(body["lost_batches"])

            await wait_for(lambda: lost() != {}, 60, "the loss in the fleet view")
            fleet = api.get(f"/v1/agents/{agent.agent_id}").json()
        # The event model (where it bounds strings) or PostgreSQL refuses the NUL.
        (declared,) = fleet["lost_batches"]
        assert declared in ("rejected: invalid_schema", "rejected: invalid_content")
        assert fleet["lost_batches"] == {declared: 1}
        refused = declared.removeprefix("rejected: ")
        # Refused once, or again if it was resent before the first answer arrived. A stored
        # batch sent again before its ack arrived (a loaded machine) is counted as a replay;
        # no other reason may appear.
        rejected = set(fleet["rejected_batches"])
        assert refused in rejected and rejected <= {refused, "replay"}, rejected
        with psycopg.connect(pg_url) as conn:
            kept = conn.execute(
                "SELECT DISTINCT epoch, seq, length(payload) > 0 FROM ops.quarantine "
                "WHERE reason = %s",
                (refused,),
            ).fetchall()
            loss = conn.execute(
                "SELECT body->'data' FROM facts.events WHERE kind = 'agent' "
                "AND body->>'code' = 'batch_rejected'"
            ).fetchall()
        assert kept == [(epoch, poison_seq, True)]
        assert [(d["epoch"], d["seqs"], d["events"]) for (d,) in loss] == [
            (epoch, [poison_seq], len(poison))
        ]
        # ... and the agent went on: everything else arrives, the truth of the parts holds.
        plant.freeze()
        await asyncio.sleep(1.0)
        await settle(agent)
        report = await asyncio.to_thread(checker.report, pg_url)
        assert report.lost == 0 and report.duplicated == 0, str(report)
        assert report.declared_lost == len(poison), str(report)
        assert report.missing_batches == [], str(report)
    finally:
        agent.kill()
        ingest.stop()


def rejection(
    epoch: str, seq: int, digest: str, key: Ed25519PrivateKey, *, agent: str = "agent-a"
) -> bytes:
    body = RejectionBody(
        agent_id=agent,
        epoch=epoch,
        seq=seq,
        digest=digest,
        reason="invalid_schema",
        detail="",
        key_id=ed25519_key_id(key.public_key()),
    )
    return sign_rejection(body, key)


async def test_forged_and_replayed_rejections_delete_nothing(
    tmp_path: Path, ring: CloudKeyring
) -> None:
    prefix = f"rejack/{secrets.token_hex(4)}/"  # no ingest listens here: only ours arrive
    key = Ed25519PrivateKey.generate()
    cloud = ring.current_hpke.public
    outbox = fill_outbox(
        tmp_path / "outbox.db", 3, 2, agent_id="agent-a", site_id=SITE, key=key, cloud=cloud
    )
    old = fill_outbox(
        tmp_path / "old.db", 3, 2, agent_id="agent-a", site_id=SITE, key=key, cloud=cloud
    )
    pending = {b.seq: b.digest for b in outbox.pending(10)}
    _, cloud_key = ring.current_ack
    recorded: list[tuple[int, int]] = []

    def record(body: RejectionBody, events: int) -> bool:
        recorded.append((body.seq, events))
        return True

    uplink = Uplink(
        outbox,
        BrokerSettings(host=MQTT_HOST, port=MQTT_PORT),
        site=SITE,
        agent="agent-a",
        ack_keys=ring.ack_verify_keys(),
        topic_prefix=prefix,
        ack_timeout=60,
        on_rejected=record,
    )
    task = asyncio.create_task(uplink.run())
    client = publisher()
    try:
        await wait_for(lambda: uplink.stats.published >= 3, 20, "the batches on the wire")
        topic = ack_topic(prefix, SITE, "agent-a")
        stranger = Ed25519PrivateKey.generate()
        forged = [
            rejection(outbox.epoch, 1, pending[1], stranger),  # a key the agent does not trust
            rejection(outbox.epoch, 1, pending[1], cloud_key, agent="agent-b"),  # other agent
            rejection(old.epoch, 1, old.pending(1)[0].digest, cloud_key),  # another epoch
            rejection(outbox.epoch, 1, "0" * 64, cloud_key),  # a digest of nothing we sent
            rejection(outbox.epoch, 1, old.pending(1)[0].digest, cloud_key),  # another batch's
            rejection(outbox.epoch, 1, pending[1], cloud_key)[:-8] + b'AAAAAA"}',  # bad sig
        ]
        for payload in forged:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
        # In order: once this genuine one is applied, every forgery was seen and did nothing.
        genuine = rejection(outbox.epoch, 2, pending[2], cloud_key)
        client.publish(topic, genuine, qos=1)
        await wait_for(lambda: file_depth(outbox.path) == 2, 20, "the genuine rejection applied")
        assert recorded == [(2, 2)]
        assert [b.seq for b in outbox.pending(10)] == [1, 3]
        assert uplink.stats.rejected_batches == 1
        assert uplink.stats.acks_rejected == 3  # stranger's key, other agent, bad signature
        # Replayed, it deletes nothing more and records no second loss.
        client.publish(topic, genuine, qos=1)
        client.publish(topic, rejection(outbox.epoch, 3, pending[3], cloud_key), qos=1)
        await wait_for(lambda: file_depth(outbox.path) == 1, 20, "the second genuine rejection")
        assert recorded == [(2, 2), (3, 2)]
        assert [b.seq for b in outbox.pending(10)] == [1]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        client.loop_stop()
        client.disconnect()
        outbox.close()
        old.close()


async def test_a_database_outage_is_waited_out_not_answered(
    tmp_path: Path, ring: CloudKeyring
) -> None:
    server = await asyncio.to_thread(PgServer)
    try:
        await asyncio.to_thread(server.start)
        await asyncio.to_thread(migrate, server.url)
        key = Ed25519PrivateKey.generate()
        enroll(server.url, "agent-t", SITE, ed25519_line(key.public_key()))
        # Checkouts give up after 5 s (not 30 s): during the outage ingest holds the batch and
        # tries again, and once the database is back the next try finds it soon.
        pool = make_pool(
            DatabaseSettings(url=server.url, pool_min=1, pool_max=4), name="rejt", timeout=5
        )
        prefix = f"rejt/{secrets.token_hex(4)}/"
        ingest = start_ingest(pool, ring, prefix, MQTT_PORT)
        outbox = fill_outbox(
            tmp_path / "outbox.db", 3, 2, agent_id="agent-t", site_id=SITE, key=key,
            cloud=ring.current_hpke.public,
        )  # fmt: skip
        recorded: list[int] = []

        def record(body: RejectionBody, events: int) -> bool:
            recorded.append(body.seq)
            return True

        uplink = Uplink(
            outbox,
            BrokerSettings(host=MQTT_HOST, port=MQTT_PORT),
            site=SITE,
            agent="agent-t",
            ack_keys=ring.ack_verify_keys(),
            topic_prefix=prefix,
            ack_timeout=2,
            on_rejected=record,
        )
        task: asyncio.Task[None] | None = None
        try:
            await asyncio.to_thread(server.stop, "immediate")
            task = asyncio.create_task(uplink.run())
            # Sent, and sent again after the ack timeout, while the database is down.
            await wait_for(lambda: uplink.stats.resent >= 3, 30, "resends during the outage")
            assert file_depth(outbox.path) == 3 and recorded == []
            await asyncio.to_thread(server.start)
            await all_acked(uplink, outbox, 3, 60)
            assert recorded == [] and uplink.stats.rejected_batches == 0
            assert scalar(server.url, "SELECT count(*) FROM facts.batches") == 3
            assert scalar(server.url, "SELECT count(*) FROM facts.events") == 6
            permanent = scalar(
                server.url,
                "SELECT count(*) FROM ops.quarantine WHERE reason NOT IN ('replay')",
            )
            assert permanent == 0  # nothing refused: a resend of a stored batch is a replay
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            ingest.stop()
            pool.close()
            outbox.close()
    finally:
        await asyncio.to_thread(server.remove)
