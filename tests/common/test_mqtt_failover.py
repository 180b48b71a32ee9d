"""The MQTT link of agent and ingest moves between the nodes it is given: two real Mosquitto
processes, one of them killed, and an address where nothing listens."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from common.mqtt import BrokerSettings, MqttLink
from tests.conftest import free_port
from tests.faults.harness import Mosquitto

LIMIT_S = 60  # generous: a loaded machine may take long; nothing here measures speed


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    a, b = Mosquitto(tmp_path / "a"), Mosquitto(tmp_path / "b")
    a.start()
    b.start()
    yield a, b
    a.kill()
    b.kill()


class Observed:
    """What a link reports: connection changes (with the address) and messages."""

    def __init__(self) -> None:
        self.link: MqttLink | None = None
        self.connections: queue.Queue[tuple[bool, tuple[str, int]]] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()

    def on_connection(self, up: bool) -> None:
        assert self.link is not None
        self.connections.put((up, self.link.address))

    def next_connection(self) -> tuple[bool, tuple[str, int]]:
        return self.connections.get(timeout=LIMIT_S)


def publish_once(port: int, topic: str, payload: bytes) -> None:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(LIMIT_S)
    finally:
        client.disconnect()
        client.loop_stop()


def start_link(settings: BrokerSettings, observed: Observed) -> MqttLink:
    link = MqttLink(
        settings,
        "failover-test",
        ["t/failover"],
        on_message=lambda topic, payload: observed.messages.put((topic, payload)),
        on_connection=observed.on_connection,
    )
    observed.link = link
    link.start()
    return link


def test_a_lost_node_is_left_for_the_next_and_the_subscription_follows(
    nodes: tuple[Mosquitto, Mosquitto],
) -> None:
    a, b = nodes
    observed = Observed()
    link = start_link(
        BrokerSettings(host="127.0.0.1", port=a.port, failover=(("127.0.0.1", b.port),)),
        observed,
    )
    try:
        assert observed.next_connection() == (True, ("127.0.0.1", a.port))
        a.kill()
        assert observed.next_connection() == (False, ("127.0.0.1", a.port))
        assert observed.next_connection() == (True, ("127.0.0.1", b.port))
        # Subscribed again on the node reached: a message published there arrives. The
        # SUBACK may trail the connection, so publish until one arrives.
        for _ in range(LIMIT_S):
            publish_once(b.port, "t/failover", b"on b")
            try:
                message = observed.messages.get(timeout=1)
                break
            except queue.Empty:
                continue
        else:
            raise AssertionError("no message through node B")
        assert message == ("t/failover", b"on b")
        # B dies, A is back: round the list again.
        a.start()
        b.kill()
        assert observed.next_connection() == (False, ("127.0.0.1", b.port))
        assert observed.next_connection() == (True, ("127.0.0.1", a.port))
    finally:
        link.stop()


def test_an_unreachable_first_address_is_passed_over_at_start(
    nodes: tuple[Mosquitto, Mosquitto],
) -> None:
    _, b = nodes
    observed = Observed()
    nobody = free_port()  # nothing listens there
    link = start_link(
        BrokerSettings(host="127.0.0.1", port=nobody, failover=(("127.0.0.1", b.port),)),
        observed,
    )
    try:
        assert observed.next_connection() == (True, ("127.0.0.1", b.port))
    finally:
        link.stop()


def test_one_address_stays_where_it_is(nodes: tuple[Mosquitto, Mosquitto]) -> None:
    a, _ = nodes
    settings = BrokerSettings(host="127.0.0.1", port=a.port)
    assert settings.addresses == [("127.0.0.1", a.port)]
    observed = Observed()
    link = start_link(settings, observed)
    try:
        assert observed.next_connection() == (True, ("127.0.0.1", a.port))
        a.kill()
        assert observed.next_connection() == (False, ("127.0.0.1", a.port))
        a.start()
        assert observed.next_connection() == (True, ("127.0.0.1", a.port))
    finally:
        link.stop()
