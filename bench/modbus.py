"""Benchmark: registers read per second from a pymodbus server for 1,000 tags, with request
coalescing and, in the same run, with one request per tag.

The server runs in a child process (a PLC is another machine; sharing the event loop would
charge its work to the agent). One unit holds 1,000 tags: 800 uint16 and 200 uint32 spread
over 1,300 registers with small gaps, as a real register map looks. The agent side is the
hub's own read path (`ModbusHub.poll_unit_once`: request, decode, Samples). The per-tag run
uses the same hub with `coalesce: false` (one request per tag). "registers/s" counts the
registers the tags occupy, not gap registers read along.

Run: `python -m bench.modbus [--seconds 10]`. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import time
from typing import Any

from common.checks import validated
from connectors.modbus.config import ModbusConnection
from connectors.modbus.hub import ModbusHub, ModbusTag

TAGS = 1000
REGISTERS = 1400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(port: int) -> None:
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    async def main() -> None:
        device = SimDevice(
            id=1, simdata=[SimData(0, count=REGISTERS, values=7, datatype=DataType.REGISTERS)]
        )
        server = ModbusTcpServer([device], address=("127.0.0.1", port))
        await server.serve_forever()

    asyncio.run(main())


def tags() -> list[ModbusTag]:
    out = []
    address = 0
    for i in range(TAGS):
        if i % 5 == 4:
            out.append(ModbusTag("m", f"t{i}", 1, f"hr:{address}", "uint32"))
            address += 2
        else:
            out.append(ModbusTag("m", f"t{i}", 1, f"hr:{address}", "uint16"))
            address += 1
        if i % 10 == 9:
            address += 1  # a spare register every ten tags
    return out


async def measure(port: int, seconds: float, *, per_tag: bool) -> dict[str, Any]:
    cfg = validated(
        ModbusConnection,
        id="bench",
        host="127.0.0.1",
        port=port,
        timeout=5.0,
        coalesce=not per_tag,
        max_registers=125,
    )
    the_tags = tags()
    hub = ModbusHub(cfg, the_tags)
    if per_tag:
        assert len(hub.blocks) == TAGS, len(hub.blocks)
    tag_registers = sum(2 if t.data_type == "uint32" else 1 for t in the_tags)
    polls = samples = bad = 0
    async with hub:
        await hub.poll_unit_once(1)  # connect and warm up
        before = hub.requests
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            got = await hub.poll_unit_once(1)
            polls += 1
            samples += len(got)
            bad += sum(s.quality != "good" for s in got)
        elapsed = time.perf_counter() - started
        requests = hub.requests - before
    return {
        "blocks_per_poll": len(hub.blocks),
        "polls": polls,
        "requests": requests,
        "seconds": round(elapsed, 3),
        "registers_per_s": round(polls * tag_registers / elapsed, 1),
        "tags_per_s": round(samples / elapsed, 1),
        "requests_per_s": round(requests / elapsed, 1),
        "poll_latency_ms": round(1000 * elapsed / polls, 2),
        "bad_samples": bad,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="per variant")
    args = parser.parse_args()
    port = _free_port()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(port,), daemon=True)
    server.start()
    try:
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        coalesced = asyncio.run(measure(port, args.seconds, per_tag=False))
        print("coalesced", json.dumps(coalesced))
        per_tag = asyncio.run(measure(port, args.seconds, per_tag=True))
        print("per tag  ", json.dumps(per_tag))
    finally:
        server.terminate()
        server.join(5)
    result = {
        "bench": "modbus",
        "tags": TAGS,
        "coalesced": coalesced,
        "per_tag": per_tag,
        "ratio_registers_per_s": round(
            coalesced["registers_per_s"] / per_tag["registers_per_s"], 1
        ),
        "target_ratio": 10,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
