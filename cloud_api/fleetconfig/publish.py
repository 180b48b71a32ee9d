"""Sign the current configuration of an agent and publish it, retained, on its config topic.

The message is signed with the cloud's current ack-signing key (the key every agent already
trusts for acks, in a context of its own: sync/config_message.py) and published with QoS 1
and the retain flag, so an agent that is offline gets it when it connects again.
"""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt

from cloud_api.config import MqttSettings
from cloud_api.fleetconfig.store import Current
from sync.config_message import ConfigBody, config_topic, sign_config
from sync.keys import CloudKeyring
from sync.uplink import BrokerSettings, make_client

PUBLISH_TIMEOUT_S = 10.0


class PublishError(RuntimeError):
    """The broker did not take the message; the version stays stored and current."""


def signed_message(current: Current, ring: CloudKeyring) -> bytes:
    key_id, key = ring.current_ack
    body = ConfigBody(
        agent_id=current.agent_id,
        site_id=current.site_id,
        version=current.version,
        serial=current.serial,
        digest=current.digest,
        yaml=current.yaml,
        key_id=key_id,
        rollback=current.version if current.rollback else None,
        comment=current.comment[:500],
    )
    return sign_config(body, key)


def _connect_to_any(client: mqtt.Client, addresses: list[tuple[str, int]]) -> None:
    """Connect to the first broker that accepts: a retained message published on one node of
    a cluster reaches the agents on every node."""
    for host, port in addresses:
        try:
            client.connect(host, port, keepalive=30)
            return
        except OSError:
            continue
    names = ", ".join(f"{host}:{port}" for host, port in addresses)
    raise PublishError(f"cannot reach the MQTT broker {names}")


def publish(settings: MqttSettings, current: Current, payload: bytes) -> str:
    """Publish retained with QoS 1 and wait for the broker's PUBACK; returns the topic."""
    topic = config_topic(settings.topic_prefix, current.site_id, current.agent_id)
    client = make_client(
        BrokerSettings(
            host=settings.host,
            port=settings.port,
            username=settings.username,
            password=settings.password,
            tls=settings.tls,
            ca_file=settings.ca_file,
        ),
        "",
    )
    connected = threading.Event()
    client.on_connect = lambda c, u, f, reason, p: (
        connected.set() if not reason.is_failure else None
    )
    _connect_to_any(client, settings.addresses)
    client.loop_start()
    try:
        if not connected.wait(PUBLISH_TIMEOUT_S):
            raise PublishError("the MQTT broker did not accept the connection")
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(PUBLISH_TIMEOUT_S)
        if not info.is_published():
            raise PublishError("the MQTT broker did not acknowledge the message")
    except (RuntimeError, ValueError) as exc:
        if isinstance(exc, PublishError):
            raise
        raise PublishError(str(exc)) from exc
    finally:
        client.disconnect()
        client.loop_stop()
    return topic
