"""Fault injection with real processes: every event the outbox committed ends up exactly once
in PostgreSQL (lost == 0, duplicated == 0), whatever is killed, cut or corrupted on the way."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

from buffer.outbox import Outbox
from cloud_api.config import DatabaseSettings
from cloud_api.db import make_pool, migrate
from sync.keys import SUITE_MLKEM768X25519, CloudKeyring
from tests.conftest import MQTT_PORT
from tests.faults.conftest import IngestProcess, Plant, new_agent, start_ingest
from tests.faults.harness import (
    Agent,
    Checker,
    Mosquitto,
    PgServer,
    TcpProxy,
    settle,
    wait_for,
)
from tests.invariants import (
    Truth,
    api_client,
    check_views,
    closed_until,
    compare_with_truth,
    dump_events,
    wait_counted,
)


def produced_in(pg_url: str, agent_id: str) -> int:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT COALESCE(sum((body->>'produced')::bigint), 0) FROM facts.events "
            "WHERE kind = 'count' AND agent_id = %s",
            (agent_id,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def stored_batches(pg_url: str) -> int:
    with psycopg.connect(pg_url) as conn:
        return int(conn.execute("SELECT count(*) FROM facts.batches").fetchone()[0])  # type: ignore[index]


async def start_production(agent: Agent, plant: Plant, pg_url: str, limit_s: float = 30) -> None:
    """Start the agent, wait until its counter baseline is stored, then let the presses run."""
    agent.start()
    await wait_for(lambda: stored_batches(pg_url) > 0, limit_s, "the counter baseline stored")
    plant.run()


def scalar(pg_url: str, query: str) -> int:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(query).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def finish(
    agent: Agent, plant: Plant, checker: Checker, pg_url: str, *, truth: bool = True
) -> None:
    """Stop production, let everything ship, then compare outbox commits with PostgreSQL."""
    plant.freeze()
    frozen_at = datetime.now(UTC)
    if truth:
        # The agent reads the final counters and closes the buckets that hold them.
        final = {
            f"press-{unit}": (press.truth.produced, press.truth.scrap)
            for unit, press in enumerate(plant.presses, start=1)
        }
        await wait_counted(pg_url, final, frozen_at)
    else:
        await asyncio.sleep(1.0)  # the agent reads the final counters
        await buckets_closed(pg_url, len(plant.presses))
    await settle(agent)
    report = await asyncio.to_thread(checker.report, pg_url)
    assert report.committed_batches > 5, str(report)
    assert report.lost == 0, f"{report}\n{agent.log_tail()}"
    assert report.duplicated == 0, str(report)
    assert not report.missing_batches, str(report)
    if truth:
        assert await asyncio.to_thread(produced_in, pg_url, agent.agent_id) == plant.produced
    await views_agree(agent, plant, pg_url, truth=truth)


async def buckets_closed(pg_url: str, presses: int) -> None:
    """Until every press has a closed bucket past now (its last counts are in one)."""
    now = datetime.now(UTC)

    def closed() -> bool:
        ends = closed_until(pg_url)
        return len(ends) == presses and all(end > now for end in ends.values())

    await wait_for(closed, 60, "buckets closed past the last counts")


async def views_agree(
    agent: Agent, plant: Plant, pg_url: str, *, truth: bool = True, allow_gaps: bool = False
) -> None:
    """The cross-view invariants hold over everything stored, and every view has each press's
    parts and scrap (its program sets "jam" with a fault, "no material" or none when idle)."""
    reasons = {"fault": frozenset({"jam"}), "idle": frozenset({"no material", None})}
    truths = {
        f"press-{unit}": Truth(
            produced=press.truth.produced if truth else None,
            scrap=press.truth.scrap if truth else None,
            reasons=reasons,
        )
        for unit, press in enumerate(plant.presses, start=1)
    }
    try:
        with api_client(pg_url, agent.folder / "views-keys") as api:
            views = await asyncio.to_thread(
                check_views, api, pg_url, truths=truths, allow_gaps=allow_gaps
            )
        compare_with_truth(views, truths)
    except AssertionError:
        dump_events(pg_url, agent.folder / "events.jsonl")
        raise


# 1 -------------------------------------------------------------------------------------------


async def test_agent_sigkilled_many_times(
    tmp_path: Path, pg_url: str, fault_pool: ConnectionPool, ring: CloudKeyring, plant: Plant
) -> None:
    prefix = f"faults/{tmp_path.name[-12:]}/"
    ingest = start_ingest(fault_pool, ring, prefix, MQTT_PORT)
    agent = new_agent(tmp_path, ring, pg_url, plant, prefix=prefix, raw_samples=True)
    checker = Checker(agent, ring)
    checker.install()
    rng = random.Random(5)
    try:
        await start_production(agent, plant, pg_url)
        for _ in range(6):
            await asyncio.sleep(rng.uniform(0.8, 2.0))  # python start-up alone is ~1 s
            agent.kill()
            await asyncio.sleep(rng.uniform(0.1, 0.8))  # the presses keep producing
            agent.start()
        await asyncio.sleep(2)
        await finish(agent, plant, checker, pg_url)
        assert "resumed from checkpoint" in agent.log.read_text()
    finally:
        agent.kill()
        ingest.stop()


# 2 -------------------------------------------------------------------------------------------


async def test_broker_sigkilled_and_down(
    tmp_path: Path,
    pg_url: str,
    fault_pool: ConnectionPool,
    ring: CloudKeyring,
    plant: Plant,
    broker: Mosquitto,
) -> None:
    prefix = "f2/"
    ingest = start_ingest(fault_pool, ring, prefix, broker.port)
    agent = new_agent(tmp_path, ring, pg_url, plant, prefix=prefix, mqtt_port=broker.port)
    checker = Checker(agent, ring)
    checker.install()
    try:
        await start_production(agent, plant, pg_url)
        await asyncio.sleep(1.5)
        broker.kill()
        before = stored_batches(pg_url)
        await asyncio.sleep(4)  # down: the agent keeps committing into its outbox
        await wait_for(lambda: agent.depth() > 3, 20, "batches piling up in the outbox")
        broker.start()
        await wait_for(lambda: stored_batches(pg_url) > before + 3, 40, "delivery after restart")
        await asyncio.sleep(1.5)
        await finish(agent, plant, checker, pg_url)
    finally:
        agent.kill()
        ingest.stop()


# 3 -------------------------------------------------------------------------------------------


async def test_postgres_stopped_and_restarted(
    tmp_path: Path, ring: CloudKeyring, plant: Plant
) -> None:
    server = await asyncio.to_thread(PgServer)
    try:
        await asyncio.to_thread(server.start)
        await asyncio.to_thread(migrate, server.url)
        # A 5 s checkout limit: ingest holds a batch and tries again every few seconds while
        # the server is down, so it is storing again soon after the restart.
        pool = make_pool(
            DatabaseSettings(url=server.url, pool_min=1, pool_max=4), name="pg3", timeout=5
        )
        prefix = f"f3/{tmp_path.name[-12:]}/"
        ingest = start_ingest(pool, ring, prefix, MQTT_PORT)
        agent = new_agent(tmp_path, ring, server.url, plant, prefix=prefix)
        checker = Checker(agent, ring)
        checker.install()
        try:
            agent.start()
            await wait_for(lambda: stored_batches(server.url) > 0, 30, "the baseline stored")
            plant.run()
            await asyncio.sleep(1)
            await asyncio.to_thread(server.stop, "immediate")
            await asyncio.sleep(4)
            await wait_for(lambda: agent.depth() > 3, 60, "batches waiting in the outbox")
            await asyncio.to_thread(server.start)
            await asyncio.sleep(1.5)
            await finish(agent, plant, checker, server.url)
        finally:
            agent.kill()
            ingest.stop()
            pool.close()
    finally:
        await asyncio.to_thread(server.remove)


# 4 -------------------------------------------------------------------------------------------


def lock_waiters(pg_url: str) -> int:
    return scalar(
        pg_url,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database()",
    )


async def test_ingest_sigkilled_before_commit_between_commit_and_ack_and_after_ack(
    tmp_path: Path, pg_url: str, ring: CloudKeyring, plant: Plant
) -> None:
    prefix = f"f4/{tmp_path.name[-12:]}/"
    proxy = TcpProxy(MQTT_PORT)
    await proxy.start()
    keys_dir = tmp_path / "cloud-keys"
    ingest = IngestProcess(pg_url, keys_dir, prefix, proxy.port, tmp_path / "ingest.log")
    agent = new_agent(tmp_path, ring, pg_url, plant, prefix=prefix)
    checker = Checker(agent, ring)
    checker.install()
    try:
        ingest.start()
        await start_production(agent, plant, pg_url)

        # a) before commit: the ingest transaction waits on a lock, then the process dies.
        with psycopg.connect(pg_url) as locker:
            locker.execute("LOCK TABLE facts.batches IN ACCESS EXCLUSIVE MODE")
            await wait_for(lambda: lock_waiters(pg_url) > 0, 30, "ingest blocked mid-transaction")
            ingest.kill()
            locker.rollback()
        ingest.start()
        after_lock = stored_batches(pg_url)
        await wait_for(lambda: stored_batches(pg_url) > after_lock + 2, 30, "the new ingest")

        # b) between commit and ack: ingest receives and commits, but nothing it sends
        # (PUBACKs, acks) leaves; then it dies. The agent must resend; the cloud re-acks.
        proxy.set("stall_up")
        committed_before = stored_batches(pg_url)
        await wait_for(
            lambda: stored_batches(pg_url) > committed_before + 2, 30, "commits without acks"
        )
        ingest.kill()
        # Drop what the dead process had written but the proxy held (its PUBACKs and acks):
        # released later, those acks would reach the agent and no resend would be needed.
        proxy.set("cut")
        proxy.set("pass")
        ingest.start()
        await wait_for(
            lambda: (
                scalar(pg_url, "SELECT count(*) FROM ops.reject_counts WHERE reason='replay'") > 0
            ),
            40,
            "the resent, already stored batches to be re-acked as replays",
        )

        # c) after the ack, at random moments.
        rng = random.Random(3)
        for _ in range(2):
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            ingest.kill()
            ingest.start()
        await asyncio.sleep(1.5)
        await finish(agent, plant, checker, pg_url)
    finally:
        agent.kill()
        ingest.kill()
        await proxy.stop()


# 5 -------------------------------------------------------------------------------------------


async def test_network_cut_stalled_and_truncated(
    tmp_path: Path, pg_url: str, fault_pool: ConnectionPool, ring: CloudKeyring, plant: Plant
) -> None:
    prefix = f"f5/{tmp_path.name[-12:]}/"
    proxy = TcpProxy(MQTT_PORT)
    await proxy.start()
    ingest = start_ingest(fault_pool, ring, prefix, MQTT_PORT)
    # This plant seals with the hybrid post-quantum suite (the cloud publishes both).
    agent = new_agent(
        tmp_path, ring, pg_url, plant, prefix=prefix, mqtt_port=proxy.port,
        suite=SUITE_MLKEM768X25519,
    )  # fmt: skip
    checker = Checker(agent, ring)
    checker.install()
    try:
        await start_production(agent, plant, pg_url)
        for mode, seconds in (("cut", 2.5), ("pass", 2), ("stall", 3.5), ("pass", 2)):
            proxy.set(mode)  # type: ignore[arg-type]
            await asyncio.sleep(seconds)
        for _ in range(3):
            proxy.set("truncate")
            await wait_for(lambda: proxy.truncations > 0, 20, "a truncated connection")
            proxy.truncations = 0
            proxy.set("pass")
            await asyncio.sleep(1.5)
        await finish(agent, plant, checker, pg_url)
        with psycopg.connect(pg_url) as conn:
            suites = conn.execute("SELECT count(*) FROM facts.batches").fetchone()
        assert suites is not None and suites[0] > 0
        assert f'"suite":"{SUITE_MLKEM768X25519}"'.encode() in checker_envelope(checker)
    finally:
        agent.kill()
        ingest.stop()
        await proxy.stop()


def checker_envelope(checker: Checker) -> bytes:
    with sqlite3.connect(checker.taps[0]) as conn:
        return bytes(conn.execute("SELECT envelope FROM checker_tap LIMIT 1").fetchone()[0])


# 6 -------------------------------------------------------------------------------------------


async def test_disk_full_blocks_then_space_returns(
    tmp_path: Path, pg_url: str, fault_pool: ConnectionPool, ring: CloudKeyring, plant: Plant
) -> None:
    prefix = f"f6/{tmp_path.name[-12:]}/"
    proxy = TcpProxy(MQTT_PORT)
    await proxy.start()
    ingest = start_ingest(fault_pool, ring, prefix, MQTT_PORT)
    agent = new_agent(
        tmp_path, ring, pg_url, plant, prefix=prefix, mqtt_port=proxy.port,
        raw_samples=True, max_bytes=16 * 1024,
    )  # fmt: skip
    checker = Checker(agent, ring)
    checker.install()
    try:
        proxy.set("cut")
        agent.start()
        await wait_for(lambda: agent.depth() > 0, 30, "the counter baseline committed")
        plant.run()
        await wait_for(lambda: "outbox full, holding events" in agent.log_tail(20000), 60, "full")
        await asyncio.sleep(1)
        proxy.set("pass")  # space returns as the cloud acks
        await asyncio.sleep(2)
        await finish(agent, plant, checker, pg_url)
        codes = scalar(
            pg_url,
            "SELECT count(DISTINCT body->'data'->>'level') FROM facts.events "
            "WHERE kind = 'agent' AND body->>'code' = 'outbox_fill'",
        )
        assert codes >= 3  # warning, critical, full (and back to ok) all reached the cloud
        assert scalar(pg_url, "SELECT count(*) FROM ops.open_gaps") == 0
    finally:
        agent.kill()
        ingest.stop()
        await proxy.stop()


async def test_disk_full_sheds_raw_samples_with_a_loss_record(
    tmp_path: Path, pg_url: str, fault_pool: ConnectionPool, ring: CloudKeyring, plant: Plant
) -> None:
    prefix = f"f6s/{tmp_path.name[-12:]}/"
    proxy = TcpProxy(MQTT_PORT)
    await proxy.start()
    ingest = start_ingest(fault_pool, ring, prefix, MQTT_PORT)
    agent = new_agent(
        tmp_path, ring, pg_url, plant, prefix=prefix, mqtt_port=proxy.port,
        raw_samples=True, max_bytes=16 * 1024, when_full="shed_samples",
    )  # fmt: skip
    checker = Checker(agent, ring)
    checker.install()
    try:
        proxy.set("cut")
        agent.start()
        await wait_for(lambda: agent.depth() > 0, 30, "the counter baseline committed")
        plant.run()
        await wait_for(lambda: "raw samples shed" in agent.log_tail(20000), 60, "shedding")
        await asyncio.sleep(1)
        proxy.set("pass")
        await asyncio.sleep(2)
        await finish(agent, plant, checker, pg_url)  # OEE/count data complete: truth holds
        report = await asyncio.to_thread(checker.report, pg_url)
        assert report.declared_lost > 0, str(report)
        declared = scalar(
            pg_url,
            "SELECT sum((body->'data'->>'events')::int) FROM facts.events "
            "WHERE kind = 'agent' AND body->>'code' = 'data_shed'",
        )
        # The loss records count at least every committed event that never arrived (they
        # also count raw samples dropped before they were ever committed).
        assert declared >= report.declared_lost
        assert scalar(pg_url, "SELECT count(*) FROM ops.declared_losses") > 0
        assert scalar(pg_url, "SELECT count(*) FROM ops.open_gaps") == 0
    finally:
        agent.kill()
        ingest.stop()
        await proxy.stop()


# 7 -------------------------------------------------------------------------------------------


def corrupt(path: Path) -> None:
    """Fold the WAL into the file, then overwrite pages in the middle with garbage."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with path.open("r+b") as fh:
        fh.seek(4096)
        fh.write(random.Random(1).randbytes(3 * 4096))


async def test_corrupted_outbox_is_moved_aside_and_a_new_epoch_starts(
    tmp_path: Path, pg_url: str, fault_pool: ConnectionPool, ring: CloudKeyring, plant: Plant
) -> None:
    prefix = f"f7/{tmp_path.name[-12:]}/"
    proxy = TcpProxy(MQTT_PORT)
    await proxy.start()
    ingest = start_ingest(fault_pool, ring, prefix, MQTT_PORT)
    agent = new_agent(tmp_path, ring, pg_url, plant, prefix=prefix, mqtt_port=proxy.port)
    try:
        await start_production(agent, plant, pg_url)
        proxy.set("cut")
        await wait_for(lambda: agent.depth() > 5, 30, "unsent batches")
        agent.kill()
        with sqlite3.connect(agent.outbox_path) as conn:
            old_epoch = conn.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()[0]
        await asyncio.to_thread(corrupt, agent.outbox_path)
        proxy.set("pass")
        agent.start()
        await wait_for(
            lambda: "outbox was corrupt" in agent.log_tail(20000), 30, "the corruption reported"
        )
        await asyncio.sleep(3)
        assert agent.running(), agent.log_tail()
        plant.freeze()
        await asyncio.sleep(1)
        await buckets_closed(pg_url, len(plant.presses))
        await settle(agent)
        assert list(agent.state.glob("outbox.db.corrupt-*")), "the bad file is kept aside"
        # The outbox owns where the next sequence number is kept (meta or its journal).
        box = Outbox(agent.outbox_path)
        epoch, next_seq = box.epoch, box.stats().next_seq
        box.close()
        assert epoch != old_epoch
        with psycopg.connect(pg_url) as conn:
            seqs = [
                r[0]
                for r in conn.execute(
                    "SELECT seq FROM facts.batches WHERE epoch = %s ORDER BY seq", (epoch,)
                )
            ]
            replaced = conn.execute(
                "SELECT count(*) FROM facts.events WHERE body->>'code' = 'outbox_replaced'"
            ).fetchone()
        # Every batch the new outbox committed arrived, none twice, and the loss of the
        # corrupt file's unsent batches is declared to the cloud.
        assert seqs == list(range(1, int(next_seq))), (seqs, next_seq)
        assert replaced is not None and replaced[0] == 1
        # Buckets of the lost run are missing (declared); every view agrees over what is
        # stored, and the new epoch's timeline starts unknown, not in the lost run's state.
        await views_agree(agent, plant, pg_url, truth=False, allow_gaps=True)
    finally:
        agent.kill()
        ingest.stop()
        await proxy.stop()
