"""Fixtures of the fault-injection suite: keys for both suites, PLCs, brokers, ingest."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from psycopg_pool import ConnectionPool

from cloud_api.config import DatabaseSettings
from cloud_api.db import make_pool
from cloud_api.ingest.worker import BatchWriter, IngestWorker
from connectors.modbus.simulator import Press, PressLine
from sync.keys import (
    SUITES,
    CloudKeyring,
    ed25519_line,
    generate_agent_signing_key,
    generate_cloud_ack_key,
    generate_cloud_hpke_keys,
    install_cloud_public_keys,
)
from sync.uplink import BrokerSettings
from tests.conftest import MQTT_HOST, MQTT_PORT, enroll, free_port
from tests.faults.harness import CLOUD_API, Agent, Checker, Mosquitto


@pytest.fixture
def ring(tmp_path: Path) -> CloudKeyring:
    """Cloud keys publishing one HPKE key per suite (the classic one the default)."""
    directory = tmp_path / "cloud-keys"
    generate_cloud_hpke_keys(directory, list(SUITES))
    generate_cloud_ack_key(directory)
    return CloudKeyring.load(directory)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "mosquitto")
    b.start()
    yield b
    b.kill()


@dataclass
class Plant:
    presses: list[Press]
    line: PressLine
    port: int

    def freeze(self) -> None:
        for p in self.presses:
            p.frozen = True
            p.set_state("idle")

    def run(self) -> None:
        for p in self.presses:
            p.frozen = False

    @property
    def produced(self) -> int:
        return sum(p.truth.produced for p in self.presses)


@pytest.fixture
async def plant() -> AsyncIterator[Plant]:
    """Two presses, idle and frozen until `run()`: the truth counts from the agent's baseline."""
    presses = [Press(seed=11 + i, time_scale=0.03, cycle_time=0.1) for i in range(2)]
    port = free_port()
    line = PressLine(presses, port=port)
    plant = Plant(presses, line, port)
    plant.freeze()
    await line.start(tick=0.05)
    yield plant
    await line.stop()


def start_ingest(
    pool: ConnectionPool, ring: CloudKeyring, prefix: str, port: int, **kwargs: object
) -> IngestWorker:
    worker = IngestWorker(
        BatchWriter(pool, ring, topic_prefix=prefix),
        BrokerSettings(host=MQTT_HOST, port=port),
        share_group=f"g{secrets.token_hex(3)}",
        **kwargs,  # type: ignore[arg-type]
    )
    worker.start()
    assert worker.subscribed.wait(15), "ingest could not subscribe"
    return worker


def make_agent_keys(directory: Path, ring: CloudKeyring) -> str:
    """An agent key directory trusting every key `ring` publishes; returns the public line."""
    key = generate_agent_signing_key(directory)
    install_cloud_public_keys(
        directory,
        [k.public.to_line() for k in ring.current_hpke_keys],
        [ed25519_line(k) for k in ring.ack_verify_keys().values()],
    )
    return ed25519_line(key.public_key())


def new_agent(tmp_path: Path, ring: CloudKeyring, pg_url: str, plant: Plant, **kw: object) -> Agent:
    """An enrolled agent process definition (not started) reading both presses."""
    agent = Agent(
        folder=tmp_path / "agent",
        plc_port=plant.port,
        mqtt_port=int(kw.pop("mqtt_port", MQTT_PORT)),  # type: ignore[call-overload]
        prefix=str(kw.pop("prefix")),
        units=len(plant.presses),
        **kw,  # type: ignore[arg-type]
    )
    agent.folder.mkdir(parents=True, exist_ok=True)
    public = make_agent_keys(agent.keys_dir, ring)
    enroll(pg_url, agent.agent_id, agent.site, public)
    return agent


@dataclass
class IngestProcess:
    """`cloud-api ingest` as a process, to SIGKILL it at chosen moments."""

    pg_url: str
    keys_dir: Path
    prefix: str
    port: int
    log: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "CLOUD_DATABASE_URL": self.pg_url,
            "CLOUD_MQTT_HOST": MQTT_HOST,
            "CLOUD_MQTT_PORT": str(self.port),
            "CLOUD_TOPIC_PREFIX": self.prefix,
            "CLOUD_KEYS_DIR": str(self.keys_dir),
            "PYTHONUNBUFFERED": "1",
        }
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                [CLOUD_API, "ingest", "--workers", "2"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.procs.append(proc)
        return proc

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(15)


@pytest.fixture
def fault_pool(pg_url: str) -> Iterator[ConnectionPool]:
    p = make_pool(DatabaseSettings(url=pg_url, pool_min=1, pool_max=6), name="faults")
    yield p
    p.close()


__all__ = ["Checker", "IngestProcess", "Plant", "new_agent", "start_ingest"]
