"""The agent as a service, with a real process: sd_notify over a real unix datagram socket,
the local /healthz and /metrics, `edge-agent status`, SIGHUP reload (bad file rejected, good
file applied) and the graceful stop within the unit's stop timeout."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from agent.engine_store import EngineStore
from agent.service import SdNotifier, pipeline_problem
from agent.status import parse_metrics
from buffer.outbox import Outbox
from cloud_api.ingest.worker import IngestWorker
from connectors.modbus.simulator import Press, PressLine
from sync.keys import CloudKeyring
from tests.conftest import MQTT_HOST, MQTT_PORT, enroll, free_port, make_agent_keys
from tests.ops.test_systemd_units import stop_timeout_s, unit

EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")

CONFIG = """
agent:
  id: edge-ops
  site: plant-ops
  state_dir: {state}
  bucket_seconds: 5
connections:
  - id: plc
    type: modbus
    host: 127.0.0.1
    port: {plc_port}
    poll_interval: 200ms
    timeout: 1s
mqtt:
  host: {mqtt_host}
  port: {mqtt_port}
  topic_prefix: "{prefix}"
uplink:
  flush_interval: 500ms
  ack_timeout: 5s
health:
  port: {health_port}
shifts:
  - name: all-day
    start: "00:00"
    end: "00:00"
equipment:
{equipment}
"""

PRESS = """  - id: {id}
    line: line-1
    connection: plc
    unit: {unit}
    ideal_cycle_time: 250ms
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running, 2: fault, 3: setup}}}}
      total_count: {{address: "holding:1", type: uint32}}
      scrap_count: {{address: "holding:3", type: uint32}}
"""


def write_config(path: Path, presses: list[str], **values: object) -> None:
    equipment = "".join(PRESS.format(id=p, unit=i + 1) for i, p in enumerate(presses))
    text = CONFIG.format(equipment=equipment, **values)
    # Operators (and editors) replace the file; the agent must never read a half-written one.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# -- sd_notify, without a process -------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    yield sock, path
    sock.close()


def receive(sock: socket.socket, limit_s: float = 30.0) -> list[str]:
    sock.settimeout(limit_s)
    return sock.recv(4096).decode().split("\n")


class NotifyListener:
    """Reads every datagram as systemd does, so the agent's sends never find a full queue."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.messages: queue.Queue[list[str]] = queue.Queue()
        sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.put(data.decode().split("\n"))

    def until(self, wanted: str, limit_s: float = 60.0) -> list[list[str]]:
        """Every message up to and including the first one that holds `wanted`."""
        seen: list[list[str]] = []
        deadline = time.monotonic() + limit_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {wanted} from the agent; got {seen[-5:]}")
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            seen.append(message)
            if wanted in message:
                return seen

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def listener(notify_socket: tuple[socket.socket, str]) -> Iterator[tuple[NotifyListener, str]]:
    sock, path = notify_socket
    listening = NotifyListener(sock)
    yield listening, path
    listening.close()


def test_sd_notify_sends_datagrams(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = SdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert notifier.watchdog_interval == 2.0
    assert notifier.ready("running 1 equipment")
    assert receive(sock) == ["READY=1", "STATUS=running 1 equipment"]
    assert notifier.watchdog()
    assert receive(sock) == ["WATCHDOG=1"]
    assert notifier.reloading()
    lines = receive(sock)
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert notifier.stopping()
    assert receive(sock)[0] == "STOPPING=1"
    notifier.close()


def test_sd_notify_abstract_socket_and_absent_socket() -> None:
    name = f"edge-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    notifier = SdNotifier({"NOTIFY_SOCKET": "@" + name})
    try:
        assert notifier.watchdog()
        assert receive(sock) == ["WATCHDOG=1"]
    finally:
        notifier.close()
        sock.close()
    # Outside systemd nothing is sent and nothing fails.
    quiet = SdNotifier({})
    assert not quiet.enabled and not quiet.ready("x") and quiet.watchdog_interval is None
    # A watchdog meant for another process of the unit is not ours to ping.
    other = SdNotifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None


async def test_pipeline_problem_names_the_dead_stage_and_the_stall() -> None:
    class Pipeline:
        def __init__(self) -> None:
            self.tasks: list[asyncio.Task[None]] = []
            self.last_flush: float | None = None

    async def forever() -> None:
        await asyncio.Event().wait()

    async def ends() -> None:
        return None

    p = Pipeline()
    assert pipeline_problem(p, 100.0, 10.0) == "pipeline not started"
    alive = asyncio.create_task(forever(), name="engine")
    p.tasks = [alive]
    assert pipeline_problem(p, 100.0, 10.0) == "no flush yet"
    p.last_flush = 95.0
    assert pipeline_problem(p, 100.0, 10.0) is None
    assert pipeline_problem(p, 120.0, 10.0) == "no flush for 25 s"
    dead = asyncio.create_task(ends(), name="flush")
    await dead
    p.tasks.append(dead)
    assert pipeline_problem(p, 100.0, 10.0) == "pipeline stage 'flush' stopped"
    alive.cancel()


# -- the real process ----------------------------------------------------------------------


async def wait_for(
    predicate: Callable[[], bool],
    limit_s: float,
    what: str,
    agent: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Polls `predicate` until it holds. A limit of liveness, not of speed: a loaded machine
    gets generous time. Fails at once when the agent process has exited, and either failure
    carries the agent's log, so a rare failure in CI can be read from its output."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return
        if agent is not None and agent.poll() is not None:
            raise AssertionError(
                f"the agent exited ({agent.returncode}) while waiting for {what}{_tail(log)}"
            )
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}{_tail(log)}")


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    return "\n--- agent log (last lines) ---\n" + "\n".join(log.read_text().splitlines()[-40:])


def scrape(port: int) -> dict[str, object]:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    snap = parse_metrics(text)
    return {"values": snap.values, "series": snap.series, "text": text}


def series(port: int, name: str) -> list[tuple[dict[str, str], float]]:
    got = scrape(port)
    return list(got.get("series", {}).get(name, []))  # type: ignore[attr-defined]


def value(port: int, name: str) -> float | None:
    got = scrape(port)
    return got.get("values", {}).get(name)  # type: ignore[attr-defined, no-any-return]


def current_states(port: int) -> dict[str, str]:
    return {
        lab["equipment"]: lab["state"]
        for lab, v in series(port, "edge_agent_equipment_state")
        if v == 1
    }


def unit_environment() -> dict[str, str]:
    """The unit's `Environment=` settings (PYTHONOPTIMIZE=2 among them): the agent runs here
    as systemd runs it, docstrings and assert statements left out."""
    pairs = (
        p
        for line in unit("edge-agent.service").get("Service.Environment", [])
        for p in line.split()
    )
    return dict(pair.partition("=")[::2] for pair in pairs)


def start_agent(config: Path, log: Path, notify: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, **unit_environment(), "NOTIFY_SOCKET": notify}
    env["WATCHDOG_USEC"] = "1000000"  # a ping every 0.5 s
    env.pop("WATCHDOG_PID", None)
    with log.open("ab") as out:
        return subprocess.Popen(
            [EDGE_AGENT, "run", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT, env=env
        )


REQUIRED_METRICS = [
    "edge_agent_connection_up",
    "edge_agent_connection_read_latency_seconds",
    "edge_agent_samples_per_second",
    "edge_agent_samples_total",
    "edge_agent_equipment_state",
    "edge_agent_shift_oee_ratio",
    "edge_agent_outbox_batches",
    "edge_agent_outbox_bytes",
    "edge_agent_outbox_oldest_age_seconds",
    "edge_agent_acks_total",
    "edge_agent_resends_total",
    "edge_agent_acks_rejected_total",
    "edge_agent_samples_rejected_total",
]


async def test_agent_service_lifecycle(
    tmp_path: Path,
    pg_url: str,
    cloud_keys: CloudKeyring,
    topic_prefix: str,
    ingest: IngestWorker,
    listener: tuple[NotifyListener, str],
) -> None:
    notify, notify_path = listener
    state = tmp_path / "agent"
    enroll(pg_url, "edge-ops", "plant-ops", make_agent_keys(state / "keys", cloud_keys))
    presses = [Press(seed=3, time_scale=0.2, cycle_time=0.25), Press(seed=4, cycle_time=0.25)]
    for press in presses:
        press.frozen = True
        press.set_state("idle")
    plc_port, health_port = free_port(), free_port()
    line = PressLine(presses, port=plc_port)
    await line.start()
    values = {
        "state": state,
        "plc_port": plc_port,
        "mqtt_host": MQTT_HOST,
        "mqtt_port": MQTT_PORT,
        "prefix": topic_prefix,
        "health_port": health_port,
    }
    config = tmp_path / "agent.yaml"
    write_config(config, ["press-1"], **values)
    log = tmp_path / "agent.log"
    agent = start_agent(config, log, notify_path)
    try:
        # READY only once the pipeline runs, then watchdog pings.
        first = await asyncio.to_thread(notify.until, "READY=1")
        assert not any("WATCHDOG=1" in m for m in first), "watchdog pinged before READY"
        await asyncio.to_thread(notify.until, "WATCHDOG=1")

        health = await asyncio.to_thread(
            httpx.get, f"http://127.0.0.1:{health_port}/healthz", timeout=5
        )
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        missing = await asyncio.to_thread(
            httpx.get, f"http://127.0.0.1:{health_port}/nope", timeout=5
        )
        assert missing.status_code == 404

        # SIGUSR1 logs where each task waits (for a stop or stage that hangs), and nothing else.
        agent.send_signal(signal.SIGUSR1)
        await wait_for(
            lambda: '"name": "pipeline"' in log.read_text(), 60, "the task dump", agent, log
        )
        dump = [json.loads(line) for line in log.read_text().splitlines() if '"task"' in line]
        pipeline = next(d for d in dump if d.get("event") == "task" and d["name"] == "pipeline")
        assert pipeline["waits_at"][0].endswith(" run")  # AgentRuntime.run, where it waits
        assert "agent/runtime.py" in pipeline["waits_at"][0]
        assert agent.poll() is None

        press = presses[0]
        press.frozen = False
        await wait_for(
            lambda: (value(health_port, "edge_agent_acks_total") or 0) >= 1, 60, "acks", agent, log
        )
        await wait_for(
            lambda: current_states(health_port).get("press-1") not in (None, "unknown"),
            60,
            "press-1's state in /metrics",
            agent,
            log,
        )
        await wait_for(
            lambda: any(
                lab["equipment"] == "press-1" and lab["ratio"] == "availability"
                for lab, _ in series(health_port, "edge_agent_shift_oee_ratio")
            ),
            60,
            "the running shift's OEE once a bucket closed",
            agent,
            log,
        )
        text = str(scrape(health_port)["text"])
        for name in REQUIRED_METRICS:
            assert f"\n{name}" in text, f"{name} missing from /metrics"
        assert series(health_port, "edge_agent_connection_up") == [({"connection": "plc"}, 1.0)]
        latency = series(health_port, "edge_agent_connection_read_latency_seconds")
        assert latency and 0 < latency[0][1] < 5

        # The same numbers as a table.
        out = await asyncio.to_thread(
            subprocess.run,
            [EDGE_AGENT, "status", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert "press-1" in out.stdout and "| plc" in out.stdout and "alive" in out.stdout
        assert "edge-ops at site plant-ops" in out.stdout

        # SIGHUP with a broken file: rejected, the running configuration stays.
        good_text = config.read_text(encoding="utf-8")
        broken = good_text.replace("ideal_cycle_time: 250ms", "ideal_cycle_tme: 250ms")
        tmp = config.with_suffix(".tmp")
        tmp.write_text(broken, encoding="utf-8")
        tmp.replace(config)
        samples_before = value(health_port, "edge_agent_samples_total") or 0
        agent.send_signal(signal.SIGHUP)
        await wait_for(
            lambda: any(
                lab["result"] == "rejected" and v == 1
                for lab, v in series(health_port, "edge_agent_config_reloads_total")
            ),
            60,
            "the rejected reload in /metrics",
            agent,
            log,
        )
        assert agent.poll() is None, log.read_text()
        assert value(health_port, "edge_agent_config_generation") == 1
        await wait_for(
            lambda: (value(health_port, "edge_agent_samples_total") or 0) > samples_before + 5,
            60,
            "samples still flowing after the rejected reload",
            agent,
            log,
        )
        assert "ideal_cycle_tme" in log.read_text(), "the log names the problem"
        assert "configuration reload rejected" in log.read_text()

        # SIGHUP with a good file that adds press-2: applied, READY again.
        write_config(config, ["press-1", "press-2"], **values)
        agent.send_signal(signal.SIGHUP)
        reload_msgs = await asyncio.to_thread(notify.until, "RELOADING=1")
        assert reload_msgs
        await asyncio.to_thread(notify.until, "READY=1")
        assert value(health_port, "edge_agent_config_generation") == 2
        await wait_for(
            lambda: current_states(health_port).get("press-2") == "idle",
            60,
            "press-2 read after the reload",
            agent,
            log,
        )

        # Graceful stop within the unit's TimeoutStopSec (systemd would SIGKILL after it).
        agent.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(agent.wait, stop_timeout_s())
        assert code == 0, log.read_text()[-3000:]
        await asyncio.to_thread(notify.until, "STOPPING=1")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        await line.stop()
    text = log.read_text()
    assert "stopped" in text
    # The checkpoint committed at stop belongs to both presses of the reloaded configuration.
    outbox = Outbox(state / "outbox.db")
    saved, _ = EngineStore(outbox, heartbeat_s=10, snapshot_s=300).load()
    outbox.close()
    assert set(saved) == {"press-1", "press-2"}


async def test_sigterm_with_broker_down_stops_within_timeout(
    tmp_path: Path, cloud_keys: CloudKeyring, listener: tuple[NotifyListener, str]
) -> None:
    """The worst case for a stop: nothing can be shipped. The agent still commits what it has
    and exits within the unit's stop timeout; the batches stay in the outbox."""
    notify, notify_path = listener
    state = tmp_path / "agent"
    make_agent_keys(state / "keys", cloud_keys)
    press = Press(seed=5, time_scale=0.2, cycle_time=0.25)
    plc_port, health_port = free_port(), free_port()
    line = PressLine([press], port=plc_port)
    await line.start()
    config = tmp_path / "agent.yaml"
    write_config(
        config,
        ["press-1"],
        state=state,
        plc_port=plc_port,
        mqtt_host="127.0.0.1",
        mqtt_port=free_port(),  # nothing listens there
        prefix="",
        health_port=health_port,
    )
    log = tmp_path / "agent.log"
    agent = start_agent(config, log, notify_path)
    try:
        await asyncio.to_thread(notify.until, "READY=1")
        await wait_for(
            lambda: (value(health_port, "edge_agent_outbox_batches") or 0) >= 2,
            60,
            "batches waiting in the outbox",
            agent,
            log,
        )
        assert value(health_port, "edge_agent_broker_connected") == 0
        agent.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(agent.wait, stop_timeout_s())
        assert code == 0, log.read_text()[-3000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        await line.stop()
    with sqlite3.connect(f"file:{state / 'outbox.db'}?mode=ro", uri=True) as conn:
        kept = int(conn.execute("SELECT count(*) FROM batches").fetchone()[0])
    assert kept >= 2, "committed batches stay in the outbox for the next start"
    assert "batches stay in the outbox until the next start" in log.read_text()
    # A stop cancels the stages on purpose: no alarm about a dead pipeline in the journal.
    assert "pipeline not alive" not in log.read_text()
