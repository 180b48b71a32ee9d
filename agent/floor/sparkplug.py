"""The agent on the plant broker: a Sparkplug B 3.0 edge node, or plain unified-namespace JSON.

Sparkplug B (Eclipse Sparkplug 3.0.0): one edge node `spBv1.0/{group}/.../{edge_node}` whose
devices are the equipment listed in `plant_mqtt.publish`.
- Every MQTT connection gets a new `bdSeq` (0-255, wrapping): the NDEATH carrying it is the
  connection's will, and the NBIRTH that follows carries the same value.
- NBIRTH (seq 0) holds the node's metrics: `bdSeq`, `Node Control/Rebirth`, `Outbox/Depth`,
  `Floor/DroppedUpdates`; then a DBIRTH per equipment whose PLC link is up, with every listed
  metric, its alias, data type and engineering unit (`engUnit` property).
- Then every `publish_interval`: DDATA with the metrics that changed (by alias only), NDATA for
  the node's, DDEATH when an equipment's PLC link is lost and DBIRTH when it is back. `seq`
  counts every message after NBIRTH, 0-255 wrapping.
- NCMD `Node Control/Rebirth` = true: NBIRTH and every DBIRTH again (seq from 0).
- With `primary_host_id`, nothing is born before that host's STATE says online; a STATE
  offline (newer than the last one seen) ends the session: NDEATH, disconnect, wait again.

A slow or absent broker never reaches the engine: this runs as its own task, reads the live
values, and publishes only while fewer than `queue_size` messages wait in the MQTT client.
Otherwise the cycle's changes are not sent and counted as dropped: the next cycle sends
the newest values (a live value is replaced, never queued), so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from agent.floor import sparkplug_b_pb2 as pb
from agent.floor.config import PlantMqttConfig, selected
from agent.floor.live import BY_NAME, OUTBOX_DEPTH, EquipmentLive, LiveSource, Metric, Value
from connectors.connector import raise_if_cancelled

NAMESPACE = "spBv1.0"
BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
DROPPED = Metric("Floor/DroppedUpdates", "count", "live values replaced before they were sent")

# Sparkplug B data types (the DataType enum of the specification).
_TYPES: dict[str, int] = {
    "string": pb.String,
    "datetime": pb.DateTime,
    "boolean": pb.Boolean,
    "count": pb.UInt64,
    "seconds": pb.Double,
    "ratio": pb.Double,
}
_NODE_ALIASES = {REBIRTH: 1, OUTBOX_DEPTH.name: 2, DROPPED.name: 3}
_DEVICE_ALIAS_BASE = 1000  # equipment i (in publish order) has aliases 1000*(i+1) + metric index


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def now_ms() -> int:
    return int(time.time() * 1000)


def _set_value(metric: Any, kind: str, value: Value) -> None:
    metric.datatype = _TYPES[kind]
    if value is None:
        metric.is_null = True
    elif kind == "string":
        metric.string_value = str(value)
    elif kind == "datetime":
        if not isinstance(value, datetime):
            raise TypeError(f"a datetime metric got {type(value).__name__}")
        metric.long_value = _ms(value)
    elif kind == "boolean":
        metric.boolean_value = bool(value)
    elif kind == "count":
        metric.long_value = int(value)  # type: ignore[arg-type]
    else:
        metric.double_value = float(value)  # type: ignore[arg-type]


def _add_metric(
    payload: Any,
    spec: Metric,
    value: Value,
    alias: int | None,
    ts: int,
    *,
    birth: bool,
) -> None:
    metric = payload.metrics.add()
    if birth:
        metric.name = spec.name
        unit = spec.unit
        if unit is not None:
            metric.properties.keys.append("engUnit")
            prop = metric.properties.values.add()
            prop.type = pb.String
            prop.string_value = unit.display
    if alias is not None:
        metric.alias = alias
    metric.timestamp = ts
    _set_value(metric, spec.kind, value)


@dataclass
class PlantStats:
    """What the plant-floor MQTT output did (read by the health endpoint and tests)."""

    connected: bool = False
    connects: int = 0
    published: int = 0
    dropped: int = 0  # live values not sent because the client's queue was full
    births: int = 0


class _Session:
    """One MQTT connection: a paho client on its own network thread, feeding an asyncio
    queue with what happened (connected, lost, messages)."""

    def __init__(self, cfg: PlantMqttConfig, client_id: str, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.loop = loop
        self.inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=10_000)
        self.backlog: deque[mqtt.MQTTMessageInfo] = deque()
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            client.tls_set_context(
                ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        self.client = client

    def _post(self, item: tuple[str, Any]) -> None:
        def put() -> None:
            if not self.inbox.full():
                self.inbox.put_nowait(item)

        self.loop.call_soon_threadsafe(put)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self._post(("connected" if not rc.is_failure else "lost", str(rc)))

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self._post(("lost", str(rc)))

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._post(("lost", "connection failed"))

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._post(("message", (message.topic, bytes(message.payload))))

    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()

    async def close(self) -> None:
        """Disconnect and end the network thread. paho's `loop_stop` joins that thread, which
        first sends what is queued and so can wait as long as a broker that stopped reading
        lets it: joined from a daemon thread of its own, not from the loop's executor (whose
        threads the process waits for at exit), and awaited by the caller with a limit."""
        self.client.disconnect()
        stopped: asyncio.Future[None] = self.loop.create_future()

        def done() -> None:
            if not stopped.done():
                stopped.set_result(None)

        def stop() -> None:
            self.client.loop_stop()
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(done)

        threading.Thread(target=stop, name="plant-mqtt-stop", daemon=True).start()
        await stopped

    def room(self) -> int:
        while self.backlog and self.backlog[0].is_published():
            self.backlog.popleft()
        return self.cfg.queue_size - len(self.backlog)

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> bool:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        self.backlog.append(info)
        return True


class PlantPublisher:
    """Base of both formats: connects with backoff, runs sessions, never raises into the
    agent (every failure is logged once and retried)."""

    def __init__(self, cfg: PlantMqttConfig, source: LiveSource, *, agent: str, site: str):
        self.cfg = cfg
        self.source = source
        self.agent = agent
        self.site = site
        self.stats = PlantStats()
        self.log = structlog.get_logger("agent.floor").bind(
            agent=agent, output=cfg.format, broker=f"{cfg.host}:{cfg.port}"
        )
        self.publish_plan: dict[str, list[Metric]] = {
            eq: [BY_NAME[name] for name in selected(sel)] for eq, sel in cfg.publish.items()
        }
        self._rebirth = asyncio.Event()
        self._cycle_failing = False

    # -- subclass hooks ---------------------------------------------------------------------

    def configure(self, session: _Session) -> None:
        """Before connecting (the will)."""

    async def on_connected(self, session: _Session) -> bool:
        """After connecting; False ends the session (e.g. the primary host is offline)."""
        return True

    def cycle(self, session: _Session, live: Mapping[str, EquipmentLive]) -> None:
        raise NotImplementedError

    def on_message(self, session: _Session, topic: str, payload: bytes) -> bool:
        """A message arrived; False ends the session."""
        return True

    def on_stop(self, session: _Session) -> None:
        """Before a graceful disconnect."""

    # -- the loop -----------------------------------------------------------------------------

    def client_id(self) -> str:
        return self.cfg.client_id or f"edge-floor-{self.site}-{self.agent}"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.cfg.reconnect_min
        failing = False
        while True:
            # Python 3.11's asyncio.wait_for (in the libraries below) can swallow a cancellation
            # that arrives as what it waits for completes: never start a session past one.
            raise_if_cancelled()
            session = _Session(self.cfg, self.client_id(), loop)
            self.configure(session)
            error: str | None = None
            try:
                session.start()
                connected = await self._session(session)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    self.on_stop(session)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await session.close()
                raise
            except Exception as exc:  # a broken plant broker must never stop the agent
                connected = False
                error = repr(exc)
            self.stats.connected = False
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await session.close()
            if connected:
                delay = self.cfg.reconnect_min
                if not failing:
                    self.log.warning("plant broker lost")
            elif not failing:
                self.log.warning("plant broker unreachable; retrying with backoff", error=error)
            failing = not connected
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.cfg.reconnect_max)

    def _cycle(self, session: _Session) -> None:
        """One publishing cycle; a failure to read or encode is logged once and the session
        goes on (the next cycle sends what changed since the last values sent)."""
        try:
            self.cycle(session, self.source.read())
        except Exception as exc:
            if not self._cycle_failing:
                self.log.error("live values unreadable; nothing published", error=repr(exc))
            self._cycle_failing = True
        else:
            if self._cycle_failing:
                self.log.info("live values readable again")
            self._cycle_failing = False

    async def _session(self, session: _Session) -> bool:
        """Runs one connection; True if it was ever connected."""
        async with asyncio.timeout(self.cfg.keepalive + 10):
            kind, detail = await session.inbox.get()
        if kind != "connected":
            return False
        self.stats.connected = True
        self.stats.connects += 1
        self.log.info("plant broker connected")
        if not await self.on_connected(session):
            return True
        loop = asyncio.get_running_loop()
        next_cycle = loop.time()
        while True:
            raise_if_cancelled()
            wait = max(0.0, next_cycle - loop.time())
            try:
                async with asyncio.timeout(wait):
                    kind, detail = await session.inbox.get()
            except TimeoutError:
                next_cycle = loop.time() + self.cfg.publish_interval
                self._cycle(session)
                continue
            if kind == "lost":
                return True
            if kind == "message":
                topic, payload = detail
                if not self.on_message(session, topic, payload):
                    return True


class SparkplugEdgeNode(PlantPublisher):
    """A Sparkplug B 3.0 edge node whose devices are the listed equipment."""

    def __init__(self, cfg: PlantMqttConfig, source: LiveSource, *, agent: str, site: str):
        super().__init__(cfg, source, agent=agent, site=site)
        self.group = cfg.sparkplug.group_id or site
        self.node = cfg.sparkplug.edge_node_id or agent
        self.host_id = cfg.sparkplug.primary_host_id
        self.bdseq = 0
        self.seq = 0
        # A metric's alias is its equipment's base plus its place in the equipment's list;
        # equipment publishing the same list share one table of places.
        self.alias_base: dict[str, int] = {}
        self.alias_places: dict[str, dict[str, int]] = {}
        tables: dict[tuple[str, ...], dict[str, int]] = {}
        for i, (eq, metrics) in enumerate(self.publish_plan.items()):
            names = tuple(metric.name for metric in metrics)
            self.alias_base[eq] = _DEVICE_ALIAS_BASE * (i + 1)
            self.alias_places[eq] = tables.setdefault(names, {n: j for j, n in enumerate(names)})
        self.born: dict[str, dict[str, Value]] = {}  # equipment -> values last sent
        self.node_values: dict[str, Value] = {}
        self.node_born = False
        self.host_online: bool | None = None
        self.host_ts = -1
        self._next_bdseq = 0
        self.log = self.log.bind(group=self.group, edge_node=self.node)

    def alias(self, eq: str, metric: str) -> int:
        return self.alias_base[eq] + self.alias_places[eq][metric]

    def topic(self, kind: str, device: str | None = None) -> str:
        base = f"{NAMESPACE}/{self.group}/{kind}/{self.node}"
        return base if device is None else f"{base}/{device}"

    def _ndeath(self) -> bytes:
        payload = pb.Payload()
        payload.timestamp = now_ms()
        metric = payload.metrics.add()
        metric.name = BDSEQ
        metric.timestamp = payload.timestamp
        metric.datatype = pb.Int64
        metric.long_value = self.bdseq
        return bytes(payload.SerializeToString())

    def configure(self, session: _Session) -> None:
        # A new connection, a new bdSeq: its NDEATH is the will (Sparkplug 3.0, 7.2).
        self.bdseq = self._next_bdseq
        self._next_bdseq = (self._next_bdseq + 1) % 256
        session.client.will_set(self.topic("NDEATH"), self._ndeath(), qos=1, retain=False)
        self.born.clear()
        self.node_born = False
        self.host_online = None

    async def on_connected(self, session: _Session) -> bool:
        session.client.subscribe(self.topic("NCMD"), qos=1)
        if self.host_id is None:
            self._births(session, self.source.read())
            return True
        session.client.subscribe(f"{NAMESPACE}/STATE/{self.host_id}", qos=1)
        self.log.info("waiting for the primary host", host=self.host_id)
        return True

    def _next_seq(self) -> int:
        seq = self.seq
        self.seq = (self.seq + 1) % 256
        return seq

    def _send(self, session: _Session, topic: str, payload: Any) -> bool:
        payload.seq = self._next_seq()
        if session.publish(topic, payload.SerializeToString()):
            self.stats.published += 1
            return True
        return False

    def _node_metrics(self) -> dict[str, tuple[Metric, Value]]:
        out: dict[str, tuple[Metric, Value]] = {}
        if self.cfg.node_metrics:
            out[OUTBOX_DEPTH.name] = (OUTBOX_DEPTH, self.source.outbox_depth())
            out[DROPPED.name] = (DROPPED, self.stats.dropped)
        return out

    def _births(self, session: _Session, live: Mapping[str, EquipmentLive]) -> None:
        """NBIRTH and a DBIRTH per equipment whose link is up (a rebirth too)."""
        ts = now_ms()
        self.seq = 0
        payload = pb.Payload()
        payload.timestamp = ts
        bd = payload.metrics.add()
        bd.name, bd.timestamp, bd.datatype, bd.long_value = BDSEQ, ts, pb.Int64, self.bdseq
        rebirth = Metric(REBIRTH, "boolean", "write true to get every birth again")
        _add_metric(payload, rebirth, False, _NODE_ALIASES[REBIRTH], ts, birth=True)
        self.node_values = {}
        for name, (spec, value) in self._node_metrics().items():
            _add_metric(payload, spec, value, _NODE_ALIASES[name], ts, birth=True)
            self.node_values[name] = value
        self.born.clear()
        if not self._send(session, self.topic("NBIRTH"), payload):
            self.node_born = False
            return
        self.node_born = True
        self.stats.births += 1
        for eq in self.publish_plan:
            if eq in live and self._link_up(live[eq]):
                self._dbirth(session, live[eq], ts)
        self.log.info("born", bdseq=self.bdseq, devices=len(self.born))

    @staticmethod
    def _link_up(live: EquipmentLive) -> bool:
        return live.values.get("Link/Connected") is not False

    def _dbirth(self, session: _Session, live: EquipmentLive, ts: int) -> None:
        payload = pb.Payload()
        payload.timestamp = ts
        values: dict[str, Value] = {}
        for spec in self.publish_plan[live.equipment]:
            value = live.values.get(spec.name)
            _add_metric(payload, spec, value, self.alias(live.equipment, spec.name), ts, birth=True)
            values[spec.name] = value
        if self._send(session, self.topic("DBIRTH", live.equipment), payload):
            self.born[live.equipment] = values

    def _ddeath(self, session: _Session, eq: str, ts: int) -> None:
        payload = pb.Payload()
        payload.timestamp = ts
        if self._send(session, self.topic("DDEATH", eq), payload):
            self.born.pop(eq, None)

    def cycle(self, session: _Session, live: Mapping[str, EquipmentLive]) -> None:
        if self.host_id is not None and not self.host_online:
            return
        if self._rebirth.is_set() or not self.node_born:
            self._rebirth.clear()
            if session.room() <= len(self.publish_plan):
                self.stats.dropped += 1
                self._rebirth.set()
                return
            self._births(session, live)
            return
        ts = now_ms()
        changed_node = {
            name: (spec, value)
            for name, (spec, value) in self._node_metrics().items()
            if self.node_values.get(name) != value
        }
        for eq in self.publish_plan:
            item = live.get(eq)
            if item is None:
                continue
            up = self._link_up(item)
            if session.room() <= 0:
                self.stats.dropped += sum(
                    1
                    for spec in self.publish_plan[eq]
                    if self.born.get(eq, {}).get(spec.name) != item.values.get(spec.name)
                )
                continue
            if eq in self.born and not up:
                self._ddeath(session, eq, ts)
            elif eq not in self.born and up:
                self._dbirth(session, item, ts)
            elif eq in self.born:
                self._ddata(session, item, ts)
        if changed_node and session.room() > 0:
            payload = pb.Payload()
            payload.timestamp = ts
            for name, (spec, value) in changed_node.items():
                _add_metric(payload, spec, value, _NODE_ALIASES[name], ts, birth=False)
            if self._send(session, self.topic("NDATA"), payload):
                self.node_values.update({n: v for n, (_, v) in changed_node.items()})

    def _ddata(self, session: _Session, item: EquipmentLive, ts: int) -> None:
        sent = self.born[item.equipment]
        changes = [
            spec
            for spec in self.publish_plan[item.equipment]
            if sent.get(spec.name) != item.values.get(spec.name)
        ]
        if not changes:
            return
        payload = pb.Payload()
        payload.timestamp = ts
        for spec in changes:
            value = item.values.get(spec.name)
            _add_metric(
                payload, spec, value, self.alias(item.equipment, spec.name), ts, birth=False
            )
        if self._send(session, self.topic("DDATA", item.equipment), payload):
            sent.update({spec.name: item.values.get(spec.name) for spec in changes})

    def on_message(self, session: _Session, topic: str, payload: bytes) -> bool:
        if topic == self.topic("NCMD"):
            return self._on_ncmd(payload)
        if self.host_id is not None and topic == f"{NAMESPACE}/STATE/{self.host_id}":
            return self._on_state(session, payload)
        return True

    def _on_ncmd(self, raw: bytes) -> bool:
        command = pb.Payload()
        try:
            command.ParseFromString(raw)
        except Exception:  # protobuf's DecodeError; a bad command must not end anything
            self.log.warning("NCMD not decodable; ignored", bytes=len(raw))
            return True
        for metric in command.metrics:
            name = metric.name or (REBIRTH if metric.alias == _NODE_ALIASES[REBIRTH] else "")
            if name == REBIRTH and metric.WhichOneof("value") == "boolean_value":
                if metric.boolean_value:
                    self.log.info("rebirth requested")
                    self._rebirth.set()
            elif name:
                self.log.warning("NCMD metric not supported; ignored", metric=name)
        return True

    def _on_state(self, session: _Session, raw: bytes) -> bool:
        try:
            state = json.loads(raw)
            online = state["online"]
            ts = int(state["timestamp"])
            if not isinstance(online, bool):
                raise TypeError("online is not true or false")
        except (ValueError, KeyError, TypeError) as exc:
            self.log.warning("primary host STATE not understood; ignored", error=str(exc))
            return True
        if ts < self.host_ts:
            return True  # an older STATE than the one acted on (Sparkplug 3.0, 7.5.1)
        self.host_ts = ts
        was = self.host_online
        self.host_online = online
        if online and not was:
            self.log.info("primary host online", host=self.host_id)
            self._rebirth.set()
        elif not online and was:
            self.log.warning("primary host offline; ending the session", host=self.host_id)
            # NDEATH before the intentional disconnect (a will is not sent on a clean one).
            session.publish(self.topic("NDEATH"), self._ndeath(), qos=1)
            return False
        return True

    def on_stop(self, session: _Session) -> None:
        if self.node_born:
            session.publish(self.topic("NDEATH"), self._ndeath(), qos=1)


class UnsPublisher(PlantPublisher):
    """Plain unified-namespace JSON: retained `{prefix}/{line}/{equipment}/{metric}` topics,
    each `{"value": ..., "timestamp": ISO 8601}`, published when the value changes."""

    def __init__(self, cfg: PlantMqttConfig, source: LiveSource, *, agent: str, site: str):
        super().__init__(cfg, source, agent=agent, site=site)
        if cfg.uns is None:  # the configuration gives uns with this format
            raise ValueError("plant_mqtt.uns is not set")
        self.prefix = cfg.uns.prefix.rstrip("/")
        self.sent: dict[tuple[str, str], Value] = {}

    def configure(self, session: _Session) -> None:
        self.sent.clear()  # a new connection publishes every value again

    def topic(self, item: EquipmentLive, metric: str) -> str:
        return f"{self.prefix}/{item.line or '_'}/{item.equipment}/{metric}"

    def cycle(self, session: _Session, live: Mapping[str, EquipmentLive]) -> None:
        now = datetime.now().astimezone().isoformat()
        for eq, metrics in self.publish_plan.items():
            item = live.get(eq)
            if item is None:
                continue
            for spec in metrics:
                value = item.values.get(spec.name)
                key = (eq, spec.name)
                if key in self.sent and self.sent[key] == value:
                    continue
                if session.room() <= 0:
                    self.stats.dropped += 1
                    continue
                body = {
                    "value": value.isoformat() if isinstance(value, datetime) else value,
                    "timestamp": now,
                }
                unit = spec.unit
                if unit is not None:
                    body["unit"] = unit.display
                if session.publish(
                    self.topic(item, spec.name), json.dumps(body).encode(), qos=1, retain=True
                ):
                    self.sent[key] = value
                    self.stats.published += 1


def build_publisher(
    cfg: PlantMqttConfig, source: LiveSource, *, agent: str, site: str
) -> PlantPublisher:
    if cfg.format == "uns":
        return UnsPublisher(cfg, source, agent=agent, site=site)
    return SparkplugEdgeNode(cfg, source, agent=agent, site=site)
