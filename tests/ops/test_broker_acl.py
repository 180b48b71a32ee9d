"""The broker's own guard: a Mosquitto started with the listener settings of
deploy/mosquitto/mosquitto.conf and the shipped deploy/mosquitto/acl, with password files
made by mosquitto_passwd.

Absence of a message is shown without waiting out a timer: after the message that must not
arrive, the same publisher sends one the receiver may read (a sentinel). Mosquitto delivers
one publisher's messages to a subscriber in order, so once the sentinel is in, the refused
message would have been in before it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from connectors.modbus.simulator import Press, PressLine
from sync.keys import CloudKeyring
from sync.uplink import ack_topic, batch_topic
from tests.conftest import enroll, free_port, make_agent_keys
from tests.faults.harness import EQUIPMENT

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
BIN = Path(sys.executable).parent
TLS_ONLY = ("cafile", "certfile", "keyfile", "tls_version", "require_certificate")
LIMIT_S = 20.0

pytestmark = pytest.mark.skipif(
    shutil.which("mosquitto") is None or shutil.which("mosquitto_passwd") is None,
    reason="mosquitto and mosquitto_passwd are needed (apt-get install mosquitto)",
)


@dataclass
class GuardedBroker:
    """The shipped broker set-up on free loopback ports, without TLS."""

    folder: Path
    cloud_port: int = 0
    agent_port: int = 0
    passwords: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.folder / "mosquitto.log"

    def render(self) -> str:
        """deploy/mosquitto/mosquitto.conf with test ports, files and log; TLS lines dropped
        (the agent listener keeps every other setting, use_username_as_clientid included)."""
        out: list[str] = [*(["user root"] if os.geteuid() == 0 else [])]
        ports = iter((self.cloud_port, self.agent_port))
        for raw in (DEPLOY / "mosquitto.conf").read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            key, _, value = line.partition(" ")
            if not line or line.startswith("#") or key in TLS_ONLY:
                continue
            if key == "listener":
                line = f"listener {next(ports)} 127.0.0.1"
            elif key == "password_file":
                line = f"password_file {self.folder / Path(value).name}"
            elif key == "acl_file":
                line = f"acl_file {DEPLOY / Path(value).name}"
            elif key == "persistence_location":
                line = f"persistence_location {self.folder}/"
            elif key == "log_dest":
                line = f"log_dest file {self.log}"
            out.append(line)
        assert next(ports, None) is None, "the shipped config has a cloud and an agent listener"
        return "\n".join(out) + "\n"

    def add_user(self, file: str, username: str) -> None:
        password = secrets.token_urlsafe(12)
        path = self.folder / file
        create = [] if path.exists() else ["-c"]
        subprocess.run(
            ["mosquitto_passwd", *create, "-b", str(path), username, password],
            check=True,
            capture_output=True,
        )
        path.chmod(0o600)
        self.passwords[username] = password

    def start(self) -> None:
        self.cloud_port, self.agent_port = free_port(), free_port()
        conf = self.folder / "mosquitto.conf"
        conf.write_text(self.render(), encoding="utf-8")
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait(lambda: port_open(self.agent_port) and port_open(self.cloud_port), "mosquitto up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait(predicate: Callable[[], bool], what: str, limit_s: float = LIMIT_S) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Peer:
    """One MQTT 5 client that records what the broker tells it; never reconnects by itself."""

    def __init__(self, port: int, username: str | None, password: str | None, client_id: str):
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.port = port
        self.lock = threading.Lock()
        self.connacks: list[ReasonCode] = []
        self.disconnects: list[ReasonCode] = []
        self.messages: list[tuple[str, bytes]] = []
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        with self.lock:
            self.connacks.append(rc)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        with self.lock:
            self.disconnects.append(rc)

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self.lock:
            self.pubacks[mid] = rc

    def _on_subscribe(
        self, _c: Any, _u: Any, mid: int, codes: list[ReasonCode], _p: Properties | None
    ) -> None:
        with self.lock:
            self.subacks[mid] = list(codes)

    def connect(self) -> ReasonCode:
        """Connect and wait for the CONNACK (or the broker closing the connection)."""
        self.client.connect(host="127.0.0.1", port=self.port, keepalive=30)
        self.client.loop_start()
        wait(lambda: bool(self.connacks or self.disconnects), "a CONNACK")
        return self.connacks[0] if self.connacks else self.disconnects[0]

    def subscribe(self, topic: str) -> list[ReasonCode]:
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        wait(lambda: mid in self.subacks, f"the SUBACK of {topic}")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish at QoS 1; the PUBACK's reason code, or the reason the connection closed."""
        info = self.client.publish(topic, payload, qos=1)
        wait(lambda: info.mid in self.pubacks or bool(self.disconnects), f"a PUBACK on {topic}")
        return self.pubacks.get(info.mid) or self.disconnects[0]

    def received(self, payload: bytes) -> bool:
        with self.lock:
            return any(p == payload for _, p in self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[GuardedBroker]:
    b = GuardedBroker(tmp_path / "broker")
    b.folder.mkdir()
    for agent in ("agent-a", "agent-b"):
        b.add_user("passwd-agents", agent)
    b.add_user("passwd-cloud", "cloud-ingest")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def peers(broker: GuardedBroker) -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(listener: str, username: str | None, *, password: str | None = None,
             client_id: str = "") -> Peer:  # fmt: skip
        port = broker.agent_port if listener == "agent" else broker.cloud_port
        secret = password if password is not None else broker.passwords.get(username or "")
        peer = Peer(port, username, secret, client_id or f"peer-{secrets.token_hex(3)}")
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


# The agents' own client ids (sync/uplink.py's default) and topics.
A_ID, B_ID = "edge-site-a-agent-a", "edge-site-b-agent-b"
A_BATCHES, B_BATCHES = batch_topic("", "site-a", "agent-a"), batch_topic("", "site-b", "agent-b")
A_ACKS, B_ACKS = ack_topic("", "site-a", "agent-a"), ack_topic("", "site-b", "agent-b")


def test_logins_are_required_and_bound_to_their_listener(
    broker: GuardedBroker, peers: Callable[..., Peer]
) -> None:
    for listener in ("agent", "cloud"):
        assert peers(listener, None).connect() == "Not authorized", listener
    # An agent's username with another agent's password.
    wrong = peers("agent", "agent-a", password=broker.passwords["agent-b"])
    assert wrong.connect() == "Not authorized"
    # Agent logins do not work on the cloud listener, the cloud's not on the agents'.
    assert peers("cloud", "agent-a").connect() == "Not authorized"
    assert peers("agent", "cloud-ingest").connect() == "Not authorized"
    assert peers("agent", "agent-a", client_id=A_ID).connect() == "Success"


def test_an_agent_cannot_publish_on_another_agents_topics(peers: Callable[..., Peer]) -> None:
    ingest = peers("cloud", "cloud-ingest")
    assert ingest.connect() == "Success"
    assert ingest.subscribe("edge/#") == ["Granted QoS 1"]
    a, b = peers("agent", "agent-a", client_id=A_ID), peers("agent", "agent-b", client_id=B_ID)
    assert a.connect() == b.connect() == "Success"
    a_listens = a.subscribe(A_ACKS)
    assert a_listens == ["Granted QoS 1"]

    # B forges a batch as A (under A's site and under its own), and an ack for A.
    for topic in (A_BATCHES, batch_topic("", "site-b", "agent-a"), A_ACKS):
        assert b.publish(topic, b"forged by b on " + topic.encode()) == "Not authorized", topic
    assert b.publish(B_BATCHES, b"b's own batch") == "Success"
    assert a.publish(A_BATCHES, b"a's own batch") == "Success"
    # A's own batch came in after B's forgeries on the ingest side; A's own ack sentinel
    # (from the cloud) after B's forged ack on A's side.
    wait(lambda: ingest.received(b"b's own batch") and ingest.received(b"a's own batch"),
         "the agents' own batches at ingest")  # fmt: skip
    assert ingest.publish(A_ACKS, b"ack for a") == "Success"
    wait(lambda: a.received(b"ack for a"), "the cloud's ack at agent a")
    assert not any(p.startswith(b"forged") for _, p in ingest.messages), ingest.messages
    assert a.messages == [(A_ACKS, b"ack for a")]


def test_an_agent_cannot_read_another_agents_acks(peers: Callable[..., Peer]) -> None:
    ingest = peers("cloud", "cloud-ingest")
    a, b = peers("agent", "agent-a", client_id=A_ID), peers("agent", "agent-b", client_id=B_ID)
    assert ingest.connect() == a.connect() == b.connect() == "Success"
    assert a.subscribe(A_ACKS) == ["Granted QoS 1"]
    # Whatever the broker answers to these filters, nothing of A's may reach B through them.
    for topic in (A_ACKS, "edge/+/agent-a/v1/acks", "edge/#", "#", A_BATCHES):
        b.subscribe(topic)
    assert b.subscribe(B_ACKS) == ["Granted QoS 1"]

    assert ingest.publish(A_ACKS, b"ack for a") == "Success"
    assert a.publish(A_BATCHES, b"a's batch") == "Success"
    assert ingest.publish(B_ACKS, b"ack for b") == "Success"
    wait(lambda: b.received(b"ack for b") and a.received(b"ack for a"), "both acks delivered")
    # B's overlapping filters each deliver its own ack; nothing else ever arrives.
    assert set(b.messages) == {(B_ACKS, b"ack for b")}


def test_an_agent_cannot_take_over_another_agents_session(
    broker: GuardedBroker, peers: Callable[..., Peer]
) -> None:
    """Mosquitto 2.0 alone lets any logged-in client connect with another's client id (the
    first connection is closed and its session handed over); use_username_as_clientid on the
    agent listener makes the broker use B's username as B's client id instead."""
    ingest = peers("cloud", "cloud-ingest")
    a = peers("agent", "agent-a", client_id=A_ID)
    assert ingest.connect() == a.connect() == "Success"
    assert ingest.subscribe(A_BATCHES) == a.subscribe(A_ACKS) == ["Granted QoS 1"]
    for stolen_id in (A_ID, "agent-a"):
        b = peers("agent", "agent-b", client_id=stolen_id)
        assert b.connect() == "Success"
        b.subscribe(A_ACKS)
        # A is still on its first connection: its QoS 1 round trip works, nothing closed it.
        assert a.publish(A_BATCHES, b"a still here " + stolen_id.encode()) == "Success"
        assert a.connacks == ["Success"] and a.disconnects == [], stolen_id
        b.close()
    # A's session still receives its acks and B's sessions never got them.
    assert ingest.publish(A_ACKS, b"ack for a") == "Success"
    wait(lambda: a.received(b"ack for a"), "the ack at agent a")
    log = broker.log.read_text(errors="replace")
    assert "already connected, closing old connection" not in log
    assert "as agent-b (" in log  # B got its own username as client id


# -- the real agent and the real ingest through the guarded broker ----------------------------

AGENT_CONFIG = """
agent:
  id: agent-a
  site: site-a
  timezone: UTC
  state_dir: {state}
  bucket_seconds: 2
connections:
  - id: plc
    type: modbus
    host: 127.0.0.1
    port: {plc_port}
    poll_interval: 100ms
    timeout: 1s
mqtt:
  host: 127.0.0.1
  port: {mqtt_port}
  username: agent-a
  password: "{password}"
  keepalive: 5
uplink:
  flush_interval: 200ms
  ack_timeout: 2s
health:
  port: {health_port}
shifts:
  - name: all-day
    start: "00:00"
    end: "00:00"
equipment:
{equipment}"""


def spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"}
        )


async def test_agent_and_ingest_work_through_the_guarded_broker(
    tmp_path: Path, broker: GuardedBroker, pg_url: str, cloud_keys: CloudKeyring
) -> None:
    """`edge-agent run` logs in as agent-a on the agent listener, `cloud-api ingest` as
    cloud-ingest on the cloud listener ($share subscription): batches are stored and their
    acks come back, so the agent empties its outbox of them."""
    state = tmp_path / "agent"
    enroll(pg_url, "agent-a", "site-a", make_agent_keys(state / "keys", cloud_keys))
    press = Press(seed=3, time_scale=0.05, cycle_time=0.1)
    plc_port = free_port()
    line = PressLine([press], port=plc_port)
    await line.start(tick=0.05)
    config = tmp_path / "agent.yaml"
    health_port = free_port()
    config.write_text(
        AGENT_CONFIG.format(
            state=state,
            plc_port=plc_port,
            mqtt_port=broker.agent_port,
            password=broker.passwords["agent-a"],
            equipment=EQUIPMENT.format(unit=1),
            health_port=health_port,
        ),
        encoding="utf-8",
    )
    env = {
        **os.environ,
        "CLOUD_DATABASE_URL": pg_url,
        "CLOUD_MQTT_HOST": "127.0.0.1",
        "CLOUD_MQTT_PORT": str(broker.cloud_port),
        "CLOUD_MQTT_USERNAME": "cloud-ingest",
        "CLOUD_MQTT_PASSWORD": broker.passwords["cloud-ingest"],
        "CLOUD_KEYS_DIR": str(tmp_path / "cloud-keys"),
    }
    logs = tmp_path / "agent.log", tmp_path / "ingest.log"
    ingest = spawn([str(BIN / "cloud-api"), "ingest"], logs[1], env)
    agent = spawn([str(BIN / "edge-agent"), "run", "-c", str(config)], logs[0], {**os.environ})
    try:

        def stored_and_acked() -> bool:
            with psycopg.connect(pg_url) as conn:
                stored = conn.execute(
                    "SELECT count(*) FROM facts.batches WHERE agent_id = 'agent-a' AND seq <= 3"
                ).fetchone()
            if stored != (3,):
                return False
            # The running agent's outbox (it holds the file exclusively): none of the first
            # three batches is still waiting for its ack.
            try:
                report = httpx.get(f"http://127.0.0.1:{health_port}/outbox", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return False
            oldest = report["oldest_unacked_seq"]
            return oldest is None or int(oldest) > 3

        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(stored_and_acked):
            if time.monotonic() > deadline or agent.poll() is not None or ingest.poll():
                raise AssertionError(
                    "agent-a's first batches were not stored and acked:\n"
                    + "\n".join(p.read_text(errors="replace")[-2000:] for p in logs)
                    + broker.log.read_text(errors="replace")[-2000:]
                )
            await asyncio.sleep(0.2)
    finally:
        for proc in (agent, ingest):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (agent, ingest):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        await line.stop()
    log = broker.log.read_text(errors="replace")
    assert "as agent-a (" in log and "u'cloud-ingest'" in log
