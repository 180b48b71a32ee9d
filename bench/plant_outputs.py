"""Benchmark: what the plant-floor outputs cost the agent, for 100 machines at 1 Hz.

Two child processes run the same engine for the same time: 100 machines, each fed a
state, a part counter and a reason every second (the 1 Hz poll), buckets of one second, a
tick every second, from the engine's start on (also while the outputs start, as in the
agent). The first runs the engine alone; the second also runs both outputs at a
1 s interval: the Sparkplug B edge node publishing every machine's metrics (all of them)
to a Mosquitto the bench starts on a free port (a host application subscribed to the
group decodes every payload, in the bench's parent process, not in the agent), and the OPC
UA server (Basic256Sha256 SignAndEncrypt endpoint, certificate made for the run by the
parent, as `edge-agent keys` makes it before the agent runs) updating
its 100 x 32 variables. Each child reports its CPU time and its resident memory at the end;
the difference is the outputs' share.

Then each output alone, the same way. Every child runs as the agent runs on an edge box: with
the `Environment=` settings of the shipped unit, systemd/edge-agent.service (PYTHONOPTIMIZE=2
among them: no docstrings, no asserts), from byte-compiled files made for plain and -OO runs
as deploy/install-edge.sh makes them (the interpreter's library folder and the project's
packages; files already up to date are skipped); `--no-unit-env` runs the children with the
bench's own environment instead.

Run: `python -m bench.plant_outputs [--machines 100] [--seconds 30] [--no-unit-env]`. The last
line of the output is one JSON object (target: extra CPU under 10 % of one core, under 20 MB
more).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CONFIG_HEAD = """
agent: {{id: edge-bench, site: plant-bench, timezone: UTC, bucket_seconds: 1}}
shifts: [{{name: all-day, start: "00:00", end: "00:00"}}]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(machines: int, broker_port: int | None, opcua_port: int | None) -> str:
    text = CONFIG_HEAD.format()
    if broker_port is not None:
        text += f"plant_mqtt:\n  port: {broker_port}\n  publish_interval: 1s\n  publish:\n"
        text += "".join(f"    press-{i}: all\n" for i in range(machines))
    if opcua_port is not None:
        text += (
            "opcua_server:\n"
            f"  endpoint: opc.tcp://127.0.0.1:{opcua_port}\n"
            "  security: [Basic256Sha256_SignAndEncrypt]\n"
            "  users: [{username: hmi, password: bench-password}]\n"
            "  update_interval: 1s\n"
        )
    text += "equipment:\n"
    for i in range(machines):
        text += (
            f"  - id: press-{i}\n    line: line-{i // 10}\n    ideal_cycle_time: 1s\n"
            "    signals:\n"
            "      state: {map: {0: idle, 1: running, 2: fault}}\n"
            "      total_count: {}\n"
            "      reason: {map: {1: jam, 2: no material}}\n"
        )
    return text


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _child(args: argparse.Namespace) -> dict[str, Any]:
    # What the agent imports whatever its configuration (the service `edge-agent run`
    # starts: uplink, keys, outbox, connectors' common parts), in both children, so that the
    # difference is what the outputs add to a running agent, their libraries included.
    import agent.service  # noqa: F401
    from agent.config import parse_config
    from agent.floor.outputs import PlantFloor
    from common.memory import release_free_memory
    from connectors.sample import Sample
    from oee.engine import PlantEngine

    outputs = args.child != "baseline"
    keys = Path(args.keys)
    config = parse_config(
        _config(
            args.machines,
            args.broker_port if args.child in ("outputs", "sparkplug") else None,
            args.opcua_port if args.child in ("outputs", "opcua") else None,
        ),
        replay=True,
    )
    engine = PlantEngine(
        config.oee_specs(),
        config.calendar(),
        agent_id="edge-bench",
        site_id="plant-bench",
        bucket_seconds=1,
    )
    engine.start(datetime.now(UTC))
    floor: PlantFloor | None = None
    counters = [0] * args.machines

    def feed(second: int) -> None:
        """One second of the 1 Hz poll for every machine, and the engine's tick."""
        now = datetime.now(UTC)
        events = []
        for i in range(args.machines):
            counters[i] += 1
            state = 2 if (second + i) % 17 == 0 else 1
            events += engine.feed(Sample(f"press-{i}", "state", state, now))
            events += engine.feed(Sample(f"press-{i}", "total_count", counters[i], now))
            events += engine.feed(Sample(f"press-{i}", "reason", 1 + (second + i) % 2, now))
        events += engine.tick(now)
        if floor is not None:
            floor.observe(events)

    async def drive() -> None:
        """The machines at 1 Hz from the engine's start on, as in the agent, also while the
        outputs start (an engine left without ticks would close all those buckets at once)."""
        began = time.monotonic()
        second = 0
        while True:
            feed(second)
            second += 1
            await asyncio.sleep(max(0.0, began + second - time.monotonic()))

    driver = asyncio.create_task(drive())
    if outputs:
        floor = PlantFloor(
            engine=engine,
            agent="edge-bench",
            site="plant-bench",
            lines={eq.id: eq.line for eq in config.equipment},
            connections={eq.id: None for eq in config.equipment},
            connection_ids=[],
            links=dict,
            outbox_depth=lambda: 0,
            keys_dir=keys,
            state_dir=keys.parent,
            plant_mqtt=config.plant_mqtt,
            opcua_server=config.opcua_server,
        )
        floor.start()
    # The agent's service gives the C heap's free pages back once its pipeline has started
    # (common/memory.py); so do both children, at the same point.
    release_free_memory()
    if floor is not None and floor.opcua is not None:
        await asyncio.wait_for(floor.opcua.ready.wait(), 60)
    await asyncio.sleep(2)  # warm-up: births, address space
    rss_start = _rss_kib()
    cpu_start = time.process_time()
    wall_start = time.monotonic()
    await asyncio.sleep(args.seconds)
    driver.cancel()
    cpu = time.process_time() - cpu_start
    wall = time.monotonic() - wall_start
    report: dict[str, Any] = {
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "rss_kib": _rss_kib(),
        "rss_start_kib": rss_start,
        "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    if floor is not None:
        if floor.publisher is not None:
            stats = floor.publisher.stats
            report.update(published=stats.published, dropped=stats.dropped, births=stats.births)
        await floor.stop()
    return report


class _Host:
    """A host application in the parent: counts and decodes what the edge node publishes."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from agent.floor import sparkplug_b_pb2 as pb

        self.messages = 0
        self.metrics = 0
        self.lock = threading.Lock()

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            payload = pb.Payload()
            payload.ParseFromString(message.payload)
            with self.lock:
                self.messages += 1
                self.metrics += len(payload.metrics)

        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *_: c.subscribe("spBv1.0/plant-bench/#")
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _byte_compile() -> None:
    """.pyc files for plain and -OO runs, as deploy/install-edge.sh makes them."""
    from bench.agent import PACKAGES, ROOT

    folders = [str(p) for p in (Path(sys.prefix) / "lib").glob("python3*")]
    for flags in ([], ["-OO"]):
        subprocess.run(
            [sys.executable, *flags, "-m", "compileall", "-q", *folders, *PACKAGES],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )


def _run_child(
    kind: str, args: argparse.Namespace, broker: int, keys: str, env: dict[str, str]
) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.plant_outputs",
            "--child",
            kind,
            "--machines",
            str(args.machines),
            "--seconds",
            str(args.seconds),
            "--broker-port",
            str(broker),
            "--opcua-port",
            str(_free_port()),
            "--keys",
            keys,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--machines", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--child", choices=("baseline", "outputs", "sparkplug", "opcua"))
    parser.add_argument("--broker-port", type=int, default=0)
    parser.add_argument("--opcua-port", type=int, default=0)
    parser.add_argument("--keys", default="")
    parser.add_argument(
        "--no-unit-env",
        action="store_true",
        help="run the children without the agent unit's Environment= settings",
    )
    args = parser.parse_args(argv)
    if args.child:
        from common.logs import configure_logging

        configure_logging("error")
        print(json.dumps(asyncio.run(_child(args))))
        return 0
    from bench.agent import unit_environment

    env = {} if args.no_unit_env else unit_environment()
    if env.get("PYTHONOPTIMIZE"):
        _byte_compile()
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        conf = Path(tmp) / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            + ("user root\n" if os.geteuid() == 0 else ""),
            encoding="utf-8",
        )
        broker = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            # The server's certificate is made before, as `edge-agent keys` does, not by the
            # agent while it runs (an RSA key made in a child would count against its memory).
            from connectors.opcua.certs import create_certificate

            create_certificate(
                Path(tmp) / "opcua-server.der",
                Path(tmp) / "opcua-server.pem",
                application_uri="urn:factory-edge-gateway:edge-agent:server",
                hostnames=["127.0.0.1"],
            )
            time.sleep(0.5)
            host = _Host(port)
            baseline = _run_child("baseline", args, port, tmp, env)
            outputs = _run_child("outputs", args, port, tmp, env)
            sparkplug = _run_child("sparkplug", args, port, tmp, env)
            opcua = _run_child("opcua", args, port, tmp, env)
            host.close()
        finally:
            broker.terminate()
            broker.wait(10)
    extra_cpu = outputs["cpu_seconds"] / outputs["wall_seconds"] - (
        baseline["cpu_seconds"] / baseline["wall_seconds"]
    )

    def share(r: dict[str, Any]) -> float:
        return float(r["cpu_seconds"] / r["wall_seconds"])

    base_share = share(baseline)
    report = {
        "bench": "plant_outputs",
        "machines": args.machines,
        "seconds": args.seconds,
        "baseline_cpu_share": round(baseline["cpu_seconds"] / baseline["wall_seconds"], 4),
        "outputs_cpu_share": round(outputs["cpu_seconds"] / outputs["wall_seconds"], 4),
        "extra_cpu_share_of_one_core": round(extra_cpu, 4),
        "baseline_rss_mb": round(baseline["rss_kib"] / 1024, 1),
        "outputs_rss_mb": round(outputs["rss_kib"] / 1024, 1),
        "extra_rss_mb": round((outputs["rss_kib"] - baseline["rss_kib"]) / 1024, 1),
        "sparkplug_only_extra_cpu_share": round(share(sparkplug) - base_share, 4),
        "sparkplug_only_extra_rss_mb": round(
            (sparkplug["rss_kib"] - baseline["rss_kib"]) / 1024, 1
        ),
        "opcua_only_extra_cpu_share": round(share(opcua) - base_share, 4),
        "opcua_only_extra_rss_mb": round((opcua["rss_kib"] - baseline["rss_kib"]) / 1024, 1),
        "sparkplug_messages_published": outputs.get("published"),
        "sparkplug_dropped": outputs.get("dropped"),
        "host_messages_received_both_sparkplug_runs": host.messages,
        "host_metrics_received_both_sparkplug_runs": host.metrics,
        "unit_environment": env,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "target": {"extra_cpu_share_of_one_core": 0.10, "extra_rss_mb": 20},
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
