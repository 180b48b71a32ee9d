"""The agent's one YAML file: pydantic models, `${ENV}` substitution, errors with YAML paths.

`load_config(path)` either returns a validated `AgentConfig` or raises `ConfigError` whose
message names each offending YAML path (and its line) with the reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from common.duration import Duration
from connectors.modbus.codec import DataType, Order
from connectors.opcua.config import node_notation_error
from connectors.registry import CONNECTOR_TYPES, Connection
from oee.calendar import ShiftCalendar
from oee.config import (
    CodeMap,
    CounterSpec,
    CycleTime,
    EquipmentSpec,
    ProductSpec,
    ShiftSpec,
    TimeZoneName,
)

# Counter widths by integer type; any other type (float32, ...) counts at 32 bits.
INTEGER_WIDTHS = {
    "int8": 8,
    "uint8": 8,
    "int16": 16,
    "uint16": 16,
    "int32": 32,
    "uint32": 32,
    "int64": 64,
    "uint64": 64,
}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """The configuration file cannot be used; the message is meant for the plant engineer."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgentSection(_Model):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    site: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    timezone: TimeZoneName = "UTC"
    state_dir: Path = Path("/var/lib/edge-agent")
    bucket_seconds: int = Field(default=60, ge=1, le=3600)
    status_interval: Duration = Field(
        default=60.0, description="how often health goes to the cloud"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("bucket_seconds")
    @classmethod
    def _bucket_divides_an_hour(cls, value: int) -> int:
        # Buckets are aligned to UTC hours and sum to shifts; the engine refuses others.
        if 3600 % value:
            divisors = ", ".join(str(d) for d in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900))
            raise ValueError(f"must divide an hour (3600 seconds), e.g. {divisors}, 1800, 3600")
        return value


_CONNECTION_TYPES = tuple(CONNECTOR_TYPES)


class SignalConfig(_Model):
    """Where a signal is read (connector part) and how the engine reads it (OEE part)."""

    address: str | None = None
    node: str | None = Field(
        default=None, description="OPC UA: ns=2;s=..., ns=3;i=..., nsu=URI;s=..., /Objects/2:..."
    )
    type: DataType = "uint16"
    order: Order = "ABCD"
    scale: float = 1.0
    offset: float = 0.0
    bit: int | None = Field(default=None, ge=0, le=15)
    length: int | None = Field(default=None, ge=1, le=125)
    map: CodeMap | None = None
    width: Literal[16, 32, 64] | None = None
    signed: bool | None = None
    max_delta: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _node_notation(self) -> SignalConfig:
        if self.node is not None and (problem := node_notation_error(self.node)):
            raise ValueError(f"node: {problem}")
        return self

    @property
    def width_from_source(self) -> bool:
        """As a counter, whether the data type the PLC declares decides width and sign."""
        return "type" not in self.model_fields_set and self.width is None

    def counter_spec(self, source_type: str | None = None) -> CounterSpec:
        """How the engine reads this signal as a counter. Without `type:` and `width:`, the
        integer type the PLC declares (`source_type`, e.g. an OPC UA node's DataType)
        decides width and sign; otherwise `type:` does (default uint16)."""
        declared: str = self.type
        if self.width_from_source and source_type is not None and source_type in INTEGER_WIDTHS:
            declared = source_type
        width = self.width or INTEGER_WIDTHS.get(declared, 32)
        return CounterSpec(
            width=width,  # type: ignore[arg-type]
            signed=self.signed if self.signed is not None else declared.startswith("int"),
            max_delta=self.max_delta,
        )


SignalName = Literal[
    "state", "total_count", "good_count", "scrap_count", "rework_count", "reason", "product"
]


class EquipmentConfig(_Model):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    line: str | None = None
    connection: str | None = None
    unit: int = Field(default=1, ge=0, le=247)
    ideal_cycle_time: CycleTime
    micro_stop_threshold: Duration | None = None
    micro_stops: Literal["performance", "availability"] = "performance"
    signals: dict[SignalName, SignalConfig]
    products: dict[str, ProductSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _state_needs_map(self) -> EquipmentConfig:
        if "state" not in self.signals:
            raise ValueError("a state signal is required")
        if not self.signals["state"].map:
            raise ValueError("signals.state needs a map from PLC values to states")
        try:
            self.oee_spec()
        except ValidationError as exc:
            problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
            raise ValueError(f"signals: {problems}") from None
        return self

    def oee_spec(self) -> EquipmentSpec:
        def counter(name: str) -> CounterSpec:
            return self.signals[name].counter_spec()  # type: ignore[index]

        state_map = self.signals["state"].map or {}
        reason = self.signals.get("reason")
        product = self.signals.get("product")
        return EquipmentSpec(
            id=self.id,
            line=self.line,
            ideal_cycle_time=self.ideal_cycle_time,
            micro_stop_threshold=self.micro_stop_threshold,
            micro_stops=self.micro_stops,
            state_map=state_map,
            reason_map=(reason.map or {}) if reason else {},
            product_map=(product.map or {}) if product else {},
            products=self.products,
            counters={
                name: counter(name)
                for name in ("total_count", "good_count", "scrap_count", "rework_count")
                if name in self.signals
            },
        )


class MqttConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None
    keepalive: int = Field(default=30, ge=5, le=3600)
    topic_prefix: str = ""


class UplinkConfig(_Model):
    batch_max_events: int = Field(default=1000, ge=1, le=100_000)
    flush_interval: Duration = 1.0
    ack_timeout: Duration = 15.0
    max_in_flight: int = Field(default=16, ge=1, le=1000)
    drain_timeout: Duration = 5.0
    suite: Literal["x25519-hkdfsha256-aes256gcm", "mlkem768x25519-hkdfsha256-aes256gcm"] = (
        "x25519-hkdfsha256-aes256gcm"
    )


class KeysConfig(_Model):
    """Key files; relative paths are under agent.state_dir/keys."""

    dir: Path | None = None


class OutboxConfig(_Model):
    """The durable outbox: where it lives and how much it may hold during an outage."""

    path: Path | None = None
    max_bytes: int = Field(default=2 * 1024**3, ge=16 * 1024)
    # The outbox stops growing when the file system's free space would drop below this.
    min_free_bytes: int = Field(default=256 * 1024**2, ge=0)
    # block: hold new events in memory (the checkpoint on disk stays consistent), retry.
    # shed_samples: delete raw-sample batches first and record the loss; OEE data is never shed.
    when_full: Literal["block", "shed_samples"] = "block"
    # With nothing changing on the line, the time accounted is committed this often: after a
    # crash or power loss at most this much (plus one flush) of observed time is reported as
    # unknown ("agent restarted"); while parts are counted it is one flush. Shorter: a
    # tighter bound, more small writes to the flash (README "Storage").
    heartbeat_interval: Duration = Field(default=60.0, gt=0, le=3600)
    # The engine-state journal is folded into one row per equipment this often.
    snapshot_interval: Duration = Field(default=300.0, gt=0, le=86400)


class RawSamplesConfig(_Model):
    """Optional publishing of raw signal values (`sample` events), filtered by a deadband."""

    enabled: bool = False
    # A numeric value is published when it moved by more than this since the last one sent.
    deadband: float = Field(default=0.0, ge=0.0)
    # Publish an unchanged value again after this long (a heartbeat); unset: never.
    max_interval: Duration | None = None
    # Only these signals (default: every signal of every equipment).
    signals: list[str] | None = None


class HealthConfig(_Model):
    """The local health and metrics endpoint; it listens on the loopback interface only."""

    enabled: bool = True
    port: int = Field(default=9650, ge=1, le=65535)


class AgentConfig(_Model):
    agent: AgentSection
    connections: list[Connection] = Field(default_factory=list)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    uplink: UplinkConfig = Field(default_factory=UplinkConfig)
    keys: KeysConfig = Field(default_factory=KeysConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    raw_samples: RawSamplesConfig = Field(default_factory=RawSamplesConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    shifts: list[ShiftSpec] = Field(default_factory=list)
    equipment: list[EquipmentConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> AgentConfig:
        ids = [e.id for e in self.equipment]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"equipment ids must be unique: {', '.join(dupes)}")
        if info.context and info.context.get("replay"):
            return self  # replay reads no PLC: connections and addresses do not matter
        conn_ids = {c.id for c in self.connections}
        for i, eq in enumerate(self.equipment):
            if eq.connection is not None and eq.connection not in conn_ids:
                raise ValueError(
                    f"equipment[{i}].connection: no connection with id {eq.connection!r}"
                )
        kinds = {c.id: c.type for c in self.connections}
        for i, eq in enumerate(self.equipment):
            if eq.connection is None:
                continue
            where = CONNECTOR_TYPES[kinds[eq.connection]].signal_field
            for name, sig in eq.signals.items():
                if getattr(sig, where) is None:
                    raise ValueError(
                        f"equipment[{i}].signals.{name}: needs `{where}:` "
                        f"(connection {eq.connection!r} is {kinds[eq.connection]})"
                    )
        return self

    @property
    def outbox_path(self) -> Path:
        return self.outbox.path or self.agent.state_dir / "outbox.db"

    @property
    def keys_dir(self) -> Path:
        return self.keys.dir or self.agent.state_dir / "keys"

    def calendar(self) -> ShiftCalendar:
        return ShiftCalendar(self.shifts, self.agent.timezone)

    def oee_specs(self) -> list[EquipmentSpec]:
        return [e.oee_spec() for e in self.equipment]


# -- loading ------------------------------------------------------------------------------


def _substitute(node: Any, path: str, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, f"{path}.{k}" if path else str(k), env) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, f"{path}[{i}]", env) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable {name} is not set")

        return _ENV.sub(replace, node)
    return node


def expand_env(node: Any, path: str) -> Any:
    """`${ENV}` substitution of one part of the file (`path` is its YAML path), for a
    command that needs only that part: other variables may stay unset."""
    return _substitute(node, path, dict(os.environ))


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """YAML path -> 1-based line, so errors can point into the file."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, str(i)))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _format_loc(loc: tuple[int | str, ...]) -> tuple[str, tuple[str, ...]]:
    text = ""
    keys: list[str] = []
    for i, part in enumerate(loc):
        if i == 2 and loc[0] == "connections" and part in _CONNECTION_TYPES:
            continue  # the discriminator tag pydantic puts in the location
        if isinstance(part, int):
            text += f"[{part}]"
            keys.append(str(part))
        elif part in ("function-after", "function-before", "function-plain") or "[" in part:
            continue  # pydantic's internal validator names are not YAML keys
        else:
            text += f".{part}" if text else part
            keys.append(part)
    return text or "(top level)", tuple(keys)


def format_validation_error(exc: ValidationError, source: str, text: str) -> str:
    lines = _line_index(text)
    out = [f"{source}: invalid configuration ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        where, keys = _format_loc(err["loc"])
        line = None
        for n in range(len(keys), -1, -1):
            line = lines.get(keys[:n])
            if line is not None:
                break
        reason = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown key (check the spelling)"
        elif err["type"] == "literal_error":
            reason = f"{err['msg']}, got {err.get('input')!r}"
        suffix = f" (line {line})" if line else ""
        out.append(f"  {where}{suffix}: {reason}")
    return "\n".join(out)


def parse_config(
    text: str,
    source: str = "<config>",
    env: dict[str, str] | None = None,
    *,
    replay: bool = False,
) -> AgentConfig:
    """The validated configuration; `replay=True` leaves connections and addresses unchecked."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with agent, equipment, ... at the top")
    data = _substitute(data, "", dict(os.environ) if env is None else env)
    try:
        return AgentConfig.model_validate(data, context={"replay": replay})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, text)) from None


def load_config(path: Path | str, *, replay: bool = False) -> AgentConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the configuration: {exc.strerror}") from None
    return parse_config(text, str(p), replay=replay)
