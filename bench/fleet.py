"""Benchmark: a fleet of agents shipping live events into 1, 2 and 4 ingest processes.

Each simulated agent is what the real agent is minus its PLC connections: its own enrolled
Ed25519 key, a `PlantEngine` with 20 machines (the real OEE engine: count, state, bucket and
agent events), a durable SQLite outbox (`buffer.outbox`, sequence numbers, deletion only on a
verified ack) written every `--flush-interval` through the agent's `OutboxWriter`, batches
sealed with `sync.envelope.seal` (zstd, HPKE, Ed25519) as `AgentRuntime` seals them, and
its own MQTT connection (`sync.uplink.Uplink`, QoS 1, resend after `--ack-timeout`, 15 s
as the agent's default; polled every `--poll-interval`, 5 s, where the agent polls every
0.5 s: a commit (`notify`) and an ack wake it at once, so polling only finds overdue acks). The
machines are simulated at 1 Hz polling, reported on change: each runs at a cycle time of
2-6 s and stops now and then for a fault or missing material with a reason, so an agent
produces about 6 events a second (a count for each poll that saw parts, state changes,
20 closed buckets and a status event a minute). Many agents share one generator process
(asyncio, paho's network thread per connection; at most 60 agents a process, as paho's
select() takes file descriptors below 1024 only); the engine's checkpoint is not written
(the bench measures the cloud side); outboxes live on tmpfs (each real agent has its own
disk). Where a generator's CPU goes (py-spy on a generator of 60 agents, 40 s of the
window, start-up and shutdown left out): sealing a fifth (HPKE, Ed25519 and zstd of each
batch, its header, the events' JSON), the OEE engine a fifth (a quarter before count events
were made without validating again what the engine already holds, and ids without
`uuid.UUID`), the rest of the outbox write an eighth (the SQLite append and commit, the fill
check), the uplink a quarter (verifying acks 10 %, paho's publish 6 %), asyncio 15 %, paho's
threads 6 %. `--nice` lowers the generators' priority so that, on a shared machine, the cloud
side is served first, as it would be with agents on computers of their own.

The measuring window starts `--warmup` seconds after every generator reports all its agents
connected and each agent's first batch written.

The cloud side is the real one: `cloud-api ingest` processes on a shared subscription of a
Mosquitto started for the bench (own port and configuration, no connection limit), and
PostgreSQL (a fresh database per setting, dropped afterwards).

Figures per setting (ingest processes 1, 2, 4), over a steady window after a warm-up:
- events_per_s: events whose batch was stored in the window, per second;
  events_made_per_s: events the agents sealed in the window, per second (what the fleet
  offered), and events_made_stored_per_s: of those, stored by the end of the run;
- lag_p50_s / lag_p99_s: batch creation on the agent (`created`, sealed at the flush) to
  its storing transaction (`received_at`; commit follows within the same transaction);
  ack_lag_*: creation to the verified ack at the agent; publish_lag_*: creation to the
  hand-over to the MQTT client (what a starved generator adds); resent: batches sent again
  after the ack timeout (each one a replay for ingest to verify, decrypt and re-ack);
- acks_per_s: signed ack messages the agents received and verified;
- cpu_ms_per_1000_events for ingest (all processes), broker, postgres (the backends of the
  bench database) and the agent generators, from /proc over the window;
- busy: each part's share of what it can use (a Python process one core, Mosquitto one
  core, PostgreSQL and the machine all cores); `bottleneck` names the first part above 90 %
  (the machine when it is the one, since all of it shares 2 cores).

Run: `python -m bench.fleet [--agents 1000] [--machines 20] [--ingest 1,2,4] [--window 60]
[--nice 10] [--ack-timeout 15]`.
The last line is one JSON object with every setting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.checks import validated

PG = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
STATES = {"idle": 0, "running": 1, "fault": 2}
REASONS = {"no material": 1, "jam": 3, "hydraulics": 4}


# -- the simulated agent (generator processes) ---------------------------------------------


@dataclass
class Machine:
    """A press polled at 1 Hz and reported on change (state, reason, total and scrap)."""

    id: str
    cycle_s: float
    rng: random.Random
    state: str = "running"
    until: float = 0.0  # wall time the current state ends
    total: int = 0
    scrap: int = 0
    made: float = 0.0  # fraction of the part in progress

    def poll(self, now: float, at: datetime) -> list[tuple[str, int]]:
        """Changed signals at this poll (name, raw value)."""
        changed: list[tuple[str, int]] = []
        if now >= self.until:
            if self.state == "running":
                reason = self.rng.choice(list(REASONS))
                self.state = "idle" if reason == "no material" else "fault"
                self.until = now + self.rng.uniform(60, 600)
                changed.append(("reason", REASONS[reason]))
            else:
                self.state = "running"
                self.until = now + self.rng.expovariate(1 / 1800)
            changed.append(("state", STATES[self.state]))
        if self.state == "running":
            self.made += 1.0 / self.cycle_s
            parts = int(self.made)
            if parts:
                self.made -= parts
                self.total += parts
                changed.append(("total_count", self.total))
                if self.rng.random() < 0.02:
                    self.scrap += 1
                    changed.append(("scrap_count", self.scrap))
        return changed


@dataclass
class AgentStats:
    ack_times: list[float] = field(default_factory=list)  # wall time of each verified ack
    created: dict[int, float] = field(default_factory=dict)  # seq -> wall time sealed
    ack_lags: list[tuple[float, float]] = field(default_factory=list)  # (sealed, lag)
    # Sealing to the first hand-over to the MQTT client (sealed, lag): the part of the lag
    # the generator process adds when it is starved of CPU.
    publish_lags: list[tuple[float, float]] = field(default_factory=list)
    made: list[tuple[float, int]] = field(default_factory=list)  # (sealed, events) per batch
    published: set[int] = field(default_factory=set)


def equipment_specs(machines: int) -> list[Any]:
    from oee.config import CounterSpec, EquipmentSpec

    state_map = {str(v): k for k, v in STATES.items()}
    reason_map = {str(v): k for k, v in REASONS.items()}
    return [
        validated(
            EquipmentSpec,
            id=f"press-{i + 1}",
            line=f"line-{i // 10 + 1}",
            ideal_cycle_time=2.0 + (i % 5),
            state_map=state_map,
            reason_map=reason_map,
            counters={"total_count": CounterSpec(width=32), "scrap_count": CounterSpec(width=32)},
        )
        for i in range(machines)
    ]


async def run_agents(spec: dict[str, Any]) -> dict[str, Any]:
    """One generator process: its share of the fleet until `spec['end']` (wall time)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.outbox_writer import OutboxWriter
    from buffer.outbox import Outbox
    from connectors.sample import Sample
    from oee.calendar import ShiftCalendar
    from oee.config import ShiftSpec
    from oee.engine import PlantEngine
    from oee.events import AgentEvent, Event, dump_events
    from sync.envelope import EnvelopeHeader, envelope_digest, seal
    from sync.keys import CloudKeyring, ed25519_key_id
    from sync.uplink import BrokerSettings, Uplink

    ring = CloudKeyring.load(Path(spec["keys_dir"]))
    cloud = ring.current_hpke.public
    ack_keys = ring.ack_verify_keys()
    calendar = ShiftCalendar([validated(ShiftSpec, name="all", start="00:00", end="00:00")], "UTC")
    specs = equipment_specs(spec["machines"])
    control, ready = spec["control"], spec["ready"]
    end = float("inf")  # wall time to stop, set by the bench through `control`
    folder = Path(spec["outbox_dir"])

    class CountingOutbox(Outbox):
        """The real outbox; notes when each acked batch was sealed (ack lag)."""

        stats_ref: AgentStats

        def ack(self, epoch: str, acked: dict[int, str]) -> list[int]:
            deleted = super().ack(epoch, acked)
            now = time.time()
            for seq in deleted:
                self.stats_ref.published.discard(seq)
                created = self.stats_ref.created.pop(seq, None)
                if created is not None:
                    self.stats_ref.ack_lags.append((created, now - created))
            return deleted

    class CountingUplink(Uplink):
        stats_ref: AgentStats

        def apply_ack(self, payload: bytes) -> list[int]:
            self.stats_ref.ack_times.append(time.time())
            return super().apply_ack(payload)

        def _publish_due(self) -> None:
            super()._publish_due()
            stats, now = self.stats_ref, time.time()
            for seq in self._in_flight.keys() - stats.published:
                stats.published.add(seq)
                created = stats.created.get(seq)
                if created is not None:
                    stats.publish_lags.append((created, now - created))

    @dataclass
    class SimAgent:
        agent_id: str
        site_id: str
        key: Ed25519PrivateKey
        engine: PlantEngine
        machines: list[Machine]
        outbox: CountingOutbox
        writer: OutboxWriter
        uplink: CountingUplink
        stats: AgentStats
        pending: list[Event] = field(default_factory=list)
        next_status: float = 0.0

    def sealer_for(agent: str, site: str, key: Ed25519PrivateKey, stats: AgentStats) -> Any:
        key_id = ed25519_key_id(key.public_key())

        def seal_batch(events: list[Event]) -> Callable[[str, int], tuple[bytes, str]]:
            plaintext = dump_events(events)

            def sealer(epoch: str, seq: int) -> tuple[bytes, str]:
                header = EnvelopeHeader(
                    agent_id=agent, site_id=site, epoch=epoch, seq=seq, count=len(events),
                    signing_key_id=key_id, cloud_key_id=cloud.key_id, suite=cloud.suite,
                    trace_id=secrets.token_hex(16),
                )  # fmt: skip
                stats.created[seq] = time.time()
                stats.made.append((stats.created[seq], len(events)))
                raw = seal(plaintext, header, key, cloud)
                return raw, envelope_digest(raw)

            return sealer

        return seal_batch

    agents: list[SimAgent] = []
    start = datetime.now(UTC)
    for agent_id, site_id, key_hex in spec["agents"]:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(key_hex))
        stats = AgentStats()
        outbox = CountingOutbox(folder / f"{agent_id}.db", max_bytes=1024**3, min_free_bytes=0)
        outbox.stats_ref = stats
        uplink = CountingUplink(
            outbox,
            BrokerSettings(host="127.0.0.1", port=spec["port"]),
            site=site_id,
            agent=agent_id,
            ack_keys=ack_keys,
            ack_timeout=spec["ack_timeout"],
            max_in_flight=16,
            poll_interval=spec["poll_interval"],
        )
        uplink.stats_ref = stats
        rng = random.Random(agent_id)
        t_start = start.timestamp()
        machines = [
            Machine(
                s.id,
                s.ideal_cycle_time * rng.uniform(1.05, 1.3),
                rng,
                until=t_start + rng.expovariate(1 / 1800),
            )
            for s in specs
        ]
        engine = PlantEngine(specs, calendar, agent_id=agent_id, site_id=site_id)
        first = engine.start(start)
        writer = OutboxWriter(
            outbox,
            sealer_for(agent_id, site_id, key, stats),
            agent_id=agent_id,
            site_id=site_id,
            batch_max_events=1000,
        )
        agents.append(
            SimAgent(agent_id, site_id, key, engine, machines, outbox, writer, uplink, stats, first)
        )

    tasks = [asyncio.create_task(a.uplink.run()) for a in agents]
    interval = spec["flush_interval"]

    async def agent_loop(a: SimAgent, offset: float) -> None:
        # Polls at 1 Hz and flushes every `interval`, on its own clock (agents are spread
        # over the interval), as the agent's engine and flush loops do.
        loop = asyncio.get_running_loop()
        await asyncio.sleep(offset)
        next_at = loop.time()
        next_flush = time.time() + interval
        while time.time() < end:
            now_wall = time.time()
            at = datetime.fromtimestamp(now_wall, UTC)
            for m in a.machines:
                for signal_name, value in m.poll(now_wall, at):
                    a.pending.extend(a.engine.feed(Sample(m.id, signal_name, value, at)))
            if now_wall >= next_flush:
                next_flush += interval
                flush(a, now_wall, at)
            next_at += 1.0
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    def flush(a: SimAgent, now_wall: float, at: datetime) -> None:
        a.pending.extend(a.engine.tick(at))
        if now_wall >= a.next_status:
            a.next_status = now_wall + 60
            a.pending.append(
                AgentEvent(
                    agent_id=a.agent_id,
                    site_id=a.site_id,
                    ts=at,
                    code="status",
                    message="agent status",
                    data={
                        "outbox_depth": a.outbox.stats().depth,
                        "uplink": {
                            "published": a.uplink.stats.published,
                            "resent": a.uplink.stats.resent,
                        },
                    },
                )
            )
        if a.pending:
            result = a.writer.write(a.pending, None, at)
            a.pending = result.held
            if result.seqs:
                a.uplink.notify()

    errors: list[str] = []

    async def guarded(a: SimAgent, offset: float) -> None:
        try:
            await agent_loop(a, offset)
        except Exception as exc:  # reported in the result, never silently ends an agent
            errors.append(f"{a.agent_id}: {type(exc).__name__}: {exc}")

    loops = [
        asyncio.create_task(guarded(a, i * interval / len(agents))) for i, a in enumerate(agents)
    ]
    # Ready once every agent is connected and has written a batch; the bench then starts
    # its window after a warm-up and writes the end time to `control`.
    connected_max = 0
    is_ready = False
    while time.time() < end:
        connected = sum(1 for a in agents if a.uplink.stats.connected)
        connected_max = max(connected_max, connected)
        if (
            not is_ready
            and connected == len(agents)
            and all(a.stats.created or a.stats.ack_lags for a in agents)
        ):
            with open(ready, "w") as f:  # noqa: ASYNC230 (a few bytes on tmpfs, once)
                f.write(str(time.time()))
            is_ready = True
        with contextlib.suppress(FileNotFoundError), open(control) as f:  # noqa: ASYNC230
            end = float(f.read())  # (a few bytes on tmpfs, once a second)
        await asyncio.sleep(1.0)
    await asyncio.gather(*loops, return_exceptions=True)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for a in agents:
        with contextlib.suppress(Exception):
            a.outbox.close()
    return {
        "agents": len(agents),
        "connected_max": connected_max,
        "ack_times": [round(t, 3) for a in agents for t in a.stats.ack_times],
        "ack_lags": [(round(c, 3), round(x, 4)) for a in agents for c, x in a.stats.ack_lags],
        "made": [(round(c, 3), n) for a in agents for c, n in a.stats.made],
        "publish_lags": [
            (round(c, 3), round(x, 4)) for a in agents for c, x in a.stats.publish_lags
        ],
        "resent": sum(a.uplink.stats.resent for a in agents),
        "errors": errors[:5],
        "error_count": len(errors),
    }


def generator_main(spec_path: str, out_path: str) -> int:
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(40)  # errors only
    )
    spec = json.loads(Path(spec_path).read_text())
    result = asyncio.run(run_agents(spec))
    Path(out_path).write_text(json.dumps(result))
    return 0


# -- measuring ---------------------------------------------------------------------------


def machine_ticks() -> tuple[int, int]:
    """(busy, total) ticks of all cores from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "max_connections -1\n"
        "persistence false\n"
        "max_queued_messages 100000\n"
        "max_inflight_messages 0\n"
        "log_type error\n"
    )

    def raise_limit() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=(folder / "mosquitto.log").open("wb"),
        preexec_fn=raise_limit,  # noqa: PLW1509 (only setrlimit, no threads yet)
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return proc, port
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {(folder / 'mosquitto.log').read_text()}")
        time.sleep(0.1)
    raise RuntimeError("mosquitto did not listen within 30 s")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_setting(args: argparse.Namespace, ingest: int) -> dict[str, Any]:
    import psycopg
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    from psycopg import sql

    from bench.e2e import CLK_TCK, cpu_ticks, database_backends, start_ingest
    from cloud_api.db import migrate
    from sync.keys import (
        SUITE_X25519,
        ed25519_key_id,
        ed25519_line,
        generate_cloud_ack_key,
        generate_cloud_hpke_keys,
    )

    db = f"bench_fleet_{secrets.token_hex(4)}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    url = f"{PG}/{db}"
    procs: list[subprocess.Popen[bytes]] = []
    gens: list[subprocess.Popen[bytes]] = []
    broker: subprocess.Popen[bytes] | None = None
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    shm = Path(tempfile.mkdtemp(prefix="bench-fleet-", dir="/dev/shm"))
    try:
        migrate(url)
        keys_dir = tmp / "cloud-keys"
        generate_cloud_hpke_keys(keys_dir, [SUITE_X25519])
        generate_cloud_ack_key(keys_dir)
        # Enrollment: one site per agent (a plant each), its own key.
        agents: list[tuple[str, str, str]] = []
        with psycopg.connect(url) as conn, conn.transaction():
            for i in range(args.agents):
                agent, site = f"edge-{i:04d}", f"plant-{i:04d}"
                key = Ed25519PrivateKey.generate()
                pub = key.public_key()
                conn.execute("INSERT INTO registry.sites(site_id) VALUES (%s)", (site,))
                conn.execute("INSERT INTO registry.agents VALUES (%s, %s)", (agent, site))
                conn.execute(
                    "INSERT INTO registry.agent_keys(agent_id, key_id, public_key) "
                    "VALUES (%s, %s, %s)",
                    (agent, ed25519_key_id(pub), ed25519_line(pub)),
                )
                raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
                agents.append((agent, site, raw.hex()))
        broker, port = start_broker(tmp)
        env = {
            **os.environ,
            "CLOUD_DATABASE_URL": url,
            "CLOUD_MQTT_HOST": "127.0.0.1",
            "CLOUD_MQTT_PORT": str(port),
            "CLOUD_KEYS_DIR": str(keys_dir),
        }
        start_ingest(env, tmp, ingest, args.workers, procs)
        # The agents: connect, warm up (first buckets close), then the measured window.
        # The window starts after every generator is ready (all its agents connected, each
        # has written a batch) and a warm-up; the generators run until `control`'s time.
        control = tmp / "end"
        results = [tmp / f"gen-{g}.json" for g in range(args.generators)]
        for g in range(args.generators):
            spec = {
                "agents": agents[g :: args.generators],
                "machines": args.machines,
                "flush_interval": args.flush_interval,
                "poll_interval": args.poll_interval,
                "ack_timeout": args.ack_timeout,
                "keys_dir": str(keys_dir),
                "port": port,
                "outbox_dir": str(shm),
                "control": str(control),
                "ready": str(tmp / f"gen-{g}.ready"),
            }
            spec_path = tmp / f"gen-{g}.spec.json"
            spec_path.write_text(json.dumps(spec))
            spec_path.chmod(0o600)  # holds the agents' private keys
            gens.append(
                subprocess.Popen(
                    [
                        *(["nice", "-n", str(args.nice)] if args.nice else []),
                        sys.executable,
                        "-m",
                        "bench.fleet",
                        "--generator",
                        str(spec_path),
                        str(results[g]),
                    ],
                    stderr=(tmp / f"gen-{g}.log").open("wb"),
                )
            )
        t0 = time.monotonic()
        ready_limit = 300 + args.agents / 5
        while not all((tmp / f"gen-{g}.ready").exists() for g in range(args.generators)):
            if any(g.poll() is not None for g in gens):
                raise RuntimeError("a generator process exited before its agents were ready")
            if time.monotonic() - t0 > ready_limit:
                raise RuntimeError(f"agents not all connected within {ready_limit:.0f} s")
            time.sleep(0.5)
        ready_s = time.monotonic() - t0
        measure_from = time.time() + args.warmup
        measure_to = measure_from + args.window
        control.write_text(str(measure_to + 2.0))
        while time.time() < measure_from:
            time.sleep(0.2)
        groups = {
            "ingest": [p.pid for p in procs],
            "broker": [broker.pid],
            "postgres": database_backends(url),
            "agents": [g.pid for g in gens],
        }
        before = {k: sum(cpu_ticks(p) for p in v) for k, v in groups.items()}
        per_proc_before = {p: cpu_ticks(p) for v in groups.values() for p in v}
        m_before = machine_ticks()
        w0 = time.monotonic()
        while time.time() < measure_to:
            time.sleep(0.2)
        wall = time.monotonic() - w0
        after = {k: sum(cpu_ticks(p) for p in v) for k, v in groups.items()}
        per_proc_after = {p: cpu_ticks(p) for v in groups.values() for p in v}
        m_after = machine_ticks()
        loadavg = Path("/proc/loadavg").read_text().strip()
        for gen in gens:
            gen.wait(120 + args.agents / 20)
        gen_results = [json.loads(r.read_text()) for r in results if r.exists()]
        # Give the last batches of the window time to be stored before reading the lags.
        time.sleep(5)
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT count(*), coalesce(sum(event_count), 0), "
                "percentile_cont(0.5) WITHIN GROUP (ORDER BY lag), "
                "percentile_cont(0.99) WITHIN GROUP (ORDER BY lag), max(lag) "
                "FROM (SELECT event_count, extract(epoch FROM received_at - created) AS lag "
                "FROM facts.batches WHERE received_at >= to_timestamp(%s) "
                "AND received_at < to_timestamp(%s)) b",
                (measure_from, measure_to),
            ).fetchone()
            made = conn.execute(
                "SELECT count(*), coalesce(sum(event_count), 0) FROM facts.batches "
                "WHERE created >= to_timestamp(%s) AND created < to_timestamp(%s)",
                (measure_from, measure_to),
            ).fetchone()
            whole = conn.execute(
                "SELECT count(*), coalesce(sum(event_count), 0), "
                "extract(epoch FROM min(created)) - %s, extract(epoch FROM max(created)) - %s, "
                "extract(epoch FROM min(received_at)) - %s, "
                "extract(epoch FROM max(received_at)) - %s FROM facts.batches",
                (measure_from,) * 4,
            ).fetchone()
            print("batches, events, first/last created, first/last stored (s from window)",
                  whole, file=sys.stderr)  # fmt: skip
        assert row is not None and made is not None
    finally:
        for p in [*gens, *procs]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*gens, *procs]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
            if p.poll() is None:
                p.kill()
        if broker is not None:
            broker.terminate()
            broker.wait(30)
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
            )
        for g in range(len(gens)):
            text = (tmp / f"gen-{g}.log").read_text(errors="replace")
            if text.strip():
                print(f"generator {g}: {text[-1500:]}", file=sys.stderr)
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    batches, events = int(row[0]), int(row[1])

    def in_window(pairs: list[list[float]]) -> list[float]:
        return [lag for created, lag in pairs if measure_from <= created < measure_to]

    ack_lags = in_window([x for r in gen_results for x in r["ack_lags"]])
    publish_lags = in_window([x for r in gen_results for x in r["publish_lags"]])
    acks = sum(1 for r in gen_results for t in r["ack_times"] if measure_from <= t < measure_to)
    made_at_agents = sum(
        n for r in gen_results for c, n in r["made"] if measure_from <= c < measure_to
    )
    cores = os.cpu_count() or 1
    spent = {k: (after[k] - before[k]) / CLK_TCK for k in groups}
    busy = {
        # Python processes and Mosquitto are bound to one core each (the GIL, one thread).
        "ingest_max_process": max(
            (per_proc_after[p] - per_proc_before[p]) / CLK_TCK / wall for p in groups["ingest"]
        ),
        "broker": spent["broker"] / wall,
        "postgres": spent["postgres"] / wall / cores,
        "agents_max_process": max(
            (per_proc_after[p] - per_proc_before[p]) / CLK_TCK / wall for p in groups["agents"]
        ),
        "machine": (m_after[0] - m_before[0]) / max(1, m_after[1] - m_before[1]),
    }
    # The bench's own share of the machine (the machine's figure includes other load).
    busy["bench_total"] = sum(spent.values()) / wall / cores
    parts = ("ingest_max_process", "broker", "postgres", "agents_max_process")
    saturated = [k for k in sorted(parts, key=lambda k: -busy[k]) if busy[k] >= 0.9]
    if saturated:
        bottleneck: str | None = saturated[0]
    elif busy["bench_total"] >= 0.9:
        bottleneck = "machine (the bench's processes use every core)"
    elif busy["machine"] >= 0.95:
        bottleneck = "machine (shared with other load)"
    else:
        bottleneck = None
    return {
        "ingest_processes": ingest,
        "agents": args.agents,
        "connected_max": sum(r["connected_max"] for r in gen_results),
        "ready_s": round(ready_s, 1),
        "events_per_s": round(events / wall),
        "batches_per_s": round(batches / wall),
        # Sealed by the agents in the window, and of those, stored by the end of the run.
        "events_made_per_s": round(made_at_agents / wall),
        "events_made_stored_per_s": round(int(made[1]) / wall),
        "lag_p50_s": round(float(row[2]), 3) if row[2] is not None else None,
        "lag_p99_s": round(float(row[3]), 3) if row[3] is not None else None,
        "lag_max_s": round(float(row[4]), 3) if row[4] is not None else None,
        "ack_lag_p50_s": percentile(ack_lags, 0.5),
        "ack_lag_p99_s": percentile(ack_lags, 0.99),
        "publish_lag_p50_s": percentile(publish_lags, 0.5),
        "publish_lag_p99_s": percentile(publish_lags, 0.99),
        "acks_per_s": round(acks / args.window),
        "resent": sum(r["resent"] for r in gen_results),
        "agent_errors": sum(r["error_count"] for r in gen_results),
        "agent_error_examples": [e for r in gen_results for e in r["errors"]][:3],
        "cpu_ms_per_1000_events": {
            k: round(v * 1000 / max(1, events) * 1000, 1) for k, v in spent.items()
        },
        "busy": {k: round(v, 3) for k, v in busy.items()},
        "bottleneck": bottleneck,
        "loadavg": loadavg,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--generator"]:
        return generator_main(argv[1], argv[2])
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--machines", type=int, default=20, help="machines per agent")
    parser.add_argument("--ingest", default="1,2,4", help="ingest process counts to run")
    parser.add_argument("--workers", type=int, default=8, help="threads per ingest process")
    parser.add_argument(
        "--generators",
        type=int,
        default=0,
        help="agent generator processes (default: one per 60 agents; paho waits with "
        "select(), which takes descriptors below 1024 only, and an agent holds about ten)",
    )
    parser.add_argument(
        "--flush-interval",
        type=float,
        default=5.0,
        help="the agents' uplink.flush_interval (s); 1 s, the agent's default, makes 1,000 "
        "agents 1,000 batches and transactions a second",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=5.0,
        help="the uplinks' poll interval (s; the agent's is 0.5): a committed batch and an ack "
        "wake the uplink at once, so polling only finds batches whose ack is overdue",
    )
    parser.add_argument(
        "--ack-timeout",
        type=float,
        default=15.0,
        help="the agents' uplink.ack_timeout (s; the agent's default is 15): a batch not "
        "acked within it is sent again, and ingest handles it again (a replay)",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of the generator processes (real agents have CPUs of their own; a "
        "positive value lets the cloud side go first on this machine)",
    )
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--window", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.generators <= 0:
        args.generators = -(-args.agents // 60)
    settings = [run_setting(args, int(n)) for n in args.ingest.split(",")]
    for s in settings:
        print(
            f"{s['ingest_processes']} ingest: {s['events_per_s']:,} events/s stored, "
            f"lag p50 {s['lag_p50_s']} s p99 {s['lag_p99_s']} s, {s['acks_per_s']} acks/s, "
            f"busy {s['busy']}, bottleneck {s['bottleneck']}"
        )
    print(
        json.dumps(
            {
                "bench": "fleet",
                "agents": args.agents,
                "machines_per_agent": args.machines,
                "flush_interval_s": args.flush_interval,
                "poll_interval_s": args.poll_interval,
                "generator_nice": args.nice,
                "ack_timeout_s": args.ack_timeout,
                "window_s": args.window,
                "settings": settings,
                "target_lag_p99_s": 2.0,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
