"""The `plant_mqtt:` and `opcua_server:` blocks of the agent's YAML (both off unless present).

The plant broker is not the cloud uplink's broker: it carries plain, unsealed live values for
the plant's own systems, so it has its own block, credentials and TLS settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from agent.floor.live import METRIC_NAMES
from common.checks import FORBID, After, Check
from common.duration import Duration

# MQTT topic levels may not hold these (Sparkplug 3.0 tck-id-topic-structure-*).
_TOPIC_ID = r"^[^/+#\s]+$"


@dataclass(kw_only=True)
class _Model:
    __pydantic_config__: ClassVar[dict[str, object]] = FORBID


MetricSelection = Literal["all"] | list[str]


def _check_selection(publish: dict[str, MetricSelection]) -> dict[str, MetricSelection]:
    for eq, metrics in publish.items():
        if metrics == "all":
            continue
        unknown = [m for m in metrics if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(
                f"{eq}: unknown metric(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(METRIC_NAMES)}"
            )
        if not metrics:
            raise ValueError(f"{eq}: lists no metric (leave the equipment out instead)")
    return publish


def selected(selection: MetricSelection) -> list[str]:
    """The metric names a selection stands for, in METRICS order."""
    if selection == "all":
        return list(METRIC_NAMES)
    return [m for m in METRIC_NAMES if m in selection]


TopicId = Annotated[str, Check(pattern=_TOPIC_ID)]


@dataclass(kw_only=True)
class SparkplugConfig(_Model):
    """The Sparkplug B 3.0 identity of the agent on the plant broker."""

    group_id: TopicId | None = None  # default: agent.site
    edge_node_id: TopicId | None = None  # default: agent.id
    # publish only while this host application's STATE is online
    primary_host_id: TopicId | None = None


@dataclass(kw_only=True)
class UnsConfig(_Model):
    """Plain unified-namespace JSON: retained `{prefix}/{line}/{equipment}/{metric}` topics."""

    # enterprise/site/area, e.g. acme/berlin/pressing
    prefix: Annotated[str, Check(min_length=1, pattern=r"^[^+#\s]+$")]


@dataclass(kw_only=True)
class PlantMqttConfig(_Model):
    """The plant broker (`plant_mqtt:`): Sparkplug B edge node or plain UNS JSON."""

    host: str = "127.0.0.1"
    port: Annotated[int, Check(ge=1, le=65535)] = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None
    keepalive: Annotated[int, Check(ge=5, le=3600)] = 30
    client_id: str | None = None
    format: Literal["sparkplug", "uns"] = "sparkplug"
    sparkplug: SparkplugConfig = field(default_factory=SparkplugConfig)
    uns: UnsConfig | None = None
    # How often the live values are compared with what was published; changes go out then.
    publish_interval: Annotated[Duration, Check(gt=0, le=3600)] = 1.0
    # Messages waiting for the broker; when full the oldest live value is dropped (counted).
    queue_size: Annotated[int, Check(ge=10, le=1_000_000)] = 1000
    reconnect_min: Annotated[Duration, Check(gt=0)] = 1.0
    reconnect_max: Annotated[Duration, Check(gt=0)] = 60.0
    # Equipment id -> the metrics published for it (`all` or a list). Nothing else is published.
    publish: Annotated[dict[str, MetricSelection], Check(min_length=1), After(_check_selection)]
    # The agent's own values on the node (Outbox/Depth).
    node_metrics: bool = True

    def __post_init__(self) -> None:
        if self.format == "uns" and self.uns is None:
            raise ValueError("format uns needs a `uns: {prefix: enterprise/site/area}` block")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")


OpcUaServerPolicy = Literal[
    "None",
    "Basic256Sha256_Sign",
    "Basic256Sha256_SignAndEncrypt",
    "Aes128Sha256RsaOaep_Sign",
    "Aes128Sha256RsaOaep_SignAndEncrypt",
    "Aes256Sha256RsaPss_Sign",
    "Aes256Sha256RsaPss_SignAndEncrypt",
]


def _default_security() -> list[OpcUaServerPolicy]:
    return ["Basic256Sha256_SignAndEncrypt"]


@dataclass(kw_only=True)
class OpcUaUser(_Model):
    username: Annotated[str, Check(min_length=1)]
    password: Annotated[str, Check(min_length=8)] = field(repr=False)


def _unique(value: list[str]) -> list[str]:
    if len(set(value)) != len(value):
        raise ValueError("a policy is listed twice")
    return value


@dataclass(kw_only=True)
class OpcUaServerConfig(_Model):
    """The agent's own OPC UA server (`opcua_server:`): read-only live values for HMIs."""

    endpoint: Annotated[str, Check(pattern=r"^opc\.tcp://[^/\s]+:\d+(/.*)?$")] = (
        "opc.tcp://0.0.0.0:4840"
    )
    application_uri: str = "urn:factory-edge-gateway:edge-agent:server"
    namespace: str = "urn:factory-edge-gateway:plant-floor"
    # `None` only when listed here; a secure policy needs a certificate.
    security: Annotated[list[OpcUaServerPolicy], Check(min_length=1), After(_unique)] = field(
        default_factory=_default_security
    )
    certificate: Path | None = None  # DER; default: opcua-server.der in the keys directory
    private_key: Path | None = None  # PEM; default: opcua-server.pem in the keys directory
    # Folder of trusted client certificates (DER or PEM); unset: any client certificate is
    # accepted for the secure channel (users still log in).
    trusted_clients: Path | None = None
    users: list[OpcUaUser] = field(default_factory=list)
    anonymous: bool = False
    # Equipment served (default: all configured equipment).
    equipment: list[str] | None = None
    update_interval: Annotated[Duration, Check(gt=0, le=3600)] = 1.0

    def __post_init__(self) -> None:
        if not self.users and not self.anonymous:
            raise ValueError("no way to log in: list `users:` or set `anonymous: true`")
        names = [u.username for u in self.users]
        if len(set(names)) != len(names):
            raise ValueError("users: a user name is listed twice")

    @property
    def secure(self) -> bool:
        return any(p != "None" for p in self.security)
