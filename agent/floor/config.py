"""The `plant_mqtt:` and `opcua_server:` blocks of the agent's YAML (both off unless present).

The plant broker is not the cloud uplink's broker: it carries plain, unsealed live values for
the plant's own systems, so it has its own block, credentials and TLS settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.floor.live import METRIC_NAMES
from common.duration import Duration

# MQTT topic levels may not hold these (Sparkplug 3.0 tck-id-topic-structure-*).
_TOPIC_ID = r"^[^/+#\s]+$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class SparkplugConfig(_Model):
    """The Sparkplug B 3.0 identity of the agent on the plant broker."""

    group_id: str | None = Field(default=None, pattern=_TOPIC_ID, description="default: agent.site")
    edge_node_id: str | None = Field(
        default=None, pattern=_TOPIC_ID, description="default: agent.id"
    )
    primary_host_id: str | None = Field(
        default=None,
        pattern=_TOPIC_ID,
        description="publish only while this host application's STATE is online",
    )


class UnsConfig(_Model):
    """Plain unified-namespace JSON: retained `{prefix}/{line}/{equipment}/{metric}` topics."""

    prefix: str = Field(
        min_length=1,
        pattern=r"^[^+#\s]+$",
        description="enterprise/site/area, e.g. acme/berlin/pressing",
    )


class PlantMqttConfig(_Model):
    """The plant broker (`plant_mqtt:`): Sparkplug B edge node or plain UNS JSON."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None
    keepalive: int = Field(default=30, ge=5, le=3600)
    client_id: str | None = None
    format: Literal["sparkplug", "uns"] = "sparkplug"
    sparkplug: SparkplugConfig = Field(default_factory=SparkplugConfig)
    uns: UnsConfig | None = None
    # How often the live values are compared with what was published; changes go out then.
    publish_interval: Duration = Field(default=1.0, gt=0, le=3600)
    # Messages waiting for the broker; when full the oldest live value is dropped (counted).
    queue_size: int = Field(default=1000, ge=10, le=1_000_000)
    reconnect_min: Duration = Field(default=1.0, gt=0)
    reconnect_max: Duration = Field(default=60.0, gt=0)
    # Equipment id -> the metrics published for it (`all` or a list). Nothing else is published.
    publish: dict[str, MetricSelection] = Field(min_length=1)
    # The agent's own values on the node (Outbox/Depth).
    node_metrics: bool = True

    @field_validator("publish")
    @classmethod
    def _known_metrics(cls, value: dict[str, MetricSelection]) -> dict[str, MetricSelection]:
        return _check_selection(value)

    @model_validator(mode="after")
    def _format_fits(self) -> PlantMqttConfig:
        if self.format == "uns" and self.uns is None:
            raise ValueError("format uns needs a `uns: {prefix: enterprise/site/area}` block")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        return self


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


class OpcUaUser(_Model):
    username: str = Field(min_length=1)
    password: str = Field(min_length=8, repr=False)


class OpcUaServerConfig(_Model):
    """The agent's own OPC UA server (`opcua_server:`): read-only live values for HMIs."""

    endpoint: str = Field(
        default="opc.tcp://0.0.0.0:4840", pattern=r"^opc\.tcp://[^/\s]+:\d+(/.*)?$"
    )
    application_uri: str = "urn:factory-edge-gateway:edge-agent:server"
    namespace: str = "urn:factory-edge-gateway:plant-floor"
    # `None` only when listed here; a secure policy needs a certificate.
    security: list[OpcUaServerPolicy] = Field(default_factory=_default_security, min_length=1)
    certificate: Path | None = Field(
        default=None, description="DER; default: opcua-server.der in the keys directory"
    )
    private_key: Path | None = Field(
        default=None, description="PEM; default: opcua-server.pem in the keys directory"
    )
    trusted_clients: Path | None = Field(
        default=None,
        description="folder of trusted client certificates (DER or PEM); unset: any client "
        "certificate is accepted for the secure channel (users still log in)",
    )
    users: list[OpcUaUser] = Field(default_factory=list)
    anonymous: bool = False
    # Equipment served (default: all configured equipment).
    equipment: list[str] | None = None
    update_interval: Duration = Field(default=1.0, gt=0, le=3600)

    @field_validator("security")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a policy is listed twice")
        return value

    @model_validator(mode="after")
    def _someone_can_log_in(self) -> OpcUaServerConfig:
        if not self.users and not self.anonymous:
            raise ValueError("no way to log in: list `users:` or set `anonymous: true`")
        names = [u.username for u in self.users]
        if len(set(names)) != len(names):
            raise ValueError("users: a user name is listed twice")
        return self

    @property
    def secure(self) -> bool:
        return any(p != "None" for p in self.security)
