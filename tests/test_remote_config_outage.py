"""An agent with `config.source: cloud` that starts while its broker is unreachable runs the
last version the cloud pushed (stored in its state folder), not its local file, and counts
its PLC's parts on that configuration; they reach the cloud once the broker is back.

Real components: a pymodbus press line, the `edge-agent run` process, the machine's Mosquitto
behind a TCP relay the test cuts (the agent's only way to the broker), ingest, PostgreSQL and
the HTTP API for the push. Ends with the cross-view invariant checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
from psycopg_pool import ConnectionPool

from cloud_api.api.app import create_app
from cloud_api.config import CloudSettings, DatabaseSettings, MqttSettings
from cloud_api.ingest.worker import IngestWorker
from sync.keys import CloudKeyring
from tests.conftest import MQTT_HOST, MQTT_PORT, bearer, enroll, free_port, make_agent_keys
from tests.invariants import Truth, api_client, check_views, compare_with_truth, wait_counted
from tests.test_remote_config import REASONS, SITE, Plant, counts_of, results, wait_for

# An agent id of its own: this test may run beside the other remote-configuration test.
AGENT = "edge-rc-outage"


class Relay:
    """A TCP relay to the broker: while it is down, the broker is unreachable for the agent
    (connection refused), exactly as when the broker or the network is down."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def down(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in list(self.writers):
            writer.close()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(MQTT_HOST, MQTT_PORT)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def metric(text: str, name: str, labels: str = "") -> float | None:
    """One sample of the agent's /metrics (Prometheus text), None when absent."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


async def test_cloud_configured_agent_starts_from_its_last_version_without_a_broker(
    tmp_path: Path,
    pg_url: str,
    pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    topic_prefix: str,
    ingest: IngestWorker,
) -> None:
    plant = Plant(tmp_path, topic_prefix, agent=AGENT)

    relay = Relay(free_port())
    enroll(pg_url, AGENT, SITE, make_agent_keys(plant.state / "keys", cloud_keys))
    keys_dir = tmp_path / "cloud-keys"
    settings = CloudSettings(
        database=DatabaseSettings(url=pg_url),
        mqtt=MqttSettings(host=MQTT_HOST, port=MQTT_PORT, topic_prefix=topic_prefix),
        keys_dir=keys_dir,
    )
    app = create_app(settings, pool=pool)
    engineer = bearer(keys_dir, role="engineer", sites=[SITE])

    def config(presses: list[tuple[str, str, int]]) -> str:
        text = plant.config(presses)
        direct = f"mqtt:\n  host: {MQTT_HOST}\n  port: {MQTT_PORT}\n"
        assert direct in text
        return text.replace(direct, f"mqtt:\n  host: {MQTT_HOST}\n  port: {relay.port}\n")

    # The local file knows press-1 only; version 1 from the cloud adds press-2.
    (tmp_path / "agent.yaml").write_text(config([("press-1", "plc", 1)]), encoding="utf-8")
    v1 = config([("press-1", "plc", 1), ("press-2", "plc", 2)])
    await relay.up()
    await plant.line.start()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")
    metrics = httpx.AsyncClient(base_url=f"http://127.0.0.1:{plant.health_port}", timeout=5)

    async def scrape() -> str:
        with contextlib.suppress(httpx.HTTPError):
            response = await metrics.get("/metrics")
            if response.status_code == 200:
                return response.text
        return ""

    try:
        plant.start()

        def first_state() -> bool:
            with psycopg.connect(pg_url) as conn:
                row = conn.execute("SELECT count(*) FROM facts.events WHERE kind = 'state'")
                return int(row.fetchone()[0]) > 0  # type: ignore[index]

        await wait_for(first_state, 40, "the agent's first state event")
        plant.presses[0].frozen = False
        response = await client.post(
            f"/v1/agents/{AGENT}/config", json={"yaml": v1, "comment": "add press-2"},
            headers=engineer,
        )  # fmt: skip
        assert response.status_code == 201 and response.json()["version"] == 1, response.text
        await wait_for(
            lambda: any(r["result"] == "applied" for r in results(pg_url)), 90, "version 1 applied"
        )
        plant.presses[1].frozen = False
        await wait_for(lambda: counts_of(pg_url, "press-2")[0] > 0, 60, "parts of press-2")
        assert plant.process is not None
        plant.process.send_signal(signal.SIGTERM)
        assert plant.process.wait(60) == 0, plant.tail()

        # The broker is unreachable when the agent starts again.
        await relay.down()
        stored_before = counts_of(pg_url, "press-2")[0]
        plant.start()
        outage_metrics = ""

        async def counting_press_2() -> bool:
            # press-2 exists only in version 1: its state is polled and parts wait in the outbox.
            nonlocal outage_metrics
            outage_metrics = await scrape()
            known = metric(
                outage_metrics, "edge_agent_equipment_state", 'equipment="press-2",state="running"'
            )
            waiting = metric(outage_metrics, "edge_agent_outbox_events") or 0.0
            if known is None or waiting == 0:
                return False
            assert metric(outage_metrics, "edge_agent_broker_connected") == 0.0, outage_metrics
            return True

        deadline = asyncio.get_running_loop().time() + 60
        while not await counting_press_2():
            assert asyncio.get_running_loop().time() < deadline, outage_metrics + plant.tail()
            await asyncio.sleep(0.5)
        assert "starting from the configuration the cloud pushed" in plant.tail(), plant.tail()
        # Parts go on: the outbox grows while nothing can be sent.
        first = metric(outage_metrics, "edge_agent_outbox_events") or 0.0
        while (metric(text := await scrape(), "edge_agent_outbox_events") or 0.0) <= first:
            assert asyncio.get_running_loop().time() < deadline + 60, plant.tail()
            await asyncio.sleep(0.5)
        assert metric(text, "edge_agent_broker_connected") == 0.0, text
        assert counts_of(pg_url, "press-2")[0] == stored_before  # nothing reached the cloud

        # The broker is back: what was counted on version 1 during the outage arrives.
        for press in plant.presses:
            press.frozen = True
            press.set_state("idle")
        await relay.up()
        await wait_for(
            lambda: counts_of(pg_url, "press-2")[0] > stored_before, 90, "press-2's parts"
        )
        frozen_at = datetime.now(UTC)
        # The agent reads the final counters and closes the bucket that holds them.
        await wait_counted(
            pg_url,
            {
                name: (press.truth.produced, press.truth.scrap)
                for name, press in zip(("press-1", "press-2"), plant.presses, strict=True)
            },
            frozen_at,
        )
        await plant.stop_drained()
        # The retained version 1 delivered again after the outage is not a new result.
        assert [r["result"] for r in results(pg_url)] == ["applied"], results(pg_url)
    finally:
        await client.aclose()
        await metrics.aclose()
        if plant.process is not None and plant.process.poll() is None:
            plant.process.kill()
        await plant.line.stop()
        await relay.down()

    assert plant.outbox_empty(), "every batch acked"
    truths = {}
    for name, press in zip(("press-1", "press-2"), plant.presses, strict=True):
        truth = press.truth
        assert counts_of(pg_url, name) == (truth.produced, truth.scrap), plant.tail()
        truths[name] = Truth(produced=truth.produced, scrap=truth.scrap, reasons=REASONS)
    with api_client(pg_url, tmp_path / "views-keys") as api:
        views = await asyncio.to_thread(check_views, api, pg_url, truths=truths)
    compare_with_truth(views, truths)
