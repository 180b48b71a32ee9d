"""Benchmark: 5,000 nodes changing once per second on an asyncua server, read by the OPC UA
hub through one subscription: notifications per second received, none lost, and the agent
process's CPU share and RSS.

The server runs in a child process and writes every node once per second with the second's
number, so the agent can check that each node's values arrive without a gap (a gap is a lost
change). The agent side is `OpcUaHub.run` with the default subscription settings except a
1 s publishing interval; samples go to a counting emit. The CPU share is the agent
process's CPU time over the measured wall time (1.0 = one core busy).

Run: `python -m bench.opcua [--nodes 5000] [--seconds 30]`. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import resource
import socket
import time
from datetime import UTC, datetime
from typing import Any

from common.checks import validated
from connectors.opcua.config import OpcUaConnection
from connectors.opcua.hub import OpcUaHub, OpcUaTag
from connectors.sample import Sample

NAMESPACE = "urn:factory-edge-gateway:bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(port: int, nodes: int) -> None:
    import logging

    from asyncua import ua
    from asyncua.server.server import Server

    logging.getLogger("asyncua").setLevel(logging.ERROR)

    async def main() -> None:
        server = Server()
        await server.init()
        server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
        idx = await server.register_namespace(NAMESPACE)
        folder = await server.nodes.objects.add_folder(idx, "Bench")
        ids = []
        for i in range(nodes):
            var = await folder.add_variable(
                ua.NodeId(f"N{i}", idx), f"N{i}", ua.Variant(0, ua.VariantType.UInt32)
            )
            ids.append(var.nodeid)
        await server.start()
        loop = asyncio.get_running_loop()
        tick = 0
        next_at = loop.time()
        while True:
            tick += 1
            now = datetime.now(UTC)
            for nodeid in ids:
                await server.write_attribute_value(
                    nodeid,
                    ua.DataValue(ua.Variant(tick, ua.VariantType.UInt32), SourceTimestamp=now),
                )
            next_at += 1.0
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    asyncio.run(main())


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def measure(port: int, nodes: int, seconds: float) -> dict[str, Any]:
    cfg = validated(
        OpcUaConnection,
        id="bench",
        url=f"opc.tcp://127.0.0.1:{port}",
        publishing_interval=1.0,
        timeout=10.0,
    )
    tags = [OpcUaTag("bench", f"n{i}", f"nsu={NAMESPACE};s=N{i}") for i in range(nodes)]
    hub = OpcUaHub(cfg, tags)
    last: dict[str, int] = {}
    counting = False
    received = lost = bad = 0

    async def emit(sample: Sample) -> None:
        nonlocal received, lost, bad
        if sample.quality != "good" or not isinstance(sample.value, int):
            bad += counting  # before the server is up every node is reported bad once
            return
        prev = last.get(sample.signal)
        last[sample.signal] = sample.value
        if counting:
            received += 1
            if prev is not None and sample.value > prev + 1:
                lost += sample.value - prev - 1

    async with hub:
        task = asyncio.create_task(hub.run(emit))
        deadline = time.monotonic() + 120
        while len(last) < nodes:  # every node reported once: subscribed and warmed up
            if time.monotonic() > deadline or task.done():
                raise RuntimeError(f"only {len(last)} of {nodes} nodes reported")
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)
        counting = True
        cpu0, wall0 = time.process_time(), time.perf_counter()
        first = dict(last)
        await asyncio.sleep(seconds)
        counting = False
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        changes = sum(last[k] - first[k] for k in last)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return {
        "nodes": nodes,
        "seconds": round(wall, 2),
        "notifications": received,
        "notifications_per_s": round(received / wall, 1),
        "server_changes_seen": changes,
        "lost": lost,
        "bad": bad,
        "agent_cpu_share": round(cpu / wall, 3),
        "agent_rss_mb": round(_rss_mb(), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    port = _free_port()
    ctx = multiprocessing.get_context("spawn")
    server = ctx.Process(target=_serve, args=(port, args.nodes), daemon=True)
    server.start()
    try:
        for _ in range(600):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        result = asyncio.run(measure(port, args.nodes, args.seconds))
    finally:
        server.terminate()
        server.join(5)
    print(json.dumps({"bench": "opcua", **result}))


if __name__ == "__main__":
    main()
