"""Benchmark: time from `cloud-api agents config push` to the agent's `applied` in PostgreSQL.

A pymodbus press line (two presses), an `edge-agent run` process with `config.source: cloud`,
a `cloud-api ingest` process, the machine's Mosquitto and PostgreSQL (a fresh database,
dropped afterwards). Each round pushes a new version (alternately with and without the second
press) with the `cloud-api` command and waits until the agent's `config_result` event for that
publication is stored. The time includes the settle period the agent watches its health
(`--settle`, seconds) before it reports `applied`: `overhead_s` is the rest (publish, verify,
validate, swap the pipeline, seal, ship, ingest).
Run: `python -m bench.config_push [--rounds 5] [--settle 5]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from bench.e2e import MQTT_HOST, MQTT_PORT, PG, wait_subscribed
from cloud_api.db import migrate
from connectors.modbus.simulator import Press, PressLine
from sync.keys import (
    SUITE_X25519,
    CloudKeyring,
    ed25519_key_id,
    ed25519_line,
    generate_agent_signing_key,
    generate_cloud_ack_key,
    generate_cloud_hpke_keys,
    install_cloud_public_keys,
)

BIN = Path(sys.executable).parent
AGENT, SITE = "edge-bench-cfg", "plant-bench-cfg"
PRESS = """  - id: press-{n}
    connection: plc
    unit: {n}
    ideal_cycle_time: 250ms
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running, 2: fault, 3: setup}}}}
      total_count: {{address: "holding:1", type: uint32}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_yaml(state: Path, port: int, prefix: str, settle: float, presses: int, tag: str) -> str:
    head = f"""# {tag}
agent: {{id: {AGENT}, site: {SITE}, state_dir: {state}, bucket_seconds: 5}}
config: {{source: cloud, settle: {settle}s}}
connections:
  - {{id: plc, type: modbus, host: 127.0.0.1, port: {port}, poll_interval: 200ms}}
mqtt: {{host: {MQTT_HOST}, port: {MQTT_PORT}, topic_prefix: "{prefix}"}}
health: {{port: {free_port()}}}
uplink: {{flush_interval: 500ms, ack_timeout: 5s}}
equipment:
"""
    return head + "".join(PRESS.format(n=n) for n in range(1, presses + 1))


def outcome(url: str, serial: int) -> str | None:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT body->'data'->>'result' FROM facts.events WHERE kind = 'agent' "
            "AND body->>'code' = 'config_result' AND (body->'data'->>'serial')::int = %s",
            (serial,),
        ).fetchone()
    return None if row is None else str(row[0])


def started_up(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM facts.events WHERE kind = 'state'").fetchone()
    return row is not None and int(row[0]) > 0


async def run(args: argparse.Namespace) -> dict[str, object]:
    db = f"bench_cfg_{secrets.token_hex(4)}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    url = f"{PG}/{db}"
    procs: list[subprocess.Popen[bytes]] = []
    line = PressLine([Press(seed=1), Press(seed=2)], port=free_port())
    try:
        migrate(url)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            keys_dir, state = folder / "cloud-keys", folder / "agent"
            generate_cloud_hpke_keys(keys_dir, [SUITE_X25519])
            generate_cloud_ack_key(keys_dir)
            ring = CloudKeyring.load(keys_dir)
            key = generate_agent_signing_key(state / "keys")
            install_cloud_public_keys(
                state / "keys",
                ring.current_hpke.public.to_line(),
                [ed25519_line(k) for k in ring.ack_verify_keys().values()],
            )
            with psycopg.connect(url) as conn, conn.transaction():
                conn.execute("INSERT INTO registry.sites(site_id) VALUES (%s)", (SITE,))
                conn.execute("INSERT INTO registry.agents VALUES (%s, %s)", (AGENT, SITE))
                conn.execute(
                    "INSERT INTO registry.agent_keys(agent_id, key_id, public_key) "
                    "VALUES (%s, %s, %s)",
                    (AGENT, ed25519_key_id(key.public_key()), ed25519_line(key.public_key())),
                )
            prefix = f"bench/{secrets.token_hex(4)}/"
            cloud_yaml = folder / "cloud.yaml"
            cloud_yaml.write_text(
                json.dumps(
                    {
                        "database": {"url": url},
                        "mqtt": {"host": MQTT_HOST, "port": MQTT_PORT, "topic_prefix": prefix},
                        "keys_dir": str(keys_dir),
                    }
                ),
                encoding="utf-8",
            )
            await line.start()
            ingest_log = folder / "ingest.log"
            with ingest_log.open("wb") as out:
                procs.append(
                    subprocess.Popen(  # noqa: ASYNC220 (starting is not blocking)
                        [str(BIN / "cloud-api"), "--config", str(cloud_yaml), "ingest"],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            wait_subscribed(procs[0], ingest_log)
            local = folder / "agent.yaml"
            local.write_text(
                agent_yaml(state, line.port, prefix, args.settle, 1, "local"), encoding="utf-8"
            )
            with (folder / "agent.log").open("wb") as out:
                procs.append(
                    subprocess.Popen(  # noqa: ASYNC220 (starting is not blocking)
                        [str(BIN / "edge-agent"), "run", "-c", str(local)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            # Measured from a running agent: its first events are stored.
            while not await asyncio.to_thread(started_up, url):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
            times: list[float] = []
            for n in range(1, args.rounds + 1):
                pushed = folder / f"v{n}.yaml"
                text = agent_yaml(state, line.port, prefix, args.settle, 1 + n % 2, f"v{n}")
                pushed.write_text(text, encoding="utf-8")
                started = time.monotonic()
                await asyncio.to_thread(
                    subprocess.run,
                    [str(BIN / "cloud-api"), "--config", str(cloud_yaml), "agents", "config",
                     "push", "--agent", AGENT, "--file", str(pushed)],
                    check=True,
                    capture_output=True,
                )  # fmt: skip
                deadline = started + args.settle + 120
                result = None
                while result is None and time.monotonic() < deadline:
                    result = await asyncio.to_thread(outcome, url, n)
                    await asyncio.sleep(0.05)
                if result != "applied":
                    raise RuntimeError(f"round {n}: {result}")
                times.append(time.monotonic() - started)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
        await line.stop()
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
            )
    median = statistics.median(times)
    return {
        "bench": "config_push",
        "rounds": len(times),
        "settle_s": args.settle,
        "push_to_applied_s": {
            "median": round(median, 2),
            "min": round(min(times), 2),
            "max": round(max(times), 2),
        },
        "overhead_s": round(median - args.settle, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=5.0, help="config.settle in seconds")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
