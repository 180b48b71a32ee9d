"""The MQTT client of both sides: the agent's uplink (asyncio) and the cloud's ingest (threads).

One paho 2.x MQTT 5 client per `MqttLink`, its network loop in paho's own thread (started by
`start()`, ended by `stop()`), reconnecting by itself (1 s up to 30 s). On every connect the
link subscribes again to its subscriptions (QoS 1; a list, or a callable asked at each
connect for owners that add a topic after construction): the sessions are clean, so after a
reconnect the broker knows nothing of earlier subscriptions. A refused connection or
subscription is logged here, once per event; the owner is told of the rest through plain
callbacks that run in paho's thread and must only hand work on (the uplink to its event loop
with `call_soon_threadsafe`, ingest to its bounded queue):

    on_message(topic, payload)   a message of the subscription
    on_connection(up)            connected, subscription sent (True), or connection lost (False)
    on_subscribed()              the broker acknowledged the subscription (SUBACK)

Publishing (`publish`) is QoS 1 and returns paho's message info at once.

Failover: the settings may name more than one broker (`BrokerSettings.addresses`, the nodes
of one cluster, e.g. EMQX or HiveMQ). The link connects to the first; each time a connection
is lost or an attempt fails it moves on to the next address in turn (wrapping around), so a
dead node is left after one reconnect delay and no node is tried twice in a row while
another is listed. Nothing the owner holds is tied to a node: subscriptions are sent again on
every connect, and the uplink resends its unacked batches to whichever node it reaches.

Why paho's thread and not aiomqtt (paho driven from the event loop): ingest is threaded (its
workers block in psycopg, and a full queue blocks paho's thread as back-pressure on the
broker), so only the uplink could move to aiomqtt, and the two sides would again hold two
clients. One client module with plain callbacks serves both.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from common.checks import FORBID, After, Check

RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30


@dataclass
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    keepalive: int = 30
    client_id: str = ""
    # The other nodes of the cluster, tried in turn after (host, port) when a connection is
    # lost or refused.
    failover: tuple[tuple[str, int], ...] = ()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every broker address in the order they are tried, (host, port) first."""
        return [(self.host, self.port), *self.failover]


@dataclass(kw_only=True)
class BrokerAddress:
    """One node of a broker cluster."""

    __pydantic_config__: ClassVar[dict[str, object]] = FORBID

    host: Annotated[str, Check(min_length=1)]
    port: Annotated[int, Check(ge=1, le=65535)] = 1883


def _each_broker_once(value: list[BrokerAddress] | None) -> list[BrokerAddress] | None:
    seen: dict[tuple[str, int], int] = {}
    for i, broker in enumerate(value or []):
        key = (broker.host, broker.port)
        if key in seen:
            raise ValueError(f"{broker.host}:{broker.port} is listed twice ([{seen[key]}], [{i}])")
        seen[key] = i
    return value


def _one_way_to_name_the_broker(data: Any) -> Any:
    if isinstance(data, dict) and data.get("brokers") is not None:
        both = sorted({"host", "port"} & data.keys())
        if both:
            given = " and ".join(both)
            raise ValueError(
                f"{given} and brokers both given: list every broker under brokers "
                "(e.g. brokers: [{host: node-1, port: 1883}, {host: node-2}]) and drop "
                f"{given}"
            )
    return data


@dataclass(kw_only=True)
class BrokerChoice:
    """Where a YAML's `mqtt:` section points (agent and cloud): one broker (`host`, `port`)
    or the nodes of a cluster (`brokers`, in the order they are tried), never both."""

    __pydantic_config__: ClassVar[dict[str, object]] = FORBID

    host: Annotated[str, Check(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Check(ge=1, le=65535)] = 1883
    brokers: Annotated[
        list[BrokerAddress] | None, Check(min_length=1), After(_each_broker_once)
    ] = None

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        # `host`/`port` and `brokers` are told apart by what the file says, before defaults.
        from pydantic_core import core_schema

        return core_schema.no_info_before_validator_function(
            _one_way_to_name_the_broker, handler(source)
        )

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The broker addresses in the order they are tried."""
        if self.brokers is None:
            return [(self.host, self.port)]
        return [(b.host, b.port) for b in self.brokers]

    def endpoints(self) -> dict[str, Any]:
        """`host`, `port` and `failover` of `BrokerSettings` for these addresses."""
        (host, port), *failover = self.addresses
        return {"host": host, "port": port, "failover": tuple(failover)}


def make_client(settings: BrokerSettings, client_id: str) -> mqtt.Client:
    """A paho 2.x MQTT 5 client with credentials and TLS from the settings."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        context = ssl.create_default_context(cafile=settings.ca_file)
        client.tls_set_context(context)
    client.reconnect_delay_set(min_delay=RECONNECT_MIN_S, max_delay=RECONNECT_MAX_S)
    return client


MessageHandler = Callable[[str, bytes], None]


class MqttLink:
    """One client with its QoS 1 subscriptions, renewed on every connect."""

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str,
        subscriptions: Sequence[str] | Callable[[], Sequence[str]],
        *,
        on_message: MessageHandler,
        on_connection: Callable[[bool], None] | None = None,
        on_subscribed: Callable[[], None] | None = None,
        log: Any = None,
    ) -> None:
        self.settings = settings
        self._subscriptions = subscriptions
        self._on_message_cb = on_message
        self._on_connection_cb = on_connection
        self._on_subscribed_cb = on_subscribed
        self._log = log if log is not None else structlog.get_logger("common.mqtt")
        self.client = make_client(settings, client_id)
        self._addresses = settings.addresses
        self._current = 0  # index into _addresses; moved only in paho's thread
        self._stopping = False
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # -- paho thread ------------------------------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._log.warning("broker refused connection", reason=str(reason))
            return
        # Subscribed before the owner hears of the connection: the uplink publishes as soon
        # as it does, and an ack must not come back before the subscription that receives it.
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        if self._on_connection_cb is not None:
            self._on_connection_cb(True)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._on_connection_cb is not None:
            self._on_connection_cb(False)  # `address` is still the broker lost
        self._next_address()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._next_address()

    def _next_address(self) -> None:
        """After a lost connection or a failed attempt: the next reconnect goes to the next
        broker. paho reconnects to the address last given to `connect_async` (its `host`
        setter refuses while paho is between connections), so the address is given again;
        not while stopping, where `connect_async` would restart the connection."""
        if len(self._addresses) < 2 or self._stopping:
            return
        self._current = (self._current + 1) % len(self._addresses)
        host, port = self._addresses[self._current]
        self.client.connect_async(host, port, keepalive=self.settings.keepalive)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        # A refused subscription (broker ACL) leaves the owner deaf: say so, never "ready".
        if any(r.is_failure for r in reasons):
            self._log.error(
                "subscription refused", subscription=self.subscriptions, reason=str(reasons)
            )
            return
        if self._on_subscribed_cb is not None:
            self._on_subscribed_cb()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._on_message_cb(message.topic, bytes(message.payload))

    # -- owner ------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The broker connected to (within `on_connection`: the one connected or lost), or
        the one tried next while disconnected."""
        return self._addresses[self._current]

    @property
    def subscriptions(self) -> list[str]:
        topics = self._subscriptions
        return list(topics() if callable(topics) else topics)

    def start(self) -> None:
        """Connect in the background (and keep reconnecting) from paho's network thread."""
        host, port = self.address
        self.client.connect_async(host, port, keepalive=self.settings.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos)


__all__ = [
    "BrokerAddress",
    "BrokerChoice",
    "BrokerSettings",
    "MessageHandler",
    "MqttLink",
    "make_client",
]
