"""Real moving parts for the fault-injection suite, and the checker.

- `Mosquitto`: a test-owned broker (own port, persistence in the test's folder) to SIGKILL.
- `PgServer`: a test-owned PostgreSQL cluster (initdb as the `postgres` OS user in a temporary
  folder, own port) to stop and start; the machine's shared server is never touched.
- `TcpProxy`: sits between the agent and the broker and cuts, stalls or truncates connections.
- `Agent`: the `edge-agent run` process with a per-test configuration.
- `Checker`: records every batch the outbox COMMITS (an SQLite trigger installed in the outbox
  file copies each inserted batch into a side table inside the same transaction, so exactly
  the committed ones are recorded, before any ack can delete them), opens them with the test's
  cloud keys, and compares their event ids with PostgreSQL: lost and duplicated must be 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from buffer.outbox import Outbox
from oee.events import EVENT_ADAPTER, AgentEvent, load_events
from sync.envelope import open_envelope
from sync.keys import CloudKeyring, load_ed25519_publics
from tests.conftest import free_port

BIN = Path(sys.executable).parent
EDGE_AGENT = str(BIN / "edge-agent")
CLOUD_API = str(BIN / "cloud-api")
PG_BIN = Path("/usr/lib/postgresql/15/bin")


async def wait_for(
    predicate: Callable[[], bool], limit_s: float, what: str, *, every: float = 0.2
) -> None:
    """Poll a (blocking) predicate in a thread until it holds; fail after a generous limit."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {limit_s:.0f}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- Mosquitto --------------------------------------------------------------------------------


class Mosquitto:
    """A broker owned by one test: `start()`, `kill()` (SIGKILL), `start()` again."""

    def __init__(self, folder: Path, *, extra: str = "", persistence: bool = True) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = folder / "mosquitto.log"
        self.conf = folder / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            # Started as root, mosquitto would switch to its own user, which cannot write the
            # test's private folder (log and persistence file).
            *(["user root"] if os.geteuid() == 0 else []),
            "allow_anonymous true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {folder}/",
            "autosave_interval 1",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            extra,
        ]
        self.conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: {self.log_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


# -- PostgreSQL -------------------------------------------------------------------------------


class PgServer:
    """A PostgreSQL cluster owned by one test, on its own port, stoppable at will."""

    def __init__(self) -> None:
        # Outside pytest's tmp_path: the `postgres` user must be able to reach the folder.
        self.folder = Path(tempfile.mkdtemp(prefix="faults-pg-"))
        os.chmod(self.folder, 0o755)
        self.data = self.folder / "data"
        self.port = free_port()
        shutil.chown(self.folder, "postgres", "postgres")
        self._as_postgres(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, argv: list[str]) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *argv],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.folder,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        log = str(self.folder / "pg.log")
        ctl = str(PG_BIN / "pg_ctl")
        self._as_postgres([ctl, "-D", str(self.data), "-o", options, "-w", "-l", log, "start"])

    def stop(self, mode: Literal["fast", "immediate"] = "immediate") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._as_postgres(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]
            )

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


# -- TCP proxy ---------------------------------------------------------------------------------

ProxyMode = Literal["pass", "cut", "stall", "stall_up", "truncate"]


@dataclass
class TcpProxy:
    """Client <-> broker through the test: `pass`, `cut` (close and refuse), `stall` (hold
    every byte), `stall_up` (hold only client -> broker bytes), `truncate` (let part of the
    next chunk through, then close)."""

    target_port: int
    port: int = field(default_factory=free_port)
    mode: ProxyMode = "pass"
    truncations: int = 0
    _server: asyncio.Server | None = None
    _links: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        self.cut_all()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def set(self, mode: ProxyMode) -> None:
        self.mode = mode
        if mode == "cut":
            self.cut_all()

    def cut_all(self) -> None:
        for w in list(self._links):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._links.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._links |= {writer, up_writer}
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.gather(
            self._pipe(reader, up_writer, writer, upstream=True),
            self._pipe(up_reader, writer, up_writer, upstream=False),
        )

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        other: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                while self.mode == "stall" or (self.mode == "stall_up" and upstream):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                if self.mode == "cut":
                    break
                if self.mode == "truncate" and len(data) > 1:
                    dst.write(data[: len(data) // 2])
                    await dst.drain()
                    self.truncations += 1
                    break
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (dst, other):
                with contextlib.suppress(Exception):
                    w.transport.abort()
                self._links.discard(w)


# -- the agent process ------------------------------------------------------------------------

AGENT_CONFIG = """
agent:
  id: {agent_id}
  site: {site}
  timezone: UTC
  state_dir: {state}
  bucket_seconds: 2
connections:
  - id: plc
    type: modbus
    host: 127.0.0.1
    port: {plc_port}
    poll_interval: 100ms
    timeout: 1s
mqtt:
{mqtt_address}
  keepalive: 5
  topic_prefix: "{prefix}"
uplink:
  flush_interval: 200ms
  ack_timeout: 2s
  max_in_flight: {max_in_flight}
  batch_max_events: {batch_max_events}
  drain_timeout: 3s
  suite: {suite}
outbox:
  max_bytes: {max_bytes}
  min_free_bytes: 0
  when_full: {when_full}
  heartbeat_interval: {heartbeat}
  snapshot_interval: {snapshot}
health:
  port: {health_port}
raw_samples:
  enabled: {raw_samples}
  deadband: 0
shifts:
  - name: all-day
    start: "00:00"
    end: "00:00"
equipment:
{equipment}
"""

EQUIPMENT = """  - id: press-{unit}
    connection: plc
    unit: {unit}
    ideal_cycle_time: 100ms
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running, 2: fault, 3: setup}}}}
      total_count: {{address: "holding:1", type: uint32}}
      scrap_count: {{address: "holding:3", type: uint32}}
      reason: {{address: "holding:5", map: {{1: no material, 2: tool change, 3: jam}}}}
"""


@dataclass
class Agent:
    """One `edge-agent run` process; kill it, start it again, read its outbox."""

    folder: Path
    plc_port: int
    mqtt_port: int
    prefix: str
    agent_id: str = "edge-faults"
    site: str = "plant-faults"
    units: int = 1
    max_in_flight: int = 16
    batch_max_events: int = 200
    max_bytes: int = 64 * 1024**2
    when_full: str = "block"
    raw_samples: bool = False
    suite: str = "x25519-hkdfsha256-aes256gcm"
    heartbeat: str = "10s"  # outbox.heartbeat_interval
    snapshot: str = "5min"  # outbox.snapshot_interval
    # Ports of more brokers: the agent gets `mqtt.brokers` (mqtt_port first) and fails over.
    failover_ports: tuple[int, ...] = ()
    # The agent's health and metrics endpoint, on a port of its own.
    health_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def state(self) -> Path:
        return self.folder / "state"

    @property
    def outbox_path(self) -> Path:
        return self.state / "outbox.db"

    @property
    def keys_dir(self) -> Path:
        return self.state / "keys"

    @property
    def config_path(self) -> Path:
        return self.folder / "agent.yaml"

    @property
    def log(self) -> Path:
        return self.folder / "agent.log"

    @property
    def client_id(self) -> str:
        """The MQTT client id of the agent's uplink, as brokers log it."""
        return f"edge-{self.site}-{self.agent_id}"

    def write_config(self) -> None:
        equipment = "".join(EQUIPMENT.format(unit=u) for u in range(1, self.units + 1))
        if self.failover_ports:
            ports = (self.mqtt_port, *self.failover_ports)
            mqtt_address = "  brokers:\n" + "".join(
                f"    - {{host: 127.0.0.1, port: {port}}}\n" for port in ports
            )
        else:
            mqtt_address = f"  host: 127.0.0.1\n  port: {self.mqtt_port}\n"
        self.config_path.write_text(
            AGENT_CONFIG.format(
                agent_id=self.agent_id,
                site=self.site,
                state=self.state,
                plc_port=self.plc_port,
                mqtt_address=mqtt_address.rstrip("\n"),
                prefix=self.prefix,
                max_in_flight=self.max_in_flight,
                batch_max_events=self.batch_max_events,
                max_bytes=self.max_bytes,
                when_full=self.when_full,
                raw_samples=str(self.raw_samples).lower(),
                suite=self.suite,
                heartbeat=self.heartbeat,
                snapshot=self.snapshot,
                health_port=self.health_port,
                equipment=equipment,
            ),
            encoding="utf-8",
        )

    def start(self) -> None:
        self.write_config()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [EDGE_AGENT, "run", "-c", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(15)

    def stop(self) -> int:
        """SIGTERM: graceful stop (commits what was sampled); returns the exit code.

        An agent that does not stop is asked (SIGUSR1) to log where each of its tasks waits,
        and the failure carries that part of its log."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            raise AssertionError(
                f"the agent did not stop within 60 s of SIGTERM:\n{self.log_tail(12000)}"
            ) from None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def depth(self) -> int:
        """Batches waiting in the outbox: the running agent's own figure (it holds the file
        exclusively, so nothing else can open it; -1 while it does not answer), the file's
        rows once it has stopped (-1 before the file exists)."""
        if self.running():
            value = self.metric("edge_agent_outbox_batches")
            return -1 if value is None else int(value)
        if not self.outbox_path.exists():
            return -1
        with contextlib.closing(
            sqlite3.connect(f"file:{self.outbox_path}?mode=ro", uri=True, timeout=10)
        ) as conn:
            return int(conn.execute("SELECT count(*) FROM batches").fetchone()[0])

    def outbox_report(self) -> dict[str, Any] | None:
        """The running agent's `GET /outbox` (what `buffer stats --json` prints); None while
        it does not answer."""
        url = f"http://127.0.0.1:{self.health_port}/outbox"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                data = json.loads(response.read().decode())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def metric(self, name: str) -> float | None:
        """A value of the running agent's /metrics; None while it does not answer."""
        url = f"http://127.0.0.1:{self.health_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        return None

    def drained(self) -> bool:
        """Every batch the outbox holds is acked. The running agent's metrics say so at once
        (its file keeps acked batches until their grouped delete, seconds later, or its
        close); a stopped agent's file, after that close, too."""
        return self.depth() == 0

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


# -- the checker ------------------------------------------------------------------------------

TAP_SQL = """
CREATE TABLE IF NOT EXISTS checker_tap (
    epoch TEXT NOT NULL, seq INTEGER NOT NULL, envelope BLOB NOT NULL, PRIMARY KEY (epoch, seq)
);
CREATE TRIGGER IF NOT EXISTS checker_tap AFTER INSERT ON batches BEGIN
    INSERT OR REPLACE INTO checker_tap
    VALUES ((SELECT value FROM meta WHERE key = 'epoch'), new.seq, new.envelope);
END;
"""


@dataclass
class Report:
    committed_batches: int
    committed_events: int
    stored_events: int
    lost: int
    duplicated: int
    declared_lost: int
    missing_batches: list[tuple[str, int]]
    lost_ids: list[str]

    def __str__(self) -> str:
        return (
            f"committed {self.committed_events} events in {self.committed_batches} batches, "
            f"stored {self.stored_events}, lost {self.lost}, duplicated {self.duplicated}, "
            f"declared lost {self.declared_lost}, missing batches {self.missing_batches[:10]}"
        )


class Checker:
    """Every event the outbox committed vs. PostgreSQL."""

    def __init__(self, agent: Agent, ring: CloudKeyring) -> None:
        self.agent = agent
        self.ring = ring
        self.taps: list[Path] = []

    def install(self, path: Path | None = None) -> None:
        """Create the outbox (if needed) and the tap; call before the agent writes to it."""
        path = path or self.agent.outbox_path
        if not path.exists():
            Outbox(path).close()
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
            conn.executescript(TAP_SQL)
        if path not in self.taps:
            self.taps.append(path)

    def _agent_keys(self) -> dict[str, Ed25519PublicKey]:
        keys = load_ed25519_publics(self.agent.keys_dir / "signing.pub")
        retired = self.agent.keys_dir / "signing-retired.pub"
        if retired.exists():
            keys |= load_ed25519_publics(retired)
        return keys

    def committed(self) -> dict[tuple[str, int], list[str]]:
        """(epoch, seq) -> event ids of every batch committed to a tapped outbox."""
        keys = self._agent_keys()
        out: dict[tuple[str, int], list[str]] = {}
        for path in self.taps:
            with contextlib.closing(
                sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            ) as conn:
                rows = conn.execute("SELECT epoch, seq, envelope FROM checker_tap").fetchall()
            for epoch, seq, raw in rows:
                opened = open_envelope(
                    bytes(raw),
                    verify_key_for=lambda _agent, kid: keys.get(kid),
                    decrypt_key_for=self.ring.decrypt_key_for,
                )
                try:
                    ids = [e.event_id for e in load_events(opened.plaintext)]
                except ValidationError:
                    # A poison batch (a test put it there): its events can never be stored,
                    # so they count as lost unless a loss record declares the batch.
                    ids = [f"unloadable {epoch}/{seq}/{i}" for i in range(opened.header.count)]
                out[(str(epoch), int(seq))] = ids
        return out

    def report(self, pg_url: str) -> Report:
        committed = self.committed()
        with psycopg.connect(pg_url) as conn:
            stored = Counter(
                str(r[0])
                for r in conn.execute(
                    "SELECT event_id FROM facts.events WHERE agent_id = %s", (self.agent.agent_id,)
                )
            )
            batches = {
                (str(r[0]), int(r[1]))
                for r in conn.execute(
                    "SELECT epoch, seq FROM facts.batches WHERE agent_id = %s",
                    (self.agent.agent_id,),
                )
            }
            loss_bodies = [
                r[0]
                for r in conn.execute(
                    "SELECT body FROM facts.events WHERE agent_id = %s AND kind = 'agent' "
                    "AND body->>'code' IN ('data_shed', 'batch_rejected')",
                    (self.agent.agent_id,),
                )
            ]
        declared: set[tuple[str, int]] = set()
        for body in loss_bodies:
            event = EVENT_ADAPTER.validate_python(body)
            assert isinstance(event, AgentEvent)
            declared |= {(str(event.data["epoch"]), int(s)) for s in event.data["seqs"]}
        lost_ids: list[str] = []
        declared_lost = 0
        missing: list[tuple[str, int]] = []
        for key, ids in sorted(committed.items()):
            gone = [i for i in ids if i not in stored]
            if key in declared and key not in batches:
                declared_lost += len(gone)
                continue
            if key not in batches:
                missing.append(key)
            lost_ids += gone
        events = sum(len(ids) for ids in committed.values())
        return Report(
            committed_batches=len(committed),
            committed_events=events,
            stored_events=sum(stored.values()),
            lost=len(lost_ids),
            duplicated=sum(n - 1 for n in stored.values() if n > 1),
            declared_lost=declared_lost,
            missing_batches=missing,
            lost_ids=lost_ids[:20],
        )


async def settle(agent: Agent, limit_s: float = 90) -> None:
    """Graceful stop, then wait until a fresh start of the agent has shipped everything."""
    await wait_for(agent.drained, limit_s, "the outbox to drain")
    assert await asyncio.to_thread(agent.stop) == 0, agent.log_tail()
    if agent.depth() != 0:
        # What the graceful stop committed but could not ship within drain_timeout.
        agent.start()
        await wait_for(agent.drained, limit_s, "the outbox to drain after restart")
        assert await asyncio.to_thread(agent.stop) == 0, agent.log_tail()


Step = Callable[[], Awaitable[None]]
