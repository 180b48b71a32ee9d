"""Benchmark: events -> durable sealed batches in the outbox (`synchronous=FULL`).

Measured path (what the agent's flush does): serialize a batch of events, compress, encrypt
to the cloud key (HPKE), sign (Ed25519), and append the batches of one flush together with
the engine checkpoint in ONE SQLite transaction (WAL, synchronous=FULL).

Baseline, in the same run and on the same disk: plain sqlite3 with the same pragmas inserting
the same events serialized to JSON, one row per event, 500 rows per transaction. Two figures:
`baseline` starts from the same event objects as the outbox path (serialization timed), which
is the like-for-like comparison and gives `ratio`; `baseline_preserialized` times only the
inserts of rows serialized beforehand (no serialization, no compression, no encryption),
reported as `ratio_preserialized`.

Run: `python -m bench.outbox [--events 200000] [--batch 1000] [--flush-batches 10]`.
The last line printed is one JSON object with both rates and their ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from buffer.outbox import NewBatch, Outbox, Sealer, StateWrite
from oee.components import Components
from oee.events import CountEvent, Event, OeeEvent, StateEvent, dump_events
from sync.envelope import EnvelopeHeader, envelope_digest, seal
from sync.keys import SUITE_X25519, CloudPrivateKey, CloudPublicKey, Suite, ed25519_key_id

AGENT, SITE = "edge-bench-01", "plant-bench"


def make_events(n: int, *, seed: int = 1, agent: str = AGENT, site: str = SITE) -> list[Event]:
    """A realistic mix: mostly part counts, some state changes, a closed bucket now and then
    (of `agent` at `site`)."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 5, 6, tzinfo=UTC)
    events: list[Event] = []
    for i in range(n):
        ts = start + timedelta(milliseconds=250 * i)
        eq = f"press-{i % 50 + 1}"
        r = rng.random()
        if r < 0.80:
            events.append(
                CountEvent(
                    agent_id=agent,
                    site_id=site,
                    equipment_id=eq,
                    ts=ts,
                    produced=1,
                    good=1,
                    product="A",
                )
            )
        elif r < 0.95:
            events.append(
                StateEvent(
                    agent_id=agent,
                    site_id=site,
                    equipment_id=eq,
                    ts=ts,
                    state=rng.choice(["running", "idle", "fault"]),
                    previous="running",
                    reason="jam",
                )
            )
        else:
            bucket = ts.replace(second=0, microsecond=0)
            events.append(
                OeeEvent(
                    agent_id=agent,
                    site_id=site,
                    equipment_id=eq,
                    ts=ts,
                    bucket_start=bucket,
                    bucket_end=bucket + timedelta(minutes=1),
                    shift="early",
                    shift_start=start,
                    components=Components(
                        planned_busy_s=60,
                        production_s=50,
                        downtime_s=10,
                        produced=50,
                        good=49,
                        scrap=1,
                        ideal_produced_s=50,
                        ideal_good_s=49,
                    ),
                )
            )
    return events


def make_sealer(
    events: list[Event],
    key: Ed25519PrivateKey,
    cloud: CloudPublicKey,
    suite: Suite,
    *,
    agent: str = AGENT,
    site: str = SITE,
) -> Sealer:
    plaintext = dump_events(events)
    key_id = ed25519_key_id(key.public_key())

    def sealer(epoch: str, seq: int) -> tuple[bytes, str]:
        header = EnvelopeHeader(
            agent_id=agent, site_id=site, epoch=epoch, seq=seq, count=len(events),
            signing_key_id=key_id, cloud_key_id=cloud.key_id, suite=suite,
        )  # fmt: skip
        raw = seal(plaintext, header, key, cloud)
        return raw, envelope_digest(raw)

    return sealer


def run_outbox(
    folder: Path, events: list[Event], batch: int, flush_batches: int, suite: Suite
) -> dict[str, Any]:
    cloud = CloudPrivateKey.generate(suite).public
    key = Ed25519PrivateKey.generate()
    outbox = Outbox(folder / "outbox.db", max_bytes=64 * 1024**3, min_free_bytes=0)
    # engine state of realistic size, committed with each flush as the agent's journal row
    checkpoint = json.dumps({"engine": "x" * 2000}).encode()
    per_flush = batch * flush_batches
    t0 = time.perf_counter()
    for i in range(0, len(events), per_flush):
        flush = events[i : i + per_flush]
        chunks = [flush[j : j + batch] for j in range(0, len(flush), batch)]
        outbox.append(
            [NewBatch(len(c), make_sealer(c, key, cloud, suite)) for c in chunks],
            StateWrite(at=i, entry=checkpoint),
        )
    elapsed = time.perf_counter() - t0
    stats = outbox.stats()
    outbox.close()
    assert stats.events == len(events)
    return {"seconds": elapsed, "batches": stats.depth, "bytes": stats.bytes}


def run_baseline(folder: Path, events: list[Event], per_tx: int, *, serialize: bool) -> float:
    """Seconds to insert every event as one JSON row, `per_tx` rows per transaction."""
    conn = sqlite3.connect(folder / f"baseline-{serialize}.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    ready = None if serialize else [e.model_dump_json().encode() for e in events]
    t0 = time.perf_counter()
    for i in range(0, len(events), per_tx):
        if ready is None:
            rows = [e.model_dump_json().encode() for e in events[i : i + per_tx]]
        else:
            rows = ready[i : i + per_tx]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO events(body) VALUES (?)", ((r,) for r in rows))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000, help="events per sealed batch")
    parser.add_argument("--flush-batches", type=int, default=10, help="batches per transaction")
    parser.add_argument("--suite", default=SUITE_X25519)
    parser.add_argument("--dir", help="folder on the disk to measure (default: a temp folder)")
    args = parser.parse_args(argv)
    events = make_events(args.events)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ours = run_outbox(Path(tmp), events, args.batch, args.flush_batches, args.suite)
        base_s = run_baseline(Path(tmp), events, 500, serialize=True)
        pre_s = run_baseline(Path(tmp), events, 500, serialize=False)
    ours_rate = args.events / ours["seconds"]
    base_rate = args.events / base_s
    pre_rate = args.events / pre_s
    print(f"outbox:   {ours_rate:,.0f} events/s ({ours['batches']} sealed batches, "
          f"{ours['bytes'] / args.events:.1f} bytes/event on disk)")  # fmt: skip
    print(f"baseline: {base_rate:,.0f} events/s (one JSON row per event, 500 per transaction)")
    print(f"baseline, rows serialized beforehand: {pre_rate:,.0f} events/s")
    print(
        json.dumps(
            {
                "bench": "outbox",
                "events": args.events,
                "suite": args.suite,
                "events_per_s": round(ours_rate),
                "baseline_events_per_s": round(base_rate),
                "ratio": round(ours_rate / base_rate, 3),
                "baseline_preserialized_events_per_s": round(pre_rate),
                "ratio_preserialized": round(ours_rate / pre_rate, 3),
                "bytes_per_event": round(ours["bytes"] / args.events, 1),
                "target_events_per_s": 50_000,
                "target_ratio": 1.0,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
