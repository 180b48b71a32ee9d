"""The simulated plant the agent benchmarks share: Modbus presses behind pymodbus servers (one
server per 100 presses, as a PLC per line), the agent's configuration for them, its keys,
the cloud that acknowledges (a fresh PostgreSQL database and `cloud-api ingest` on the
machine's Mosquitto), and the real `edge-agent run` process.

Each press (connectors/modbus/simulator.py) is one unit: state, 32-bit part total, 32-bit
scrap, reason; polled at 1 Hz; a part every 2-5 s while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

import httpx

PG = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
MQTT_HOST = os.environ.get("BENCH_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("BENCH_MQTT_PORT", "1883"))
PRESSES_PER_PLC = 100

CONFIG = """
agent:
  id: {agent}
  site: {site}
  timezone: UTC
  state_dir: {state}
  log_level: warning
connections:
{connections}
mqtt:
  host: 127.0.0.1
  port: {mqtt_port}
  topic_prefix: "{prefix}"
health:
  port: {health_port}
shifts:
  - name: all-day
    start: "00:00"
    end: "00:00"
equipment:
{equipment}"""

CONNECTION = """  - id: plc-{plc}
    type: modbus
    host: 127.0.0.1
    port: {port}
    poll_interval: 1s
    timeout: 2s
"""

EQUIPMENT = """  - id: press-{number:03d}
    connection: plc-{plc}
    unit: {unit}
    ideal_cycle_time: 2s
    micro_stop_threshold: 30s
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running, 2: fault, 3: setup}}}}
      total_count: {{address: "holding:1", type: uint32}}
      scrap_count: {{address: "holding:3", type: uint32}}
      reason: {{address: "holding:5", map: {{1: no material, 2: tool change, 3: jam}}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plc_count(machines: int) -> int:
    return (machines + PRESSES_PER_PLC - 1) // PRESSES_PER_PLC


def agent_yaml(
    *,
    agent: str,
    site: str,
    state: Path,
    plc_ports: list[int],
    machines: int,
    mqtt_port: int,
    prefix: str,
    health_port: int,
) -> str:
    """The agent's configuration: presses 1..machines, units 1..100 of PLC 0, 1..100 of PLC 1..."""
    connections = "".join(CONNECTION.format(plc=i, port=p) for i, p in enumerate(plc_ports))
    equipment = "".join(
        EQUIPMENT.format(number=n + 1, plc=n // PRESSES_PER_PLC, unit=n % PRESSES_PER_PLC + 1)
        for n in range(machines)
    )
    return CONFIG.format(
        agent=agent,
        site=site,
        state=state,
        connections=connections,
        mqtt_port=mqtt_port,
        prefix=prefix,
        health_port=health_port,
        equipment=equipment,
    )


def _serve_presses(ports: list[int], machines: int, idle: bool) -> None:
    """The PLCs (child process): a part every 2-5 s per running press, 32-bit counters."""
    from connectors.modbus.simulator import Press, PressLine

    async def main() -> None:
        rng = random.Random(7)
        presses = [
            Press(
                seed=i + 1,
                cycle_time=rng.uniform(2.0, 5.0),
                speed=1.0,
                start_count=rng.randrange(0, 1 << 31),
            )
            for i in range(machines)
        ]
        if idle:
            for press in presses:
                press.frozen = True
                press.set_state("idle", 1)
        for i, port in enumerate(ports):
            chunk = presses[i * PRESSES_PER_PLC : (i + 1) * PRESSES_PER_PLC]
            await PressLine(chunk, port=port).start(tick=0.2)
        await asyncio.Event().wait()

    asyncio.run(main())


def start_presses(machines: int, *, idle: bool = False) -> tuple[BaseProcess, list[int]]:
    """The PLCs in a child process (a PLC is another machine: its work is not the agent's);
    returns the process and the PLC ports once they listen."""
    ports = [free_port() for _ in range(plc_count(machines))]
    proc = multiprocessing.get_context("spawn").Process(
        target=_serve_presses, args=(ports, machines, idle), daemon=True
    )
    proc.start()
    deadline = time.monotonic() + 60
    for port in ports:
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or not proc.is_alive():
                raise RuntimeError(f"the simulated PLC on port {port} did not start")
            time.sleep(0.05)
    return proc, ports


def keyed_state(folder: Path) -> tuple[Path, Path, str]:
    """The cloud's key ring and the agent's keys (with the cloud's public keys installed):
    returns (cloud key folder, agent state folder, the agent's public key line)."""
    from sync.keys import (
        SUITE_X25519,
        CloudKeyring,
        ed25519_line,
        generate_agent_signing_key,
        generate_cloud_ack_key,
        generate_cloud_hpke_keys,
        install_cloud_public_keys,
    )

    ring_dir = folder / "cloud-keys"
    generate_cloud_hpke_keys(ring_dir, [SUITE_X25519])
    generate_cloud_ack_key(ring_dir)
    ring = CloudKeyring.load(ring_dir)
    state = folder / "state"
    keys_dir = state / "keys"
    key = generate_agent_signing_key(keys_dir)
    install_cloud_public_keys(
        keys_dir,
        [k.public.to_line() for k in ring.current_hpke_keys],
        [ed25519_line(k) for k in ring.ack_verify_keys().values()],
    )
    return ring_dir, state, ed25519_line(key.public_key())


def start_agent(
    config: Path, log: Path, bin_dir: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """The real `edge-agent run`: from `bin_dir`, else of the interpreter running the bench;
    `env` is added to the bench's environment."""
    folder = bin_dir if bin_dir is not None else Path(sys.executable).parent
    return subprocess.Popen(
        [str(folder / "edge-agent"), "run", "-c", str(config)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=None if env is None else {**os.environ, **env},
    )


def stop_process(proc: subprocess.Popen[bytes] | None, wait_s: float = 60) -> None:
    if proc is None:
        return
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(wait_s)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def metrics(port: int) -> dict[str, float]:
    """The agent's unlabelled /metrics values."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


class Cloud:
    """PostgreSQL database + `cloud-api ingest` on the machine's Mosquitto."""

    def __init__(
        self,
        folder: Path,
        ring_dir: Path,
        prefix: str,
        public_line: str,
        *,
        agent: str,
        site: str,
        db_prefix: str,
    ) -> None:
        import psycopg
        from psycopg import sql

        from cloud_api.db import migrate
        from sync.keys import ed25519_key_id, parse_ed25519_public

        self.db = f"{db_prefix}_{secrets.token_hex(4)}"
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.db)))
        self.url = f"{PG}/{self.db}"
        migrate(self.url)
        kid = ed25519_key_id(parse_ed25519_public(public_line))
        with psycopg.connect(self.url) as conn, conn.transaction():
            conn.execute("INSERT INTO registry.sites(site_id) VALUES (%s)", (site,))
            conn.execute("INSERT INTO registry.agents VALUES (%s, %s)", (agent, site))
            conn.execute(
                "INSERT INTO registry.agent_keys(agent_id, key_id, public_key) VALUES (%s, %s, %s)",
                (agent, kid, public_line),
            )
        env = {
            **os.environ,
            "CLOUD_DATABASE_URL": self.url,
            "CLOUD_MQTT_HOST": MQTT_HOST,
            "CLOUD_MQTT_PORT": str(MQTT_PORT),
            "CLOUD_TOPIC_PREFIX": prefix,
            "CLOUD_KEYS_DIR": str(ring_dir),
        }
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "cloud-api"), "ingest", "--log-level", "warning"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(folder / "ingest.log").open("wb"),
        )

    def stored_batches(self) -> int:
        import psycopg

        with psycopg.connect(self.url) as conn:
            row = conn.execute("SELECT count(*) FROM facts.batches").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        import psycopg
        from psycopg import sql

        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.db))
            )


@dataclass
class Plant:
    """One benchmark's plant: the PLCs running, the agent's keys and configuration written, and
    the cloud when it acknowledges (else nothing listens on the broker port)."""

    config: Path
    state: Path
    health_port: int
    plc: BaseProcess
    cloud: Cloud | None

    @classmethod
    def set_up(
        cls,
        folder: Path,
        *,
        agent: str,
        site: str,
        machines: int,
        acknowledging: bool,
        db_prefix: str,
        idle: bool = False,
    ) -> Plant:
        folder.mkdir(parents=True)
        ring_dir, state, public_line = keyed_state(folder)
        health_port = free_port()
        prefix = f"bench/{secrets.token_hex(4)}/"
        mqtt_port = MQTT_PORT if acknowledging else free_port()  # unreachable: nobody listens
        plc, plc_ports = start_presses(machines, idle=idle)
        config = folder / "agent.yaml"
        config.write_text(
            agent_yaml(
                agent=agent,
                site=site,
                state=state,
                plc_ports=plc_ports,
                machines=machines,
                mqtt_port=mqtt_port,
                prefix=prefix,
                health_port=health_port,
            ),
            encoding="utf-8",
        )
        cloud = None
        if acknowledging:
            try:
                cloud = Cloud(
                    folder,
                    ring_dir,
                    prefix,
                    public_line,
                    agent=agent,
                    site=site,
                    db_prefix=db_prefix,
                )
            except BaseException:
                plc.terminate()
                raise
        return cls(config, state, health_port, plc, cloud)

    def close(self) -> None:
        self.plc.terminate()
        self.plc.join(10)
        if self.cloud is not None:
            self.cloud.close()
