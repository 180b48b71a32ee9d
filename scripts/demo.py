"""The demo: six simulated machines -> edge agent -> Mosquitto -> ingest -> PostgreSQL -> API.

Run through `make demo`. It first seeds two days of plant history: samples of a simulated
plant (agent/plant_history.py) go through the agent's own engine and sealed outbox with the
clock following them, and the real agent, broker and ingest then ship and store them. Then the
plant runs live (the simulated machines behind a real Modbus TCP server, here in this process)
and the demo prints the dashboard's address with a read-only token, serving until Ctrl-C.
With --once (or DEMO_ONCE=1, or CI=true) it runs live for --seconds, reads OEE back through the
HTTP API and ends. It uses the local PostgreSQL (database `edge_demo`, recreated) and the local
Mosquitto, and leaves its files under var/demo/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
from psycopg import sql

from agent.config import AgentConfig, load_config
from agent.plant_history import MachineCounters, plant_history
from agent.runtime import AgentRuntime
from common.logs import configure_logging
from connectors.modbus.simulator import Press, PressLine
from sync.keys import AgentKeys

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var" / "demo"
BIN = Path(sys.executable).parent
AGENT_CONFIG = ROOT / "configs" / "demo-agent.yaml"
# The history is committed in batches of this much plant time (the live agent flushes every
# second; for days of history that would make thousands of tiny batches).
HISTORY_FLUSH_S = 900.0
HISTORY_SHIP_LIMIT_S = 600.0


def free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


class Processes:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (VAR / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((name, proc))
        return proc

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                tail = (VAR / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                raise SystemExit(f"{name} exited with {proc.returncode}:\n" + "\n".join(tail))

    def wait_for_line(self, name: str, text: str, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while text not in (VAR / f"{name}.log").read_text(errors="replace"):
            self.check()
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not log {text!r} within {limit_s:.0f} s")
            time.sleep(0.2)

    def stop_one(self, name: str) -> None:
        for n, proc in self.procs:
            if n == name and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def stop_all(self) -> None:
        for name, _ in reversed(self.procs):
            self.stop_one(name)


def run(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr.strip()}")
    return result.stdout


def fmt_pct(value: float | None) -> str:
    return "   n/a" if value is None else f"{value * 100:6.2f} %"


def print_table(result: dict[str, object]) -> None:
    c = result["components"]
    assert isinstance(c, dict)
    rows = [
        ("Availability", fmt_pct(result["availability"])),  # type: ignore[arg-type]
        ("Performance", fmt_pct(result["performance"])),  # type: ignore[arg-type]
        ("Quality", fmt_pct(result["quality"])),  # type: ignore[arg-type]
        ("OEE", fmt_pct(result["oee"])),  # type: ignore[arg-type]
        ("Produced", f"{c['produced']:>8}"),
        ("Good", f"{c['good']:>8}"),
        ("Scrap", f"{c['scrap']:>8}"),
        ("Planned busy time", f"{c['planned_busy_s']:>7.1f} s"),
        ("Production time", f"{c['production_s']:>7.1f} s"),
        ("Downtime", f"{c['downtime_s']:>7.1f} s"),
        ("Setup", f"{c['setup_s']:>7.1f} s"),
        ("Unknown", f"{c['unknown_s']:>7.1f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * 12 + "+"
    print(line)
    print(f"| {'press-1 (from the cloud API)':<{width + 13}}|")
    print(line)
    for name, value in rows:
        print(f"| {name:<{width}} | {value:>10} |")
    print(line)
    print(f"window [{result['from']}, {result['to']})")


class LivePlant:
    """The simulated machines behind a real Modbus TCP server, on an event loop of its own.

    Each machine's counters go on from where the seeded history left them, so the agent sees
    the same registers it would after a restart (no counter reset)."""

    def __init__(self, config: AgentConfig, counters: dict[str, MachineCounters], port: int):
        self.presses = [
            Press(
                seed=unit,
                cycle_time=eq.ideal_cycle_time,
                start_count=counters[eq.id].total,
                start_scrap=counters[eq.id].scrap,
                width=eq.signals["total_count"].width or 32,
            )
            for unit, eq in enumerate(config.equipment, start=1)
        ]
        self.port = port
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        self.problem: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name="plant", daemon=True)

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by start(); the thread must not die silently
            self.problem = exc
            self.ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        line = PressLine(self.presses, port=self.port)
        await line.start()
        self.ready.set()
        await self.stopping.wait()
        await line.stop()

    def start(self) -> None:
        self.thread.start()
        self.ready.wait(timeout=30)
        if self.problem is not None or not self.ready.is_set():
            raise SystemExit(f"the simulated plant did not start: {self.problem}")

    def stop(self) -> None:
        if self.loop is not None and self.stopping is not None and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stopping.set)
            self.thread.join(timeout=10)


def seed_history(
    config: AgentConfig, start: datetime, end: datetime
) -> tuple[int, dict[str, MachineCounters]]:
    """The history through the agent's engine and sealed outbox; returns batches and counters."""
    samples, counters = plant_history(config, start, end)
    runtime = AgentRuntime(config, AgentKeys.load(config.keys_dir))
    batches = runtime.record(samples, end, flush_every_s=HISTORY_FLUSH_S)
    print(f"    {len(samples)} samples -> {batches} sealed batches in the agent's outbox")
    return batches, counters


def stored_batches(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM facts.batches").fetchone()
    return int(row[0]) if row else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--once",
        action="store_true",
        default=os.environ.get("DEMO_ONCE") == "1" or os.environ.get("CI") == "true",
        help="run live for --seconds, print OEE from the API and end (default with "
        "DEMO_ONCE=1 or CI=true)",
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="live time with --once")
    parser.add_argument("--history-days", type=float, default=2.0, help="days of seeded history")
    parser.add_argument("--database", default="edge_demo")
    parser.add_argument(
        "--pg", default=os.environ.get("DEMO_PG", "postgresql://postgres@127.0.0.1:5432")
    )
    opts = parser.parse_args()
    configure_logging("warning")

    if VAR.exists():
        shutil.rmtree(VAR)
    VAR.mkdir(parents=True)
    db_url = f"{opts.pg}/{opts.database}"
    step(f"fresh database {opts.database}")
    with psycopg.connect(f"{opts.pg}/postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(opts.database))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(opts.database)))

    modbus_port = free_port(5020)
    http_port = free_port(8765)
    env = dict(os.environ)
    env.update(
        {
            "CLOUD_DATABASE_URL": db_url,
            "CLOUD_KEYS_DIR": str(VAR / "cloud-keys"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    config_text = AGENT_CONFIG.read_text(encoding="utf-8").replace(
        "port: 5020", f"port: {modbus_port}"
    )
    agent_config = VAR / "agent.yaml"
    agent_config.write_text(config_text, encoding="utf-8")
    shown_config = agent_config.relative_to(ROOT)

    step("cloud: migrate, create keys; agent: create signing key; enroll the agent")
    run([str(BIN / "cloud-api"), "migrate"], env)
    (VAR / "cloud.pub").write_text(run([str(BIN / "cloud-api"), "keys", "init"], env))
    run([str(BIN / "edge-agent"), "keys", "init", "-c", str(agent_config)], env)
    run(
        [
            str(BIN / "edge-agent"),
            "keys",
            "install-cloud",
            "-c",
            str(agent_config),
            str(VAR / "cloud.pub"),
        ],
        env,
    )
    run(
        [
            str(BIN / "cloud-api"),
            "agents",
            "enroll",
            "--agent",
            "edge-demo-01",
            "--site",
            "demo-plant",
            "--public-key",
            str(VAR / "agent" / "keys" / "signing.pub"),
        ],
        env,
    )

    # A read-only token for the demo plant, issued (and audited) like an operator would.
    run([str(BIN / "cloud-api"), "tokens", "rotate-key"], env)
    token = run(
        [str(BIN / "cloud-api"), "tokens", "issue", "--role", "viewer", "--sites", "demo-plant",
         "--ttl", "7d", "--subject", "demo"],
        env,
    ).strip()  # fmt: skip

    config = load_config(agent_config)
    end = datetime.now(UTC).replace(microsecond=0)
    history_from = end - timedelta(days=opts.history_days)
    step(
        f"seeding {opts.history_days:g} days of history of {len(config.equipment)} machines "
        f"({config.agent.timezone}) through the agent's engine and outbox"
    )
    batches, counters = seed_history(config, history_from, end)

    procs = Processes()
    plant = LivePlant(config, counters, modbus_port)
    interrupted = False

    def on_sigint(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigint)
    started = datetime.now(UTC)
    try:
        step(
            f"simulated plant on modbus://127.0.0.1:{modbus_port} "
            f"(units 1..{len(config.equipment)})"
        )
        plant.start()
        step("cloud ingest and HTTP API")
        procs.start("ingest", [str(BIN / "cloud-api"), "ingest"], env)
        procs.start("api", [str(BIN / "cloud-api"), "serve", "--port", str(http_port)], env)
        # Batches published before ingest subscribes reach nobody and wait for the agent's
        # resend timeout, so the agent starts once ingest listens.
        procs.wait_for_line("ingest", "broker connected", limit_s=60.0)
        step(f"edge agent: edge-agent run -c {shown_config} (ships the history, then live data)")
        procs.start("agent", [str(BIN / "edge-agent"), "run", "-c", str(agent_config)], env)
        deadline = time.monotonic() + HISTORY_SHIP_LIMIT_S
        while (stored := stored_batches(db_url)) < batches:
            procs.check()
            if time.monotonic() > deadline:
                raise SystemExit(f"only {stored} of {batches} batches stored (see var/demo/*.log)")
            print(f"\r    history stored: {stored}/{batches} batches", end="", flush=True)
            time.sleep(1.0)
        print(f"\r    history stored: {batches}/{batches} batches")
        dashboard = f"http://127.0.0.1:{http_port}/#token={token}"
        print()
        print(f"  Dashboard:  {dashboard}")
        print(f"  Kiosk:      http://127.0.0.1:{http_port}/?kiosk=1#token={token}")
        print(f"  API docs:   http://127.0.0.1:{http_port}/docs")
        print(f"  Token (viewer, site demo-plant, 7 days): {token}")
        print()
        if opts.once:
            deadline = time.monotonic() + opts.seconds
            while time.monotonic() < deadline:
                procs.check()
                left = int(deadline - time.monotonic())
                print(f"\r    live, {left:3d} s left (logs in var/demo/*.log)", end="", flush=True)
                time.sleep(1.0)
            print()
        else:
            print("    live until Ctrl-C (logs in var/demo/*.log)", flush=True)
            while True:
                procs.check()
                time.sleep(1.0)
        step("stopping the agent (graceful, flushes the outbox), then the simulated plant")
        procs.stop_one("agent")
        plant.stop()
        step("reading OEE back through the HTTP API")
        window_from = history_from.replace(second=0)
        window_to = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        url = f"http://127.0.0.1:{http_port}/v1/equipment/press-1/oee"
        result: dict[str, object] = {}
        for _ in range(30):
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(
                    url,
                    params={"from": window_from.isoformat(), "to": window_to.isoformat()},
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=5,
                )
                if response.status_code == 200:
                    result = response.json()
                    break
            time.sleep(1.0)
        if not result:
            raise SystemExit("the API returned no OEE for press-1 (see var/demo/*.log)")
        print_table(result)
        print(f"(started live at {started:%H:%M:%S} UTC)")
    except KeyboardInterrupt:
        interrupted = not procs.procs or opts.once
        print("\nstopping: the agent first, then the plant, ingest and API", file=sys.stderr)
    finally:
        procs.stop_one("agent")
        plant.stop()
        procs.stop_all()
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
