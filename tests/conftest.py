"""Shared fixtures: a fresh PostgreSQL database per test, a topic prefix per test, keys,
and the real ingest worker against the machine's Mosquitto."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
import pytest
import structlog
from hypothesis import settings as hypothesis_settings
from psycopg import sql
from psycopg_pool import ConnectionPool

from cloud_api.config import DatabaseSettings
from cloud_api.db import make_pool, migrate
from cloud_api.ingest.worker import BatchWriter, IngestWorker
from sync.keys import (
    CloudKeyring,
    ed25519_line,
    generate_agent_signing_key,
    generate_cloud_ack_key,
    generate_cloud_hpke_key,
    install_cloud_public_keys,
)
from sync.uplink import BrokerSettings

# Property tests check what holds, never how fast: no deadline per example (a loaded machine
# took a Modbus read plan past Hypothesis' 200 ms). Under CI Hypothesis' own "ci" profile
# (which has no deadline either, and derandomizes) stays in force.
if not os.environ.get("CI"):
    hypothesis_settings.register_profile("suite", deadline=None)
    hypothesis_settings.load_profile("suite")

PG_ADMIN = os.environ.get("TEST_PG", "postgresql://postgres@127.0.0.1:5432")
MQTT_HOST = os.environ.get("TEST_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("TEST_MQTT_PORT", "1883"))


@pytest.fixture(autouse=True)
def _structlog_configuration() -> Iterator[None]:
    """A test that runs a CLI in the test process configures structlog for the whole process
    (`edge-agent check` filters below errors); the next test starts from the configuration
    before it, or a test that captures warnings sees none."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, migrated database for this test only; dropped afterwards."""
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = f"{PG_ADMIN}/{name}"
    migrate(url)
    yield url
    with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def pool(pg_url: str) -> Iterator[ConnectionPool]:
    p = make_pool(DatabaseSettings(url=pg_url, pool_min=1, pool_max=4), name="test")
    yield p
    p.close()


@pytest.fixture
def topic_prefix() -> str:
    return f"test/{secrets.token_hex(4)}/"


@pytest.fixture
def cloud_keys(tmp_path: Path) -> CloudKeyring:
    directory = tmp_path / "cloud-keys"
    generate_cloud_hpke_key(directory)
    generate_cloud_ack_key(directory)
    return CloudKeyring.load(directory)


def make_agent_keys(directory: Path, ring: CloudKeyring) -> str:
    """Create an agent key directory trusting `ring`; returns the agent's public key line."""
    key = generate_agent_signing_key(directory)
    install_cloud_public_keys(
        directory,
        ring.current_hpke.public.to_line(),
        [ed25519_line(k) for k in ring.ack_verify_keys().values()],
    )
    return ed25519_line(key.public_key())


def enroll(url: str, agent: str, site: str, public_line: str) -> None:
    from sync.keys import ed25519_key_id, parse_ed25519_public

    kid = ed25519_key_id(parse_ed25519_public(public_line))
    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute(
            "INSERT INTO registry.sites(site_id) VALUES (%s) ON CONFLICT DO NOTHING", (site,)
        )
        conn.execute(
            "INSERT INTO registry.agents(agent_id, site_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (agent, site),
        )
        conn.execute(
            "INSERT INTO registry.agent_keys(agent_id, key_id, public_key) "
            "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (agent, kid, public_line),
        )


def bearer(
    keys_dir: Path, *, role: str = "admin", sites: Sequence[str] = ("*",), ttl_s: int = 3600
) -> dict[str, str]:
    """An Authorization header for the API of CloudSettings(keys_dir=keys_dir): a token signed
    by the cloud's token key in `keys_dir` (created there if missing)."""
    from datetime import timedelta

    from cloud_api.access.auth import TokenKeyring, generate_token_key, issue_token, parse_role
    from cloud_api.config import SecuritySettings

    ring = TokenKeyring.load(keys_dir) if keys_dir.is_dir() else None
    if ring is None or ring.current_id is None:
        generate_token_key(keys_dir)
        ring = TokenKeyring.load(keys_dir)
    token, _ = issue_token(
        ring,
        SecuritySettings(),
        subject=f"test-{role}",
        role=parse_role(role),
        sites=sites,
        ttl=timedelta(seconds=ttl_s),
    )
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def ingest(
    pool: ConnectionPool, cloud_keys: CloudKeyring, topic_prefix: str
) -> Iterator[IngestWorker]:
    store = BatchWriter(pool, cloud_keys, topic_prefix=topic_prefix)
    worker = IngestWorker(
        store,
        BrokerSettings(host=MQTT_HOST, port=MQTT_PORT),
        share_group=f"g{secrets.token_hex(3)}",
    )
    worker.start()
    assert worker.subscribed.wait(10), "ingest could not subscribe on the broker"
    yield worker
    worker.stop()
