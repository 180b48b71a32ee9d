"""The agent killed mid-flush and restarted with engine state of different ages, with and
without a power loss of its state folder (a FUSE file system that drops every write not yet
fsynced): every committed event stored exactly once, part counts equal to the presses'
own tally, every OEE bucket once, and time classes adding up to each bucket's window."""

from __future__ import annotations

import asyncio
import itertools
import random
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from sync.keys import CloudKeyring
from tests.conftest import MQTT_PORT
from tests.faults.conftest import Plant, new_agent, start_ingest
from tests.faults.harness import Agent, Checker
from tests.faults.powerfs import PowerFs, fuse_problem
from tests.faults.test_scenarios import finish, start_production

# (heartbeat_interval, snapshot_interval) per life of the agent: stored state of every age,
# from folded a moment ago to a long journal over rows written minutes before.
AGES = [("200ms", "400ms"), ("10s", "5min"), ("1s", "2s"), ("30s", "1h")]


def oee_buckets(pg_url: str, agent_id: str) -> list[dict[str, Any]]:
    with psycopg.connect(pg_url) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT body FROM facts.events WHERE kind = 'oee' AND agent_id = %s",
                (agent_id,),
            )
        ]


def check_time(pg_url: str, agent: Agent) -> None:
    """Each bucket once; its classes of time add up to its window; buckets tile the time."""
    by_equipment: dict[str, list[dict[str, Any]]] = {}
    for body in oee_buckets(pg_url, agent.agent_id):
        by_equipment.setdefault(body["equipment_id"], []).append(body)
    assert set(by_equipment) == {f"press-{u}" for u in range(1, agent.units + 1)}
    for eq, bodies in by_equipment.items():
        bodies.sort(key=lambda b: b["bucket_start"])
        starts = [b["bucket_start"] for b in bodies]
        assert len(starts) == len(set(starts)), f"{eq}: a bucket stored twice"
        for a, b in itertools.pairwise(bodies):
            assert a["bucket_end"] == b["bucket_start"], f"{eq}: a gap or overlap at {a}"
        for body in bodies:
            c = body["components"]
            window = (
                datetime.fromisoformat(body["bucket_end"])
                - datetime.fromisoformat(body["bucket_start"])
            ).total_seconds()
            assert c["planned_busy_s"] + c["planned_down_s"] + c["off_plan_s"] == pytest.approx(
                window, abs=1e-6
            )
            busy = c["production_s"] + c["setup_s"] + c["downtime_s"] + c["unknown_s"]
            assert busy == pytest.approx(c["planned_busy_s"], abs=1e-6)


async def _lives(
    agent: Agent, rng: random.Random, lives: int, power: PowerFs | None = None
) -> None:
    for life in range(lives):
        agent.heartbeat, agent.snapshot = AGES[life % len(AGES)]
        await asyncio.sleep(rng.uniform(1.2, 3.0))  # python start-up alone is ~1 s
        # kill -9 at a random point of the 200 ms flush cycle
        await asyncio.sleep(rng.uniform(0.0, 0.2))
        agent.kill()
        if power is not None:
            await asyncio.to_thread(power.power_loss)
            await asyncio.sleep(rng.uniform(0.1, 0.5))  # the presses keep producing
            await asyncio.to_thread(power.mount)
        else:
            await asyncio.sleep(rng.uniform(0.1, 0.5))
        agent.start()


async def test_killed_mid_flush_with_engine_state_of_different_ages(
    tmp_path: Path, pg_url: str, fault_pool: ConnectionPool, ring: CloudKeyring, plant: Plant
) -> None:
    prefix = f"ages/{tmp_path.name[-12:]}/"
    ingest = start_ingest(fault_pool, ring, prefix, MQTT_PORT)
    agent = new_agent(tmp_path, ring, pg_url, plant, prefix=prefix)
    checker = Checker(agent, ring)
    checker.install()
    try:
        await start_production(agent, plant, pg_url)
        await _lives(agent, random.Random(11), 8)
        await asyncio.sleep(2)
        await finish(agent, plant, checker, pg_url)
        check_time(pg_url, agent)
    finally:
        agent.kill()
        ingest.stop()


async def test_power_loss_drops_unsynced_writes_and_nothing_is_lost_or_doubled(
    tmp_path: Path, pg_url: str, fault_pool: ConnectionPool, ring: CloudKeyring, plant: Plant
) -> None:
    problem = fuse_problem()
    if problem is not None:
        pytest.skip(f"no FUSE here: {problem} (scripts/test-tools.sh installs fuse3)")
    prefix = f"power/{tmp_path.name[-12:]}/"
    ingest = start_ingest(fault_pool, ring, prefix, MQTT_PORT)
    agent = new_agent(tmp_path, ring, pg_url, plant, prefix=prefix)
    # The state folder (keys already in it) becomes the backing folder of the mount.
    backing = tmp_path / "backing"
    shutil.move(agent.state, backing)
    power = PowerFs(backing, agent.state, tmp_path / "powerfs.log")
    power.mount()
    checker = Checker(agent, ring)
    try:
        checker.install()
        await start_production(agent, plant, pg_url, limit_s=60)
        await _lives(agent, random.Random(23), 6, power)
        await asyncio.sleep(2)
        await finish(agent, plant, checker, pg_url)
        check_time(pg_url, agent)
        assert power.losses == 6
    finally:
        agent.kill()
        ingest.stop()
        await asyncio.to_thread(power.unmount)
