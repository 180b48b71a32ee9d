"""Benchmark: a backlog of sealed events drained end to end with acks.

An outbox holding a backlog (default 200,000 events in batches of 1,000, sealed as the agent
seals them) is shipped by the agent's uplink through Mosquitto to `cloud-api ingest`
processes (verify, decrypt, validate, store in PostgreSQL, signed ack) until every batch is
acked and deleted. Events per second = backlog / (first publish .. outbox empty).

Uses the machine's Mosquitto and PostgreSQL (a fresh database, dropped afterwards). The
uplink starts only once every ingest process has its subscription acknowledged by the broker:
a batch published before that reaches no subscriber and waits out the resend timeout (30 s
here), which is what made about one run in ten stall. `resent` counts such resends; a run
with resends is a stall whatever its duration.
With `--agents K` the backlog is split over K agents, each enrolled with its own key at a
site of its own, with its own outbox and uplink (its own MQTT connection), all draining at
once: one agent's batches pass its sequence row one at a time, K agents' do not, so this is
how the drain grows with ingest processes until something else is the limit.
Run: `python -m bench.e2e [--events 200000] [--agents 1] [--ingest-processes 2] [--workers 2]
[--runs 1]`. With `--runs N` each run prints its JSON object and the last line sums them up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import sql

from bench.fleet import start_broker
from bench.outbox import AGENT, SITE, make_events, make_sealer
from buffer.outbox import NewBatch, Outbox
from cloud_api.db import migrate
from sync.keys import (
    SUITE_X25519,
    CloudKeyring,
    ed25519_key_id,
    ed25519_line,
    generate_cloud_ack_key,
    generate_cloud_hpke_keys,
)
from sync.uplink import BrokerSettings, Uplink

PG = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
MQTT_HOST = os.environ.get("BENCH_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("BENCH_MQTT_PORT", "1883"))


CLK_TCK = os.sysconf("SC_CLK_TCK")


def enrolled_agent(url: str, keys_dir: Path) -> tuple[CloudKeyring, Ed25519PrivateKey]:
    """The cloud's keys made in `keys_dir`, and the bench's agent (AGENT at SITE) enrolled in
    the database at `url` with a new signing key."""
    generate_cloud_hpke_keys(keys_dir, [SUITE_X25519])
    generate_cloud_ack_key(keys_dir)
    return CloudKeyring.load(keys_dir), enroll(url, AGENT, SITE)


def enroll(url: str, agent: str, site: str) -> Ed25519PrivateKey:
    """`agent` at `site` enrolled in the database at `url` with a new signing key."""
    key = Ed25519PrivateKey.generate()
    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO registry.sites(site_id) VALUES (%s) ON CONFLICT DO NOTHING", (site,)
        )
        conn.execute("INSERT INTO registry.agents VALUES (%s, %s)", (agent, site))
        conn.execute(
            "INSERT INTO registry.agent_keys(agent_id, key_id, public_key) VALUES (%s, %s, %s)",
            (agent, ed25519_key_id(key.public_key()), ed25519_line(key.public_key())),
        )
    return key


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process (all its threads), in clock ticks; 0 when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def database_backends(url: str) -> list[int]:
    """Process ids of the PostgreSQL backends connected to the database of `url`."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchall()
    return [int(r[0]) for r in rows]


def start_ingest(
    env: dict[str, str],
    folder: Path,
    processes: int,
    workers: int,
    procs: list[subprocess.Popen[bytes]],
) -> None:
    """Start `cloud-api ingest` processes (appended to `procs` at once, for the caller to
    stop) and return once each has its subscription acknowledged: their start-up is not
    measured, and a batch published before it would reach no subscriber."""
    cloud_api = str(Path(sys.executable).parent / "cloud-api")
    logs = [folder / f"ingest-{i}.log" for i in range(processes)]
    for log in logs:
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [cloud_api, "ingest", "--workers", str(workers)],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    for proc, log in zip(procs[-processes:], logs, strict=True):
        wait_subscribed(proc, log)


def depth(path: Path) -> int:
    with sqlite3.connect(path, timeout=30) as conn:
        return int(conn.execute("SELECT count(*) FROM batches").fetchone()[0])


def wait_subscribed(proc: subprocess.Popen[bytes], log: Path, limit_s: float = 120.0) -> None:
    """Wait for the ingest process's `subscribed` log line (its SUBACK from the broker)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if any(json.loads(line).get("event") == "subscribed" for line in _json_lines(text)):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"ingest exited with {proc.returncode}: {text[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"ingest did not subscribe within {limit_s:.0f} s")


def _json_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("{") and line.endswith("}")]


async def drain(
    outboxes: list[tuple[Outbox, str, str]],
    prefix: str,
    ring: CloudKeyring,
    in_flight: int,
    port: int,
) -> tuple[float, int]:
    """Seconds until every (outbox, agent, site) is empty, each drained by its agent's own
    uplink, and the number of batches sent again."""
    uplinks = [
        Uplink(
            outbox,
            BrokerSettings(host=MQTT_HOST, port=port),
            site=site,
            agent=agent,
            ack_keys=ring.ack_verify_keys(),
            topic_prefix=prefix,
            ack_timeout=30,
            max_in_flight=in_flight,
        )
        for outbox, agent, site in outboxes
    ]
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(uplink.run()) for uplink in uplinks]
    try:
        # The outboxes have no change notification: polled.
        while any(outbox.stats().depth for outbox, _, _ in outboxes):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return time.perf_counter() - t0, sum(uplink.stats.resent for uplink in uplinks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument(
        "--agents", type=int, default=1, help="agents sharing the backlog, draining at once"
    )
    parser.add_argument("--ingest-processes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="threads per ingest process")
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--runs", type=int, default=1, help="runs in a row, each from scratch")
    parser.add_argument(
        "--own-broker",
        action="store_true",
        help="a Mosquitto of its own on a free port (as bench.fleet), so its CPU is measured",
    )
    args = parser.parse_args(argv)
    results = [run(args) for _ in range(args.runs)]
    if args.runs > 1:
        seconds = sorted(s for s, _ in results)
        print(
            json.dumps(
                {
                    "bench": "e2e",
                    "runs": args.runs,
                    "agents": args.agents,
                    "ingest_processes": args.ingest_processes,
                    "runs_with_resends": sum(1 for _, resent in results if resent),
                    "resent": sum(resent for _, resent in results),
                    "seconds_min": seconds[0],
                    "seconds_median": seconds[len(seconds) // 2],
                    "seconds_max": seconds[-1],
                    # The runs' rates (the fastest run is the one of fewest seconds).
                    "events_per_s_min": round(args.events / seconds[-1]),
                    "events_per_s_median": round(args.events / seconds[len(seconds) // 2]),
                    "events_per_s_max": round(args.events / seconds[0]),
                    "target_events_per_s": 60_000,
                }
            )
        )
    return 0


def run(args: argparse.Namespace) -> tuple[float, int]:
    """One run from a fresh database; prints its JSON object; returns (seconds, resent)."""
    db = f"bench_e2e_{secrets.token_hex(4)}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    url = f"{PG}/{db}"
    procs: list[subprocess.Popen[bytes]] = []
    broker: subprocess.Popen[bytes] | None = None
    port = MQTT_PORT
    try:
        migrate(url)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            if args.own_broker:
                broker, port = start_broker(folder)
            keys_dir = folder / "cloud-keys"
            ring, key = enrolled_agent(url, keys_dir)
            cloud = ring.current_hpke.public
            outboxes: list[tuple[Outbox, str, str]] = []
            for n in range(args.agents):
                # One agent is the bench's own (AGENT at SITE); more each have their own.
                agent, site = (AGENT, SITE) if n == 0 else (f"{AGENT}-{n}", f"{SITE}-{n}")
                if n:
                    key = enroll(url, agent, site)
                # Its backlog, sealed once as the agent would have sealed it during an outage.
                outbox = Outbox(folder / f"outbox-{n}.db", max_bytes=64 * 1024**3, min_free_bytes=0)
                share = args.events // args.agents + (n < args.events % args.agents)
                events = make_events(share, seed=n + 1, agent=agent, site=site)
                for i in range(0, len(events), args.batch * 10):
                    part = events[i : i + args.batch * 10]
                    chunks = [part[j : j + args.batch] for j in range(0, len(part), args.batch)]
                    outbox.append(
                        [
                            NewBatch(
                                len(c),
                                make_sealer(c, key, cloud, SUITE_X25519, agent=agent, site=site),
                            )
                            for c in chunks
                        ],
                        None,
                    )
                outboxes.append((outbox, agent, site))
            batches = sum(outbox.stats().depth for outbox, _, _ in outboxes)
            prefix = f"bench/{secrets.token_hex(4)}/"
            env = {
                **os.environ,
                "CLOUD_DATABASE_URL": url,
                "CLOUD_MQTT_HOST": MQTT_HOST,
                "CLOUD_MQTT_PORT": str(port),
                "CLOUD_TOPIC_PREFIX": prefix,
                "CLOUD_KEYS_DIR": str(keys_dir),
            }
            start_ingest(env, folder, args.ingest_processes, args.workers, procs)
            groups = {"ingest": [p.pid for p in procs], "postgres": database_backends(url)}
            if broker is not None:
                groups["broker"] = [broker.pid]
            before = {k: sum(map(cpu_ticks, v)) for k, v in groups.items()}
            agent_before = time.process_time()
            seconds, resent = asyncio.run(drain(outboxes, prefix, ring, args.in_flight, port))
            cpu_ms = {
                k: round((sum(map(cpu_ticks, v)) - before[k]) / CLK_TCK * 1e6 / args.events, 1)
                for k, v in groups.items()
            }
            # This process is the agent during the drain: reading batches from the outbox,
            # publishing them, verifying acks and deleting what they name.
            cpu_ms["agent"] = round((time.process_time() - agent_before) * 1e6 / args.events, 1)
            for outbox, _, _ in outboxes:
                outbox.close()
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT count(*), count(DISTINCT event_id) FROM facts.events"
            ).fetchone()
            stored_batches = conn.execute("SELECT count(*) FROM facts.batches").fetchone()
        assert row is not None and stored_batches is not None
        assert row[0] == row[1] == args.events, (row, args.events)
        assert stored_batches[0] == batches
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        if broker is not None:
            broker.terminate()
            broker.wait(30)
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
            )
    rate = args.events / seconds
    print(f"{args.events:,} events in {batches} batches drained end to end in {seconds:.2f} s")
    print(
        json.dumps(
            {
                "bench": "e2e",
                "events": args.events,
                "batches": batches,
                "agents": args.agents,
                "seconds": round(seconds, 3),
                "events_per_s": round(rate),
                "resent": resent,
                "ingest_processes": args.ingest_processes,
                "workers_per_process": args.workers,
                "max_in_flight": args.in_flight,
                # CPU of the ingest processes, the database's backends and the agent (this
                # process), per 1,000 events: what bounds the rate when the cores are shared
                "cpu_ms_per_1000_events": cpu_ms,
                "loadavg": Path("/proc/loadavg").read_text().strip(),
                "target_events_per_s": 60_000,
            }
        )
    )
    return round(seconds, 3), resent


if __name__ == "__main__":
    raise SystemExit(main())
