"""The plant broker output beyond the Sparkplug sequence: plain unified-namespace JSON
(retained topics, only the listed metrics), and a stalled plant broker: the client's queue
stays bounded, the live values that cannot go out are counted as dropped, the engine is
fed all along, and once the broker reads again the host gets the newest values."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import parse_config
from agent.floor import sparkplug_b_pb2 as pb
from agent.floor.live import LiveSource
from agent.floor.sparkplug import PlantPublisher, build_publisher
from connectors.sample import Sample
from oee.engine import PlantEngine
from tests.faults.harness import Mosquitto, TcpProxy

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")

HEAD = """
agent: {{id: edge-pm, site: plant-pm, timezone: UTC, bucket_seconds: 1}}
shifts: [{{name: all-day, start: "00:00", end: "00:00"}}]
plant_mqtt:
  port: {port}
  reconnect_min: 100ms
  reconnect_max: 500ms
{extra}
equipment:
"""
EQUIPMENT = """  - id: press-{i}
    line: line-1
    ideal_cycle_time: 1s
    signals:
      state: {{map: {{0: idle, 1: running, 2: fault}}}}
      total_count: {{}}
      reason: {{map: {{1: jam, 2: no material}}}}
"""


def build(port: int, extra: str, machines: int = 1) -> PlantPublisher:
    text = HEAD.format(port=port, extra=extra) + "".join(
        EQUIPMENT.format(i=i) for i in range(1, machines + 1)
    )
    config = parse_config(text, replay=True)
    assert config.plant_mqtt is not None
    engine = PlantEngine(config.oee_specs(), config.calendar(), agent_id="edge-pm", site_id="p")
    engine.start(datetime.now(UTC))
    lines = {eq.id: eq.line for eq in config.equipment}
    source = LiveSource(engine, lines, dict.fromkeys(lines), dict, lambda: 0)
    return build_publisher(config.plant_mqtt, source, agent="edge-pm", site="plant-pm")


def feed(publisher: PlantPublisher, state: int, reason: int, machines: int = 1) -> None:
    now = datetime.now(UTC)
    engine = publisher.source.engine
    for i in range(1, machines + 1):
        engine.feed(Sample(f"press-{i}", "state", state, now))
        engine.feed(Sample(f"press-{i}", "reason", reason, now))
    engine.tick(now + timedelta(microseconds=1))


@contextlib.asynccontextmanager
async def running(publisher: PlantPublisher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(publisher.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(predicate: Callable[[], bool], what: str, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Subscriber:
    def __init__(self, port: int, topic: str) -> None:
        self.got: dict[str, bytes] = {}
        self.retained: dict[str, bool] = {}
        self.history: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got[message.topic] = bytes(message.payload)
            self.history.append((message.topic, bytes(message.payload)))
            self.retained[message.topic] = bool(message.retain)

    def snapshot(self) -> dict[str, bytes]:
        with self.lock:
            return dict(self.got)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    plant = Mosquitto(tmp_path / "broker", persistence=False)
    plant.start()
    yield plant
    plant.kill()


async def test_uns_json_retained_topics_of_the_listed_metrics_only(broker: Mosquitto) -> None:
    publisher = build(
        broker.port,
        "  format: uns\n  uns: {prefix: acme/berlin/pressing}\n  publish_interval: 50ms\n"
        "  publish:\n    press-1: [State, Reason, Shift/OEE]",
    )
    base = "acme/berlin/pressing/line-1/press-1"
    async with running(publisher):
        feed(publisher, 2, 1)
        await until(lambda: publisher.stats.published >= 3, "the first values")
        feed(publisher, 2, 2)
        await until(lambda: publisher.stats.published >= 4, "the changed reason")
    # A client that connects afterwards gets the retained values.
    late = Subscriber(broker.port, "acme/#")
    try:
        await until(lambda: len(late.snapshot()) >= 3, "retained values")
        await asyncio.sleep(0.3)
        got = {t: json.loads(v) for t, v in late.snapshot().items()}
        assert set(got) == {f"{base}/State", f"{base}/Reason", f"{base}/Shift/OEE"}
        assert all(late.retained.values())
    finally:
        late.close()
    assert got[f"{base}/State"]["value"] == "fault"
    assert got[f"{base}/Reason"]["value"] == "no material"
    assert got[f"{base}/Shift/OEE"]["value"] is None
    assert got[f"{base}/Shift/OEE"]["unit"] == "1"
    assert datetime.fromisoformat(got[f"{base}/State"]["timestamp"]).tzinfo is not None


async def test_a_stalled_plant_broker_drops_live_values_and_then_catches_up(
    broker: Mosquitto,
) -> None:
    machines = 100
    proxy = TcpProxy(target_port=broker.port)
    await proxy.start()
    publisher = build(
        proxy.port,
        "  publish_interval: 5ms\n  queue_size: 10\n  keepalive: 300\n  publish:\n"
        + "".join(f"    press-{i}: all\n" for i in range(1, machines + 1)),
        machines,
    )
    host = Subscriber(broker.port, "spBv1.0/plant-pm/#")
    try:
        async with running(publisher) as task:
            await until(lambda: publisher.stats.births == 1, "births")
            proxy.set("stall")
            # The engine is fed all along (a change of every machine every 5 ms): nothing
            # waits for the broker, and what cannot go out is counted.
            for fed in range(300):
                feed(publisher, 2, 1 + fed % 2, machines)
                await asyncio.sleep(0.005)
            assert publisher.stats.dropped > 0, "nothing was dropped while the broker stalled"
            assert not task.done()
            dropped = publisher.stats.dropped
            proxy.set("pass")
            feed(publisher, 2, 1, machines)
            newest = dict(publisher.source.read()["press-7"].values)

            def caught_up() -> bool:
                with host.lock:
                    seen = [
                        r
                        for topic, raw in host.history
                        if topic.endswith("/press-7") and (r := reason_of(raw)) is not None
                    ]
                return bool(seen) and seen[-1] == newest["Reason"]

            await until(caught_up, "the newest reason of press-7 at the host", 60)
            assert publisher.stats.dropped >= dropped
    finally:
        host.close()
        await proxy.stop()


def reason_of(raw: bytes) -> str | None:
    payload = pb.Payload()
    payload.ParseFromString(raw)
    reasons = [m.string_value for m in payload.metrics if m.alias == 1000 * 7 + 2]
    return reasons[-1] if reasons else None


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plant test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "ca.pem", folder / "server.pem", folder / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
async def test_the_plant_broker_over_tls_with_a_user_name(tmp_path: Path) -> None:
    import subprocess

    folder = tmp_path / "tls-broker"
    ca, cert, key = _tls_files(folder)
    passwords = folder / "passwords"
    await asyncio.to_thread(
        subprocess.run,
        ["mosquitto_passwd", "-c", "-b", str(passwords), "edge-01", "plant-secret"],
        check=True,
    )
    extra = "\n".join(
        [
            f"cafile {ca}",
            f"certfile {cert}",
            f"keyfile {key}",
            f"password_file {passwords}",
            "allow_anonymous false",
        ]
    )
    plant = Mosquitto(folder, extra=extra, persistence=False)
    plant.start()
    publisher = build(
        plant.port,
        f"  tls: true\n  ca_file: {ca}\n  username: edge-01\n  password: plant-secret\n"
        "  publish_interval: 50ms\n  publish:\n    press-1: [State]",
    )
    host = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    host.tls_set(ca_certs=str(ca))
    host.username_pw_set("edge-01", "plant-secret")
    births: list[str] = []
    host.on_connect = lambda c, *_: c.subscribe("spBv1.0/#", qos=1)
    host.on_message = lambda c, u, m: births.append(m.topic)
    host.connect("127.0.0.1", plant.port)
    host.loop_start()
    try:
        async with running(publisher):
            await until(
                lambda: "spBv1.0/plant-pm/DBIRTH/edge-pm/press-1" in births, "DBIRTH over TLS"
            )
        wrong = build(
            plant.port,
            f"  tls: true\n  ca_file: {ca}\n  username: edge-01\n  password: wrong-secret\n"
            "  publish:\n    press-1: [State]",
        )
        async with running(wrong) as task:
            await asyncio.sleep(1.5)
            assert wrong.stats.connects == 0 and not task.done()
    finally:
        host.disconnect()
        host.loop_stop()
        plant.kill()
