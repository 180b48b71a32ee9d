"""The demo: simulated press -> edge agent -> Mosquitto -> ingest -> PostgreSQL -> HTTP API.

Run through `make demo`. Every component is a real process started here and stopped at the
end (or on Ctrl-C). It uses the local PostgreSQL (database `edge_demo`, recreated) and the
local Mosquitto, and leaves its files under var/demo/.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var" / "demo"
BIN = Path(sys.executable).parent
AGENT_CONFIG = ROOT / "configs" / "demo-agent.yaml"


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long production runs")
    parser.add_argument("--database", default="edge_demo")
    parser.add_argument(
        "--pg", default=os.environ.get("DEMO_PG", "postgresql://postgres@127.0.0.1:5432")
    )
    opts = parser.parse_args()

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
    token = run(
        [str(BIN / "cloud-api"), "tokens", "issue", "--role", "viewer", "--sites", "demo-plant",
         "--ttl", "1h", "--subject", "demo"],
        env,
    ).strip()  # fmt: skip

    procs = Processes()
    interrupted = False

    def on_sigint(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigint)
    started = datetime.now(UTC)
    try:
        step(f"simulated press on modbus://127.0.0.1:{modbus_port}")
        procs.start(
            "simulator",
            [
                str(BIN / "edge-agent"),
                "simulate",
                "modbus",
                "--port",
                str(modbus_port),
                "--time-scale",
                "0.3",
            ],
            env,
        )
        step("cloud ingest and HTTP API")
        procs.start("ingest", [str(BIN / "cloud-api"), "ingest"], env)
        procs.start("api", [str(BIN / "cloud-api"), "serve", "--port", str(http_port)], env)
        time.sleep(1.0)
        step("edge agent: edge-agent run -c configs/demo-agent.yaml")
        procs.start("agent", [str(BIN / "edge-agent"), "run", "-c", str(agent_config)], env)
        deadline = time.monotonic() + opts.seconds
        while time.monotonic() < deadline:
            procs.check()
            left = int(deadline - time.monotonic())
            print(f"\r    running, {left:3d} s left (logs in var/demo/*.log)", end="", flush=True)
            time.sleep(1.0)
        print()
        step("stopping the simulated press and the agent (graceful, flushes the outbox)")
        procs.stop_one("simulator")
        time.sleep(2.0)
        procs.stop_one("agent")
        end = datetime.now(UTC)
        step("reading OEE back through the HTTP API")
        window_from = started.replace(second=0, microsecond=0)
        window_to = end.replace(second=0, microsecond=0) + timedelta(minutes=1)
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
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted, stopping everything", file=sys.stderr)
    finally:
        procs.stop_all()
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
