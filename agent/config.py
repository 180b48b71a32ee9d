"""The agent's one YAML file: dataclasses, `${ENV}` substitution, errors with YAML paths.

`load_config(path)` either returns a validated `AgentConfig` or raises `ConfigError` whose
message names each offending YAML path (and its line) with the reason. pydantic validates the
file into the dataclasses (`common.checks`) and is imported only then: the running agent gets
its configuration from `agent.configcheck`, in a process of its own, and never imports it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Literal,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from agent.floor.config import OpcUaServerConfig, PlantMqttConfig
from common.checks import FORBID, After, Check, validate
from common.duration import Duration
from common.mqtt import BrokerChoice
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
from oee.targets import TargetSet

if TYPE_CHECKING:
    import yaml
    from pydantic import ValidationError

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
    """The configuration file cannot be used; the message is meant for the plant engineer.
    `problems` lists each one (with its YAML path and line) when the file was read."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


@dataclass(kw_only=True)
class _Model:
    __pydantic_config__: ClassVar[dict[str, object]] = FORBID


def _bucket_divides_an_hour(value: int) -> int:
    # Buckets are aligned to UTC hours and sum to shifts; the engine refuses others.
    if 3600 % value:
        divisors = ", ".join(str(d) for d in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900))
        raise ValueError(f"must divide an hour (3600 seconds), e.g. {divisors}, 1800, 3600")
    return value


Name = Annotated[str, Check(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


@dataclass(kw_only=True)
class AgentSection(_Model):
    id: Name
    site: Name
    timezone: TimeZoneName = "UTC"
    state_dir: Path = Path("/var/lib/edge-agent")
    bucket_seconds: Annotated[int, Check(ge=1, le=3600), After(_bucket_divides_an_hour)] = 60
    status_interval: Duration = 60.0  # how often health goes to the cloud
    log_level: Literal["debug", "info", "warning", "error"] = "info"


_CONNECTION_TYPES = tuple(CONNECTOR_TYPES)


DEFAULT_DATA_TYPE: DataType = "uint16"


@dataclass(kw_only=True)
class SignalConfig(_Model):
    """Where a signal is read (connector part) and how the engine reads it (OEE part)."""

    address: str | None = None
    node: str | None = None  # OPC UA: ns=2;s=..., ns=3;i=..., nsu=URI;s=..., /Objects/2:...
    # Unset: uint16 (`data_type`), or, for a counter, the type the PLC declares.
    type: DataType | None = None
    order: Order = "ABCD"
    scale: float = 1.0
    offset: float = 0.0
    bit: Annotated[int | None, Check(ge=0, le=15)] = None
    length: Annotated[int | None, Check(ge=1, le=125)] = None
    map: CodeMap | None = None
    width: Literal[16, 32, 64] | None = None
    signed: bool | None = None
    max_delta: Annotated[int | None, Check(gt=0)] = None

    def __post_init__(self) -> None:
        if self.node is not None and (problem := node_notation_error(self.node)):
            raise ValueError(f"node: {problem}")

    @property
    def data_type(self) -> DataType:
        """The type the register holds: `type:`, or uint16 when the file does not say."""
        return self.type or DEFAULT_DATA_TYPE

    @property
    def width_from_source(self) -> bool:
        """As a counter, whether the data type the PLC declares decides width and sign."""
        return self.type is None and self.width is None

    def counter_spec(self, source_type: str | None = None) -> CounterSpec:
        """How the engine reads this signal as a counter. Without `type:` and `width:`, the
        integer type the PLC declares (`source_type`, e.g. an OPC UA node's DataType)
        decides width and sign; otherwise `type:` does (default uint16)."""
        declared: str = self.data_type
        if self.width_from_source and source_type is not None and source_type in INTEGER_WIDTHS:
            declared = source_type
        width = self.width or INTEGER_WIDTHS.get(declared, 32)
        return CounterSpec(
            width=width,  # type: ignore[arg-type]
            signed=self.signed if self.signed is not None else declared.startswith("int"),
            max_delta=self.max_delta,
        )


SignalName = Literal[
    "state",
    "total_count",
    "good_count",
    "scrap_count",
    "rework_count",
    "reason",
    "scrap_reason",
    "product",
]


@dataclass(kw_only=True)
class EquipmentConfig(_Model):
    id: Name
    line: str | None = None
    connection: str | None = None
    unit: Annotated[int, Check(ge=0, le=247)] = 1
    ideal_cycle_time: CycleTime
    micro_stop_threshold: Duration | None = None
    micro_stops: Literal["performance", "availability"] = "performance"
    signals: dict[SignalName, SignalConfig]
    products: dict[str, ProductSpec] = field(default_factory=dict)
    # KPI name (oee.kpis) -> target; API-set targets of the equipment override these.
    targets: TargetSet = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "state" not in self.signals:
            raise ValueError("a state signal is required")
        if not self.signals["state"].map:
            raise ValueError("signals.state needs a map from PLC values to states")
        if "scrap_reason" in self.signals and "scrap_count" not in self.signals:
            # With scrap derived from a good counter, scrap moves at total increments and
            # back at good ones: there is no increment of scrap to attribute.
            raise ValueError("signals.scrap_reason needs a scrap_count signal")
        try:
            self.oee_spec()
        except ValueError as exc:
            raise ValueError(f"signals: {exc}") from None

    def oee_spec(self) -> EquipmentSpec:
        def counter(name: str) -> CounterSpec:
            return self.signals[name].counter_spec()  # type: ignore[index]

        state_map = self.signals["state"].map or {}
        reason = self.signals.get("reason")
        scrap_reason = self.signals.get("scrap_reason")
        product = self.signals.get("product")
        return EquipmentSpec(
            id=self.id,
            line=self.line,
            ideal_cycle_time=self.ideal_cycle_time,
            micro_stop_threshold=self.micro_stop_threshold,
            micro_stops=self.micro_stops,
            state_map=state_map,
            reason_map=(reason.map or {}) if reason else {},
            scrap_reason_map=(scrap_reason.map or {}) if scrap_reason else {},
            product_map=(product.map or {}) if product else {},
            products=self.products,
            counters={
                name: counter(name)
                for name in ("total_count", "good_count", "scrap_count", "rework_count")
                if name in self.signals
            },
        )


@dataclass(kw_only=True)
class MqttConfig(BrokerChoice):
    """The cloud's broker: one (`host`, `port`) or the nodes of a cluster (`brokers`), which
    the uplink connects to in turn when the node it is on is lost or refuses it."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None
    keepalive: Annotated[int, Check(ge=5, le=3600)] = 30
    topic_prefix: str = ""


@dataclass(kw_only=True)
class UplinkConfig(_Model):
    batch_max_events: Annotated[int, Check(ge=1, le=100_000)] = 1000
    flush_interval: Duration = 1.0
    ack_timeout: Duration = 15.0
    max_in_flight: Annotated[int, Check(ge=1, le=1000)] = 16
    drain_timeout: Duration = 5.0
    suite: Literal["x25519-hkdfsha256-aes256gcm", "mlkem768x25519-hkdfsha256-aes256gcm"] = (
        "x25519-hkdfsha256-aes256gcm"
    )


@dataclass(kw_only=True)
class KeysConfig(_Model):
    """Key files; relative paths are under agent.state_dir/keys."""

    dir: Path | None = None


@dataclass(kw_only=True)
class OutboxConfig(_Model):
    """The durable outbox: where it lives and how much it may hold during an outage."""

    path: Path | None = None
    max_bytes: Annotated[int, Check(ge=16 * 1024)] = 2 * 1024**3
    # The outbox stops growing when the file system's free space would drop below this.
    min_free_bytes: Annotated[int, Check(ge=0)] = 256 * 1024**2
    # block: hold new events in memory (the checkpoint on disk stays consistent), retry.
    # shed_samples: delete raw-sample batches first and record the loss; OEE data is never shed.
    when_full: Literal["block", "shed_samples"] = "block"
    # With nothing changing on the line, the time accounted is committed this often: after a
    # crash or power loss at most this much (plus one flush) of observed time is reported as
    # unknown ("agent restarted"); while parts are counted it is one flush. Shorter: a
    # tighter bound, more small writes to the flash (README "Storage").
    heartbeat_interval: Annotated[Duration, Check(gt=0, le=3600)] = 60.0
    # The engine-state journal is folded into one row per equipment this often.
    snapshot_interval: Annotated[Duration, Check(gt=0, le=86400)] = 300.0


@dataclass(kw_only=True)
class RawSamplesConfig(_Model):
    """Optional publishing of raw signal values (`sample` events), filtered by a deadband."""

    enabled: bool = False
    # A numeric value is published when it moved by more than this since the last one sent.
    deadband: Annotated[float, Check(ge=0.0)] = 0.0
    # Publish an unchanged value again after this long (a heartbeat); unset: never.
    max_interval: Duration | None = None
    # Only these signals (default: every signal of every equipment).
    signals: list[str] | None = None


@dataclass(kw_only=True)
class HealthConfig(_Model):
    """The local health and metrics endpoint; it listens on the loopback interface only."""

    enabled: bool = True
    port: Annotated[int, Check(ge=1, le=65535)] = 9650


@dataclass(kw_only=True)
class ConfigSourceConfig(_Model):
    """Where the running configuration comes from (agent/remote_config.py, README "Manage a
    fleet"): `local`, this file (pushes from the cloud are ignored); `cloud`, this file until
    the cloud publishes a signed version, then the last version applied."""

    source: Literal["local", "cloud"] = "local"
    # After applying a pushed version, how long the agent watches its health before keeping it.
    settle: Annotated[Duration, Check(gt=0, le=3600)] = 30.0


Loc = tuple[str | int, ...]


def _get(node: object, name: str) -> Any:
    """A field of a validated model or of the raw YAML mapping alike."""
    if isinstance(node, dict):
        return node.get(name)
    return getattr(node, name, None)


def cross_check(equipment: Any, connections: Any, *, replay: bool = False) -> list[tuple[Loc, str]]:
    """Problems between equipment and connections, every one of them. Works on the validated
    models and on the raw YAML (to report them beside field problems, in one pass)."""
    problems: list[tuple[Loc, str]] = []
    items = (
        [e for e in equipment if isinstance(e, dict) or dataclasses.is_dataclass(e)]
        if isinstance(equipment, list)
        else []
    )
    ids = [_get(e, "id") for e in items]
    for i, eq_id in enumerate(ids):
        if isinstance(eq_id, str) and ids.index(eq_id) != i:
            problems.append(
                (("equipment", i, "id"), f"{eq_id!r} is used by equipment[{ids.index(eq_id)}] too")
            )
    if replay:
        return problems  # replay reads no PLC: connections and addresses do not matter
    kinds: dict[str, str] = {}
    for conn in connections if isinstance(connections, list) else []:
        conn_id, kind = _get(conn, "id"), _get(conn, "type")
        if isinstance(conn_id, str) and isinstance(kind, str) and kind in CONNECTOR_TYPES:
            kinds[conn_id] = kind
    for i, eq in enumerate(items):
        conn_id = _get(eq, "connection")
        if conn_id is None:
            continue
        if conn_id not in kinds:
            known = ", ".join(sorted(kinds)) or "none configured"
            problems.append(
                (
                    ("equipment", i, "connection"),
                    f"no connection with id {conn_id!r} (known: {known})",
                )
            )
            continue
        kind = kinds[conn_id]
        if kind == "modbus-rtu" and _get(eq, "unit") == 0:
            problems.append(
                (
                    ("equipment", i, "unit"),
                    "unit 0 is the broadcast address on a serial line: no device answers a "
                    "read there; use the device's id, 1..247",
                )
            )
        where = CONNECTOR_TYPES[kind].signal_field
        signals = _get(eq, "signals")
        for name, sig in signals.items() if isinstance(signals, dict) else ():
            if (isinstance(sig, dict) or dataclasses.is_dataclass(sig)) and _get(
                sig, where
            ) is None:
                problems.append(
                    (
                        ("equipment", i, "signals", str(name)),
                        f"needs `{where}:` (connection {conn_id!r} is {kind})",
                    )
                )
    return problems


@dataclass(kw_only=True)
class TargetsConfig(_Model):
    """Targets of the site and of its lines (equipment set theirs under `equipment`); the
    most specific scope that sets a KPI's target wins: equipment > line > site."""

    site: TargetSet = field(default_factory=dict)
    lines: dict[str, TargetSet] = field(default_factory=dict)


@dataclass(kw_only=True)
class AgentConfig(_Model):
    agent: AgentSection
    connections: list[Connection] = field(default_factory=list)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    uplink: UplinkConfig = field(default_factory=UplinkConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    raw_samples: RawSamplesConfig = field(default_factory=RawSamplesConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    # Plant-floor outputs (agent/floor): off unless configured.
    plant_mqtt: PlantMqttConfig | None = None
    opcua_server: OpcUaServerConfig | None = None
    config: ConfigSourceConfig = field(default_factory=ConfigSourceConfig)
    shifts: list[ShiftSpec] = field(default_factory=list)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    equipment: Annotated[list[EquipmentConfig], Check(min_length=1)]

    def cross_problems(self, *, replay: bool = False) -> list[tuple[Loc, str]]:
        """Problems that span sections (ids, references between them), each with its path."""
        problems = cross_check(self.equipment, self.connections, replay=replay)
        problems += self._plant_floor_references()
        lines = {e.line for e in self.equipment if e.line is not None}
        problems += [
            (("targets", "lines", line), f"no equipment is on line {line!r}")
            for line in self.targets.lines
            if line not in lines
        ]
        return problems

    def _plant_floor_references(self) -> list[tuple[Loc, str]]:
        """Equipment the plant-floor outputs name must be configured equipment."""
        known = {e.id for e in self.equipment}
        problems: list[tuple[Loc, str]] = []
        if self.plant_mqtt is not None:
            for eq in self.plant_mqtt.publish:
                if eq not in known:
                    problems.append((("plant_mqtt", "publish", eq), f"no equipment with id {eq!r}"))
        if self.opcua_server is not None:
            for i, eq in enumerate(self.opcua_server.equipment or []):
                if eq not in known:
                    problems.append(
                        (("opcua_server", "equipment", i), f"no equipment with id {eq!r}")
                    )
        return problems

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


@dataclass(frozen=True)
class Problem:
    """One thing wrong in the file: where (YAML path, line) and why."""

    path: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.path} (line {self.line}): {self.reason}"
            if self.line
            else (f"{self.path}: {self.reason}")
        )


def dotted(loc: Loc) -> str:
    """('equipment', 0, 'signals', 'state') -> 'equipment[0].signals.state'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


def _substitute(
    node: Any, loc: Loc, env: dict[str, str], unset: list[tuple[Loc, str]] | None = None
) -> Any:
    """`${NAME}` and `${NAME:-default}` replaced from `env`. An unset variable without a
    default raises ConfigError, or, with `unset` given, is recorded there (and left empty) so
    that the rest of the file is still checked."""
    if isinstance(node, dict):
        return {k: _substitute(v, (*loc, str(k)), env, unset) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, (*loc, i), env, unset) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            if unset is None:
                raise ConfigError(f"{dotted(loc)}: environment variable {name} is not set")
            unset.append((loc, name))
            return ""

        return _ENV.sub(replace, node)
    return node


def expand_env(node: Any, path: str) -> Any:
    """`${ENV}` substitution of one part of the file (`path` is its YAML path), for a
    command that needs only that part: other variables may stay unset."""
    return _substitute(node, (path,), dict(os.environ))


Position = tuple[int, int]  # 1-based line, 0-based column


def _fast_loader() -> type[yaml.SafeLoader]:
    """libyaml's parser when PyYAML is built with it: the same documents for a fraction of the
    memory and time the pure-Python parser takes on a plant-sized file. The pure-Python
    parser words a syntax error with the line quoted. (PyYAML is imported where a file is
    parsed: the running agent gets its configuration parsed by agent.configcheck.)"""
    import yaml

    loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return loader


def _load_yaml(text: str) -> tuple[Any, dict[tuple[str, ...], Position]]:
    """The document and where each of its paths is written, from one parse. Raises
    yaml.YAMLError with the pure-Python parser's message."""
    import yaml

    fast = _fast_loader()
    try:
        loader = fast(text)
        try:
            node = loader.get_single_node()
            lines = _line_index(node)
            # After the index: constructing resolves `<<` merges in the node tree itself.
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError:
        if fast is yaml.SafeLoader:
            raise
        yaml.safe_load(text)  # raises with the message that shows the line
        raise
    return data, lines


def _load_data(text: str) -> Any:
    """The document alone (see _load_yaml), with the same parser and error messages."""
    import yaml

    fast = _fast_loader()
    try:
        return yaml.load(text, Loader=fast)
    except yaml.YAMLError:
        if fast is yaml.SafeLoader:
            raise
        yaml.safe_load(text)  # raises with the message that shows the line
        raise


def _line_index(root: yaml.Node | None) -> dict[tuple[str, ...], Position]:
    """YAML path -> where it is written, so errors can point into the file."""
    import yaml

    lines: dict[tuple[str, ...], Position] = {}

    def at(mark: yaml.Mark) -> Position:
        return mark.line + 1, mark.column

    def walk(node: yaml.Node, path: tuple[str, ...], merged: bool = False) -> None:
        lines.setdefault(path, at(node.start_mark))
        if isinstance(node, yaml.MappingNode):
            merges: list[yaml.Node] = []
            for key, value in node.value:
                if key.tag == "tag:yaml.org,2002:merge":
                    merges.extend(value.value if isinstance(value, yaml.SequenceNode) else [value])
                    continue
                sub = (*path, str(key.value))
                if merged:
                    lines.setdefault(sub, at(key.start_mark))
                else:
                    lines[sub] = at(key.start_mark)
                walk(value, sub, merged)
            # `<<: *anchor`: the keys it brings are where the anchor wrote them, unless the
            # mapping itself sets them.
            for source in merges:
                walk(source, path, merged=True)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, str(i)), merged)

    if root is not None:
        walk(root, ())
    return lines


def _text_line_index(text: str) -> dict[tuple[str, ...], Position]:
    import yaml

    try:
        return _load_yaml(text)[1]
    except yaml.YAMLError:
        return {}


def _validator_name(part: int | str) -> bool:
    return isinstance(part, str) and (
        part in ("function-after", "function-before", "function-plain") or "[" in part
    )


def _yaml_loc(loc: tuple[int | str, ...]) -> Loc:
    """pydantic's error location as a YAML path (without tags and validator names)."""
    keys: list[str | int] = []
    for i, part in enumerate(loc):
        if i == 2 and loc[0] == "connections" and part in _CONNECTION_TYPES:
            continue  # the discriminator tag pydantic puts in the location
        if _validator_name(part):
            continue  # pydantic's internal validator names are not YAML keys
        keys.append(part)
    return tuple(keys)


def _unwrap(annotation: Any) -> Any:
    """The type under Annotated[...] and `X | None`."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
            continue
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
            annotation = args[0]
            continue
        return annotation


def _fields(kind: Any) -> dict[str, Any] | None:
    """A configuration dataclass's fields and their types (None for anything else)."""
    if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
        return None
    hints = get_type_hints(kind, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(kind)}


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the file may write in the mapping at pydantic's `loc` (for "did you mean")."""
    current: Any = AgentConfig
    for part in loc:
        current = _unwrap(current)
        origin = get_origin(current)
        fields = _fields(current)
        if isinstance(part, int) and origin is list:
            current = get_args(current)[0]
        elif origin is dict:
            current = get_args(current)[1]
        elif origin in (Union, UnionType) and isinstance(part, str) and part in CONNECTOR_TYPES:
            current = CONNECTOR_TYPES[part].config_model  # the tag of a connection's type
        elif fields is not None:
            if not isinstance(part, str) or part not in fields:
                return []
            current = fields[part]
        else:
            return []
    return list(_fields(_unwrap(current)) or ())


def _did_you_mean(word: str, choices: list[str]) -> str:
    import difflib  # for messages only

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


Found = tuple[Loc, str, Position | None]  # a problem before merging: path, reason, position
# pydantic's words for a key the dataclass does not have.
_UNKNOWN_KEY = ("unexpected_keyword_argument", "extra_forbidden")


def _raw_problems(exc: ValidationError, lines: dict[tuple[str, ...], Position]) -> list[Found]:
    def line_of(loc: Loc) -> Position | None:
        return _line_of(lines, loc)

    errors = exc.errors()
    missing = {_yaml_loc(e["loc"]) for e in errors if e["type"] == "missing"}
    out: list[Found] = []
    for err in errors:
        loc = _yaml_loc(err["loc"])
        reason = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] in _UNKNOWN_KEY and loc:
            key, parent = str(loc[-1]), loc[:-1]
            # A misspelled required key is also a missing one: say it once, as the typo.
            absent = [str(m[-1]) for m in missing if m[:-1] == parent and m]
            raw_parent = tuple(p for p in err["loc"][:-1] if not _validator_name(p))
            hint = _did_you_mean(key, absent) or _did_you_mean(key, _keys_at(raw_parent))
            reason = f"unknown key `{key}`{hint or ' (check the spelling)'}"
        elif err["type"] == "literal_error":
            expected = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
            got = err.get("input")
            hint = _did_you_mean(str(got), expected) if isinstance(got, str) else ""
            reason = f"{err['msg']}, got {got!r}{hint}"
        out.append((loc, reason, line_of(loc)))
    # The missing keys a typo explained above are not reported a second time.
    explained = {
        (*loc[:-1], m.group(1))
        for loc, reason, _ in out
        if (m := re.search(r"unknown key `[^`]*`; did you mean `([^`]*)`", reason))
    }
    return [p for p in out if not (p[1] == "Field required" and p[0] in explained)]


def _merge(problems: list[Found]) -> list[Problem]:
    """One line per problem. A YAML anchor used by several equipment puts one mistake at
    several paths: it is reported once, where it is written, naming the others it reaches."""
    groups: dict[tuple[object, ...], tuple[Position | None, str, list[Loc]]] = {}
    for loc, reason, pos in problems:
        key: tuple[object, ...] = (pos, reason, loc[-1:]) if pos else (loc, reason)
        groups.setdefault(key, (pos, reason, []))[2].append(loc)
    out = []
    for pos, reason, locs in groups.values():
        first = dotted(locs[0])
        others = [_differing_head(dotted(loc), first) for loc in locs[1:]]
        shared = f" (the same line serves {', '.join(others)})" if others else ""
        out.append(Problem(first, pos[0] if pos else None, reason + shared))
    out.sort(key=lambda p: (p.line or 0, p.path))
    return out


def _differing_head(path: str, first: str) -> str:
    """'equipment[3].signals.state.mapp' beside 'equipment[0].signals.state.mapp' ->
    'equipment[3]' (the common tail is dropped)."""
    n = 0
    while n < min(len(path), len(first)) and path[-1 - n] == first[-1 - n]:
        n += 1
    head = path[: len(path) - n]
    cut = path.find(".", len(head))
    return path[:cut] if cut > 0 else path


def format_problems(source: str, problems: list[Problem]) -> str:
    count = len(problems)
    head = f"{source}: invalid configuration ({count} problem{'s' if count != 1 else ''}):"
    return "\n".join([head, *(f"  {p}" for p in problems)])


def format_validation_error(exc: ValidationError, source: str, text: str) -> str:
    return format_problems(source, _merge(_raw_problems(exc, _text_line_index(text))))


def parse_config(
    text: str,
    source: str = "<config>",
    env: dict[str, str] | None = None,
    *,
    replay: bool = False,
) -> AgentConfig:
    """The validated configuration; `replay=True` leaves connections and addresses unchecked.

    Every problem is reported at once (ConfigError.problems): unset variables, unknown or
    misspelled keys, bad values and references between sections."""
    import yaml

    try:
        data = _load_data(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with agent, equipment, ... at the top")
    unset: list[tuple[Loc, str]] = []
    data = _substitute(data, (), dict(os.environ) if env is None else env, unset)
    found: list[Found] = []
    config: AgentConfig | None = None
    # Where each path is written, for the problems only: a valid file (every start and
    # reload) does not pay for an index of every node.
    lines: dict[tuple[str, ...], Position] = {}
    from pydantic import ValidationError

    try:
        config = validate(AgentConfig, data)
    except ValidationError as exc:
        lines = _text_line_index(text)
        found = _raw_problems(exc, lines)
        # The cross-section checks need every field valid: run them on the file as written,
        # beside the field problems (skipping what those explain).
        shown = [loc for loc, _, _ in found]
        for loc, why in cross_check(data.get("equipment"), data.get("connections"), replay=replay):
            if not any(_overlaps(loc, other) for other in shown):
                found.append((loc, why, _line_of(lines, loc)))
    else:
        cross = config.cross_problems(replay=replay)
        if cross:
            lines = _text_line_index(text)
            found = [(loc, why, _line_of(lines, loc)) for loc, why in cross]
    # A value left empty by an unset variable is not reported as a second problem.
    found = [p for p in found if not any(p[0][: len(loc)] == loc for loc, _ in unset)]
    if unset and not lines:
        lines = _text_line_index(text)
    found += [
        (
            loc,
            f"environment variable {name} is not set (and the file gives no ${{{name}:-default}})",
            _line_of(lines, loc),
        )
        for loc, name in unset
    ]
    if found:
        problems = _merge(found)
        raise ConfigError(format_problems(source, problems), problems)
    if config is None:  # unreachable: no problem found means the model validated
        raise RuntimeError("the configuration was neither valid nor refused")
    return config


def _overlaps(a: Loc, b: Loc) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _line_of(lines: dict[tuple[str, ...], Position], loc: Loc) -> Position | None:
    keys = tuple(str(k) for k in loc)
    for n in range(len(keys), -1, -1):
        if (found := lines.get(keys[:n])) is not None:
            return found
    return None


# Where the agent's file is when no -c is given: the installed service's file (see deploy/).
DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/agent.yaml")
CONFIG_PATH_ENV = "EDGE_AGENT_CONFIG"
CONFIG_OPTION_HELP = f"the agent's YAML file (default: ${CONFIG_PATH_ENV} or {DEFAULT_CONFIG_PATH})"


def default_config_path(env: dict[str, str] | None = None) -> tuple[Path, str]:
    """The file to use without -c, and where that choice came from (for error messages)."""
    environ = os.environ if env is None else env
    if environ.get(CONFIG_PATH_ENV):
        return Path(environ[CONFIG_PATH_ENV]), f"from ${CONFIG_PATH_ENV}"
    return DEFAULT_CONFIG_PATH, "the default"


def read_config_text(path: Path) -> str:
    """The file's text; ConfigError when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None


def load_config(path: Path | str, *, replay: bool = False) -> AgentConfig:
    """The file validated in this process (commands that end; `edge-agent run` uses
    `agent.configcheck`, which keeps pydantic out of the agent's process)."""
    p = Path(path)
    return parse_config(read_config_text(p), str(p), replay=replay)
