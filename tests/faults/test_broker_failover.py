"""Failover between the nodes of a broker cluster: two Mosquitto processes stand in for two
nodes, the agent lists both under `mqtt.brokers`, and the node it sends to is SIGKILLed
while it holds unacked batches. Every batch is acked in the end, the counts are the PLC's,
and the cross-view invariants hold.

Two independent Mosquittos share no subscriptions (the nodes of an EMQX or HiveMQ cluster
do), so each gets its own ingest worker: a batch is acked on the node it came in on, which
is the node the agent is connected to, as with one shared subscription across a cluster.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool

from sync.keys import CloudKeyring
from tests.faults.conftest import Plant, new_agent, start_ingest
from tests.faults.harness import Agent, Checker, Mosquitto, wait_for
from tests.faults.test_scenarios import finish, start_production, stored_batches


def connected_to(broker: Mosquitto, client_id: str) -> int:
    """How often `client_id` connected to this broker (its log says so on each CONNECT)."""
    return sum(
        1
        for line in broker.log_text().splitlines()
        if "New client connected" in line and f" as {client_id} " in line
    )


def connected_ports(agent: Agent) -> list[int]:
    """The broker ports of the agent's "broker connected" log lines, in order."""
    ports = []
    for line in agent.log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("event") == "broker connected":
                ports.append(int(entry["port"]))
    return ports


def outbox(agent: Agent) -> dict[str, Any]:
    """The running agent's outbox figures (it holds the file exclusively: GET /outbox)."""
    report = agent.outbox_report()
    assert report is not None, agent.log_tail()
    return report


def acked_up_to(agent: Agent, seq: int) -> bool:
    """Every batch up to `seq` is acked: none of them is waiting in the outbox."""
    oldest = outbox(agent)["oldest_unacked_seq"]
    return oldest is None or int(oldest) > seq


async def test_agent_fails_over_to_the_other_node_and_back_resuming_unacked_batches(
    tmp_path: Path,
    pg_url: str,
    fault_pool: ConnectionPool,
    ring: CloudKeyring,
    plant: Plant,
) -> None:
    node_a = Mosquitto(tmp_path / "node-a")
    node_b = Mosquitto(tmp_path / "node-b")
    node_a.start()
    node_b.start()
    prefix = "failover/"
    ingest = [
        start_ingest(fault_pool, ring, prefix, node_a.port),
        start_ingest(fault_pool, ring, prefix, node_b.port),
    ]
    agent = new_agent(
        tmp_path,
        ring,
        pg_url,
        plant,
        prefix=prefix,
        mqtt_port=node_a.port,
        failover_ports=(node_b.port,),
    )
    checker = Checker(agent, ring)
    checker.install()
    try:
        await start_production(agent, plant, pg_url)
        await wait_for(lambda: stored_batches(pg_url) > 3, 30, "batches stored through node A")
        assert connected_to(node_a, agent.client_id) == 1, node_a.log_text()[-3000:]
        assert connected_to(node_b, agent.client_id) == 0

        # Node A stops acking (its ingest is gone) and then dies holding the agent's batches.
        ingest[0].stop()
        await wait_for(lambda: agent.depth() > 3, 30, "unacked batches sent to node A")
        node_a.kill()
        # What node A held: every batch stored so far that is not acked yet.
        report = outbox(agent)
        held = int(report["next_seq"]) - 1
        assert report["oldest_unacked_seq"] is not None and report["oldest_unacked_seq"] <= held
        await wait_for(
            lambda: connected_to(node_b, agent.client_id) >= 1, 60, "the agent on node B"
        )
        await wait_for(
            lambda: acked_up_to(agent, held), 60, "the batches node A held acked via node B"
        )

        # Node A comes back, node B dies while the agent sends to it: back to A.
        node_a.start()
        ingest[0] = start_ingest(fault_pool, ring, prefix, node_a.port)
        before = stored_batches(pg_url)
        await wait_for(lambda: stored_batches(pg_url) > before + 2, 30, "batches via node B")
        node_b.kill()
        await wait_for(
            lambda: connected_to(node_a, agent.client_id) >= 2, 60, "the agent back on node A"
        )
        before = stored_batches(pg_url)
        await wait_for(lambda: stored_batches(pg_url) > before + 2, 60, "batches via node A")

        await finish(agent, plant, checker, pg_url)
        # A, B, A (a restart by `finish` to ship what the graceful stop committed adds one).
        ports = connected_ports(agent)
        assert ports[:3] == [node_a.port, node_b.port, node_a.port], agent.log_tail()
    finally:
        agent.kill()
        for worker in ingest:
            worker.stop()
        node_a.kill()
        node_b.kill()
