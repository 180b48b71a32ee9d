"""Conformance: the real agent against a node-opcua server (tests/conformance/node_opcua/plc.js)
with three presses on a fixed schedule, through the real broker, ingest, PostgreSQL and API.

The server is restarted in the middle of the schedule with its namespaces registered in
the other order (every press gets another namespace index; the agent addresses nodes by
namespace URI), the part counters wrap at 32 bits, press-c counts total and good parts
instead of total and scrap, and the equipment lists `state:` before `reason:` (press-a,
press-c) and after it (press-b). One agent reads the presses twice, through a subscription
(`subscribe-press-x`) and by polling (`poll-press-x`); the test ends with the invariant
checker and an exact comparison of every view of each with the server's ground truth.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cloud_api.ingest.worker import IngestWorker
from sync.keys import CloudKeyring
from tests.conformance.harness import (
    REASON_MAP,
    REASONS,
    STATE_MAP,
    Change,
    GroundTruth,
    finish,
    new_agent,
    parse_line,
    utc_ms,
    wait_for_states,
)
from tests.conftest import free_port
from tests.connectors.test_node_opcua import HERE as NODE_OPCUA
from tests.connectors.test_node_opcua import install_node_opcua

SERVER = Path(__file__).parent / "node_opcua" / "plc.js"
PRESSES = ("press-a", "press-b", "press-c")
MODES = ("subscribe", "poll")
# The schedule's tick; every press runs from tick 25 to 75: the server restarts in that
# window, so no state change falls into the outage.
TICK = timedelta(milliseconds=100)
RESTART_AT, ALL_RUN, END = 28, 75, 110

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="Node.js and npm are not installed",
)


NODE_NAMES = {
    "state": "State",
    "reason": "Reason",
    "total_count": "TotalCount",
    "scrap_count": "ScrapCount",
    "good_count": "GoodCount",
}


def signal_yaml(eq: str, signal: str) -> str:
    where = f'node: "nsu=urn:conformance:{eq};s={eq}.{NODE_NAMES[signal]}"'
    if signal == "state":
        return f"{signal}: {{{where}, map: {STATE_MAP}}}"
    if signal == "reason":
        return f"{signal}: {{{where}, map: {REASON_MAP}}}"
    return f"{signal}: {{{where}, type: uint32, width: 32}}"


def equipment_yaml(mode: str) -> str:
    """The three presses, read through the connection of `mode` as `<mode>-press-x`."""
    blocks = []
    for eq, signals in (
        ("press-a", ("state", "reason", "total_count", "scrap_count")),
        ("press-b", ("reason", "state", "total_count", "scrap_count")),
        ("press-c", ("state", "reason", "total_count", "good_count")),
    ):
        lines = "".join(f"      {signal_yaml(eq, s)}\n" for s in signals)
        blocks.append(
            f"  - id: {mode}-{eq}\n    connection: {mode}\n    ideal_cycle_time: 200ms\n"
            f"    signals:\n{lines}"
        )
    return "".join(blocks)


def connection_yaml(mode: str, url: str) -> str:
    return (
        f"  - id: {mode}\n    type: opcua\n    url: {url}\n    mode: {mode}\n"
        "    publishing_interval: 100ms\n    sampling_interval: 50ms\n    poll_interval: 100ms\n"
        "    reconnect_min: 200ms\n    reconnect_max: 1s\n    timeout: 2s\n"
    )


class NodeServer:
    """One plc.js process: its ground-truth lines go to the PLC's truth as they come."""

    def __init__(self, plc: NodePlc, order: str) -> None:
        self.plc = plc
        self.lines: queue.Queue[dict[str, object]] = queue.Queue()
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            ["node", str(SERVER), str(plc.port), str(plc.folder / "pki"), order],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "NODE_PATH": str(NODE_OPCUA / "node_modules")},
        )
        threading.Thread(target=self._pump, daemon=True).start()
        self.wait_for("initialized")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout, (self.plc.folder / "plc.log").open("a", encoding="utf-8") as log:
            for line in self.proc.stdout:
                log.write(f"{datetime.now(UTC).isoformat()} {line}")
                log.flush()
                self.output.append(line)
                item = parse_line(line)
                if item is not None:
                    self.plc.record(item)
                    self.lines.put(item)

    def wait_for(self, event: str, limit_s: float = 120) -> dict[str, object]:
        try:
            while True:
                item = self.lines.get(timeout=limit_s)
                if item["ev"] == event:
                    return item
        except queue.Empty:
            raise AssertionError(f"plc.js: no {event!r}: {''.join(self.output)[-3000:]}") from None

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """The server dies at once (a PLC power cycle); the presses' schedule goes on."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        assert self.proc.stdin is not None
        self.proc.stdin.close()


class NodePlc:
    """Three presses behind node-opcua, across server restarts; `truth` as logged."""

    def __init__(self, port: int, folder: Path) -> None:
        self.port = port
        self.folder = folder
        self.truth = GroundTruth()
        self.epoch: int | None = None
        self.servers: list[NodeServer] = []

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/UA/Presses"

    def spawn(self, order: str) -> NodeServer:
        server = NodeServer(self, order)
        self.servers.append(server)
        return server

    def listen(self, server: NodeServer) -> None:
        server.send("LISTEN" if self.epoch is None else f"LISTEN {self.epoch}")
        server.wait_for("ready")

    def go(self, server: NodeServer) -> datetime:
        server.send("GO")
        self.epoch = int(server.wait_for("epoch")["epoch"])  # type: ignore[call-overload]
        return utc_ms(self.epoch)

    def record(self, item: dict[str, object]) -> None:
        if item["ev"] == "state":
            reason = int(item["reason"])  # type: ignore[call-overload]
            self.truth.add(
                Change(
                    str(item["machine"]),
                    utc_ms(int(item["t"])),  # type: ignore[call-overload]
                    str(item["state"]),
                    REASONS.get(reason),
                )
            )
        elif item["ev"] == "end":
            self.truth.made[str(item["machine"])] = (
                int(item["produced"]),  # type: ignore[call-overload]
                int(item["scrap"]),  # type: ignore[call-overload]
            )

    def kill(self) -> None:
        for server in self.servers:
            server.kill()


async def sleep_until(t: datetime) -> None:
    await asyncio.sleep(max(0.0, (t - datetime.now(t.tzinfo)).total_seconds()))


async def test_node_opcua_presses_every_view_tells_the_plc_truth(
    tmp_path: Path,
    pg_url: str,
    cloud_keys: CloudKeyring,
    topic_prefix: str,
    ingest: IngestWorker,
) -> None:
    await asyncio.to_thread(install_node_opcua)
    plc = NodePlc(free_port(), tmp_path)
    first = await asyncio.to_thread(plc.spawn, "abc")
    await asyncio.to_thread(plc.listen, first)
    # The server to take over after the restart, its namespaces registered the other way
    # round (every namespace index changes); it listens only once the first one is gone.
    second = await asyncio.to_thread(plc.spawn, "cba")
    # One agent reads the presses twice: through a subscription and by polling.
    body = (
        "connections:\n"
        + "".join(connection_yaml(mode, plc.url) for mode in MODES)
        + "equipment:\n"
        + "".join(equipment_yaml(mode) for mode in MODES)
    )
    agent = new_agent(tmp_path / "agent", cloud_keys, pg_url, topic_prefix, body)
    machines = [f"{mode}-{press}" for mode in MODES for press in PRESSES]
    try:
        agent.start()
        # The agent's counter baselines: every press reported, standing before the schedule.
        await wait_for_states(pg_url, machines, "planned_stop")
        await asyncio.sleep(1.0)
        epoch = await asyncio.to_thread(plc.go, first)
        await sleep_until(epoch + RESTART_AT * TICK)
        await asyncio.to_thread(first.kill)
        await asyncio.to_thread(plc.listen, second)
        await asyncio.to_thread(second.wait_for, "end")
        await wait_for_states(pg_url, machines, "planned_stop")
        by_press = plc.truth.truths()
        assert set(by_press) == set(PRESSES), by_press
        assert all(t.produced and t.scrap for t in by_press.values()), by_press
        truths = {f"{mode}-{press}": by_press[press] for mode in MODES for press in PRESSES}
        views = await finish(
            "node-opcua",
            agent,
            pg_url,
            tmp_path,
            truths,
            epoch + (END + 1) * TICK,
            tolerance_s=0.15,
        )
        # The restart is unknown time, and only until the agent reads the new server: every
        # press is known again before its next state change (the end of the common run).
        for eq, view in views.items():
            late = [(a, b) for a, b in view.unknown if a > epoch and b > epoch + ALL_RUN * TICK]
            assert not late, f"{eq}: state unknown after the restart until {late}"
    finally:
        agent.kill()
        plc.kill()
