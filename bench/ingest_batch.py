"""Benchmark: ingest's CPU per batch, without MQTT: store small batches, then send them again.

What a fleet's small batches cost ingest and PostgreSQL, apart from the broker, the simulated
agents and the machine's other work: sealed batches of one enrolled agent (the bench.outbox
event mix) go through the ingest worker's round (`IngestWorker._handle`: replay check,
verify, decrypt, validate, store, then the signed acks built as for publishing) in this
process, each round `--round` batches (1: every batch in a transaction of its own, as a
fleet's batches mostly are); then the same envelopes again, as resends (replays). CPU is
this process's (the ingest side) and the database backends' (from /proc), per batch.

Run: `python -m bench.ingest_batch [--batches 600] [--size 30] [--round 1]`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

import cloud_api.ingest.worker as ingest
from bench.e2e import CLK_TCK, cpu_ticks, database_backends, enrolled_agent
from bench.outbox import AGENT, SITE, make_events, make_sealer
from cloud_api.config import DatabaseSettings
from cloud_api.db import make_pool, migrate
from cloud_api.ingest.worker import BatchWriter, IngestWorker
from sync.keys import (
    SUITE_X25519,
)
from sync.uplink import batch_topic

PG = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")


class _NoBroker:
    """Stands in for the MQTT link: the acks are built and signed, not sent."""

    def __init__(self) -> None:
        self.published = 0

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.published += 1


def _worker(store: BatchWriter) -> tuple[IngestWorker, _NoBroker]:
    """An IngestWorker's round (`_handle`, `_publish_acks`) without its MQTT connection."""
    worker = IngestWorker.__new__(IngestWorker)
    worker.store = store
    worker.stop_event = threading.Event()
    worker.processed = 0
    link = _NoBroker()
    worker.link = link  # type: ignore[assignment]
    return worker, link


def _phase(url: str, run: Callable[[], None], batches: int, events: int) -> dict[str, float]:
    backends = database_backends(url)
    pg_before = sum(map(cpu_ticks, backends))
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    run()
    cpu = time.process_time() - cpu_before
    wall = time.perf_counter() - wall_before
    pg = (sum(map(cpu_ticks, backends)) - pg_before) / CLK_TCK
    return {
        "batches": batches,
        "ingest_cpu_ms_per_batch": round(cpu / batches * 1e3, 3),
        "postgres_cpu_ms_per_batch": round(pg / batches * 1e3, 3),
        "wall_ms_per_batch": round(wall / batches * 1e3, 3),
        "ingest_cpu_ms_per_1000_events": round(cpu / events * 1e6, 1),
        "postgres_cpu_ms_per_1000_events": round(pg / events * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--size", type=int, default=30, help="events per batch")
    parser.add_argument("--round", type=int, default=1, help="batches per worker round")
    args = parser.parse_args(argv)
    warm = min(50, args.batches // 4)
    db = f"bench_ingest_batch_{secrets.token_hex(4)}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    url = f"{PG}/{db}"
    result: dict[str, Any] = {}
    try:
        migrate(url)
        with tempfile.TemporaryDirectory() as tmp:
            ring, key = enrolled_agent(url, Path(tmp) / "cloud-keys")
        events = make_events(args.batches * args.size)
        epoch = secrets.token_hex(8)
        cloud = ring.current_hpke.public
        raws = [
            make_sealer(events[i * args.size : (i + 1) * args.size], key, cloud, SUITE_X25519)(
                epoch, i + 1
            )[0]
            for i in range(args.batches)
        ]
        pool = make_pool(
            DatabaseSettings(url=url, pool_max=4), name="bench", check_idle_s=1.0, prepare=True
        )
        try:
            store = BatchWriter(pool, ring)
            worker, link = _worker(store)
            topic = batch_topic("", SITE, AGENT)

            def rounds(envelopes: list[bytes]) -> Callable[[], None]:
                def run() -> None:
                    for i in range(0, len(envelopes), args.round):
                        part = envelopes[i : i + args.round]
                        outcomes, _ = worker._handle([(topic, raw) for raw in part])
                        worker._publish_acks(outcomes)

                return run

            measured = raws[warm:]
            n_events = len(measured) * args.size
            rounds(raws[:warm])()
            # Fresh batches are not looked up as replays (as a live agent's are not); their
            # resends are, whatever their age here.
            min_age = getattr(ingest, "REPLAY_MIN_AGE_S", None)
            if min_age is not None:
                ingest.REPLAY_MIN_AGE_S = float("inf")  # type: ignore[misc]
            result["store"] = _phase(url, rounds(measured), len(measured), n_events)
            if min_age is not None:
                ingest.REPLAY_MIN_AGE_S = 0.0  # type: ignore[misc]
            result["replay"] = _phase(url, rounds(measured), len(measured), n_events)
            if min_age is not None:
                ingest.REPLAY_MIN_AGE_S = min_age  # type: ignore[misc]
            with psycopg.connect(url) as conn:
                row = conn.execute(
                    "SELECT (SELECT count(*) FROM facts.batches), "
                    "(SELECT count(*) FROM facts.events), "
                    "(SELECT count(*) FROM ops.quarantine WHERE reason = 'replay')"
                ).fetchone()
            assert row is not None
            assert row[0] == args.batches and row[1] == args.batches * args.size, row
            assert row[2] == len(measured), row
            result["acks_published"] = link.published
        finally:
            pool.close()
    finally:
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
            )
    for name in ("store", "replay"):
        r = result[name]
        print(
            f"{name}: {r['batches']} batches of {args.size} events, CPU per batch: ingest "
            f"{r['ingest_cpu_ms_per_batch']} ms, PostgreSQL {r['postgres_cpu_ms_per_batch']} ms"
        )
    print(
        json.dumps(
            {
                "bench": "ingest_batch",
                "events_per_batch": args.size,
                "batches_per_round": args.round,
                **result,
                "loadavg": Path("/proc/loadavg").read_text().strip(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
