"""The agent's OPC UA server: read-only live values for HMIs and andon boards.

Address space (namespace `opcua_server.namespace`, node ids `nsu=...;s=<equipment>.<Name>`):

    Objects/Plant/<site>/<line>/<equipment>/   State, StateSince, Reason, Product,
                                                Link/Connected, Shift/..., LastBucket/...
    Objects/Plant/<site>/Agent/                 OutboxDepth, Links/<connection>/Connected

(`line` is `_` for equipment without one.) Every value has its data type (String, DateTime,
Boolean, UInt64, Double) and counts, times and ratios an `EngineeringUnits` property (UNECE
codes: parts H87, seconds SEC, ratio C62). A value that is undefined (a ratio without
planned busy time, a shift not begun) is null with status BadNoData, as the cloud API's null.
Nothing is writable. Values are refreshed every `update_interval` from the engine's live state.

Security: the endpoints listed in `security` (None only when listed), user name and password
(`users:`), anonymous only with `anonymous: true`, and with `trusted_clients:` only client
certificates from that folder are accepted for a secure channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes

from agent.floor.aspace import ensure_shelf, init_server
from agent.floor.config import OpcUaServerConfig
from agent.floor.live import METRICS, OUTBOX_DEPTH, LiveSource, Metric, Value
from agent.floor.nodes import Interner, compact, make_properties_virtual
from agent.floor.slim import compact_object_ids, make_names_lazy
from common.memory import release_free_memory

make_names_lazy()
compact_object_ids()

_UNECE = "http://www.opcfoundation.org/UA/units/un/cefact"
_FOLDERS = ("Shift", "LastBucket", "Link")
_VARIANTS: dict[str, ua.VariantType] = {
    "string": ua.VariantType.String,
    "datetime": ua.VariantType.DateTime,
    "boolean": ua.VariantType.Boolean,
    "count": ua.VariantType.UInt64,
    "seconds": ua.VariantType.Double,
    "ratio": ua.VariantType.Double,
}
_DATATYPES: dict[str, int] = {
    "string": ObjectIds.String,
    "datetime": ObjectIds.DateTime,
    "boolean": ObjectIds.Boolean,
    "count": ObjectIds.UInt64,
    "seconds": ObjectIds.Double,
    "ratio": ObjectIds.Double,
}
_LINK = Metric("Connected", "boolean", "whether the PLC connection is up")
_UNWRITTEN = object()  # a value never written equals no value
SERVER_CERT = "opcua-server.der"
SERVER_KEY = "opcua-server.pem"


def _nid(identifier: str | int, ns: int = 0) -> ua.NodeId:
    return ua.NodeId(identifier, ns)  # type: ignore[arg-type]


def browse_path(name: str) -> list[str]:
    """A metric's place under its equipment: `Shift/OEE` -> [Shift, OEE];
    `State/Since` -> [StateSince]."""
    parts = name.split("/")
    if parts[0] in _FOLDERS:
        return parts
    return ["".join(parts)]


def node_name(equipment: str, metric: str) -> str:
    """The string part of a value's node id: `press-1.Shift.OEE`."""
    return ".".join([equipment, *browse_path(metric)])


def unit_id(code: str) -> int:
    """OPC UA's UnitId of a UNECE common code (OPC 10000-8, 5.6.3)."""
    value = 0
    for char in code:
        value = (value << 8) | ord(char)
    return value


# An undefined value (a ratio without planned busy time, a shift without a closed bucket) is
# a null value with this status: HMIs show "no value", never 0. (A Good null cannot be
# written to a typed node in asyncua; with a Bad status the server stores null.)
UNDEFINED = ua.StatusCode(StatusCodes.BadNoData)  # type: ignore[arg-type]


def _data_value(metric: Metric, value: Value, now: datetime) -> ua.DataValue:
    if value is None:
        return ua.DataValue(StatusCode=UNDEFINED, SourceTimestamp=now)  # type: ignore[arg-type]
    if metric.kind == "count":
        variant = ua.Variant(int(value), ua.VariantType.UInt64)  # type: ignore[arg-type]
    elif metric.kind in ("seconds", "ratio"):
        variant = ua.Variant(float(value), ua.VariantType.Double)  # type: ignore[arg-type]
    else:
        variant = ua.Variant(value, _VARIANTS[metric.kind])
    return ua.DataValue(variant, SourceTimestamp=now)  # type: ignore[arg-type]


class _Users:
    """User name and password from the configuration (compared in constant time)."""

    def __init__(self, users: Mapping[str, str], anonymous: bool) -> None:
        self.users = dict(users)
        self.anonymous = anonymous

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if username is None:
            return User(role=UserRole.User) if self.anonymous else None
        want = self.users.get(username)
        if want is None or password is None:
            return None
        if not hmac.compare_digest(want.encode(), password.encode()):
            return None
        return User(role=UserRole.User, name=username)


class PlantOpcUaServer:
    """`await server.run()` serves until cancelled; failures are logged, never raised."""

    def __init__(
        self,
        cfg: OpcUaServerConfig,
        source: LiveSource,
        *,
        site: str,
        keys_dir: Path,
        connections: list[str],
        state_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        # Where the standard address space is kept on disk (agent/floor/aspace.py); None
        # builds it in memory, as asyncua does by default (about 50 MB more).
        self.state_dir = state_dir
        self.source = source
        self.site = site
        self.keys_dir = keys_dir
        self.connections = connections
        self.log = structlog.get_logger("agent.floor").bind(output="opcua", endpoint=cfg.endpoint)
        self.server: Server | None = None
        self.ns = 0
        # The values by row (an equipment's METRICS, the agent's outbox depth, one PLC link's
        # state): their node ids (None: not served) and the values last written, in the row's
        # order, instead of one dict entry and key per value (4,000 for 100 machines).
        self._nodes: dict[str, list[ua.NodeId | None]] = {}
        self._written: dict[str, list[object]] = {}
        self.ready = asyncio.Event()

    @property
    def certificate(self) -> Path:
        return self.cfg.certificate or self.keys_dir / SERVER_CERT

    @property
    def private_key(self) -> Path:
        return self.cfg.private_key or self.keys_dir / SERVER_KEY

    async def _build(self) -> Server:
        cfg = self.cfg
        users = {u.username: u.password for u in cfg.users}
        server = Server(user_manager=_Users(users, cfg.anonymous))  # type: ignore[arg-type]
        shelf: Path | None = None
        if self.state_dir is not None:
            try:
                shelf = await ensure_shelf(self.state_dir)
            except (OSError, RuntimeError) as exc:
                self.log.warning(
                    "standard address space kept in memory: its file could not be made",
                    error=str(exc),
                )
        await init_server(server, shelf)
        server.set_endpoint(cfg.endpoint)
        server.set_server_name("factory edge gateway: plant floor")
        await server.set_application_uri(cfg.application_uri)
        server.set_security_policy(
            [
                ua.SecurityPolicyType.NoSecurity
                if p == "None"
                else getattr(ua.SecurityPolicyType, p)
                for p in cfg.security
            ]
        )
        tokens: list[type] = [ua.UserNameIdentityToken] if users else []
        if cfg.anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        if cfg.secure:
            for path in (self.certificate, self.private_key):
                if not path.exists():
                    raise FileNotFoundError(
                        f"{path} does not exist: create it with "
                        "`edge-agent keys opcua-server-cert -c FILE`"
                    )
            # Read here and handed over as bytes: asyncua would read the files through
            # anyio's worker threads (its thread machinery and a thread's heap, about 1 MB).
            for path, load in (
                (self.certificate, server.load_certificate),
                (self.private_key, server.load_private_key),
            ):
                kind = "pem" if path.suffix.lower() == ".pem" else "der"
                await load(path.read_bytes(), format=kind)
        if cfg.trusted_clients is not None:
            server.set_certificate_validator(await self._validator(cfg.trusted_clients))
        self.ns = await server.register_namespace(cfg.namespace)
        await self._address_space(server)
        # Building the nodes allocates and frees about 40 MB of asyncua's objects (the
        # compact nodes keep 5 MB of them for 100 machines); glibc would keep about 2 MB.
        release_free_memory()
        return server

    async def _validator(self, folder: Path) -> Any:
        """Accepts the client certificates in `folder` (read at start); an empty or missing
        folder refuses every secure channel instead of stopping the server."""
        found = await asyncio.to_thread(
            lambda: [p for p in folder.glob("*") if p.suffix.lower() in (".der", ".pem")]
        )
        if not found:
            self.log.error(
                "trusted_clients holds no certificate (.der or .pem): no client can connect",
                folder=str(folder),
            )

            async def refuse_all(cert: Any, app_description: Any) -> None:
                raise ServiceError(StatusCodes.BadCertificateUntrusted)

            return refuse_all
        store = TrustStore([folder], [])
        await store.load()
        return CertificateValidator(
            CertificateValidatorOptions.TIME_RANGE
            | CertificateValidatorOptions.URI
            | CertificateValidatorOptions.TRUSTED
            | CertificateValidatorOptions.PEER_CLIENT,
            store,
        )

    async def _variable(
        self, parent: Any, key: tuple[str, int], name: str, metric: Metric
    ) -> list[ua.NodeId]:
        """Adds a value (and its engineering unit) at `key` (row, place in the row); returns
        the node ids it made."""
        nodeid = _nid(name, self.ns)
        made = [nodeid]
        var = await parent.add_variable(
            nodeid,
            ua.QualifiedName(name.rsplit(".", 1)[-1], self.ns),
            ua.Variant(None, ua.VariantType.Null),
            datatype=_nid(_DATATYPES[metric.kind]),
        )
        await var.write_attribute(
            AttributeIds.Description,
            ua.DataValue(ua.Variant(ua.LocalizedText(metric.description))),
        )
        unit = metric.unit
        if unit is not None:
            eu = ua.EUInformation(
                NamespaceUri=_UNECE,
                UnitId=unit_id(unit.code),
                DisplayName=ua.LocalizedText(unit.display),
                Description=ua.LocalizedText(unit.description),
            )
            made.append(_nid(f"{name}.EngineeringUnits", self.ns))
            await var.add_property(
                made[-1],
                ua.QualifiedName("EngineeringUnits", 0),
                eu,
                datatype=_nid(ObjectIds.EUInformation),
            )
        row, place = key
        nodeids = self._nodes.setdefault(row, [])
        nodeids.extend([None] * (place + 1 - len(nodeids)))
        nodeids[place] = nodeid
        return made

    def _qn(self, name: str) -> ua.QualifiedName:
        return ua.QualifiedName(name, self.ns)

    async def _address_space(self, server: Server) -> None:
        """Builds the plant's nodes by asyncua's calls and compacts them one equipment at a
        time (agent/floor/nodes.py)."""
        aspace = server.iserver.aspace
        interner = Interner()
        plant = await server.nodes.objects.add_folder(_nid("Plant", self.ns), self._qn("Plant"))
        site = await plant.add_folder(_nid(f"Plant.{self.site}", self.ns), self._qn(self.site))
        containers = [plant.nodeid, site.nodeid]
        lines: dict[str, Any] = {}
        served = self.cfg.equipment
        live = self.source.read()
        for eq, item in live.items():
            if served is not None and eq not in served:
                continue
            line_name = item.line or "_"
            if line_name not in lines:
                lines[line_name] = await site.add_folder(
                    _nid(f"Plant.{self.site}.{line_name}", self.ns), self._qn(line_name)
                )
                containers.append(lines[line_name].nodeid)
            obj = await lines[line_name].add_object(_nid(eq, self.ns), self._qn(eq))
            made = [obj.nodeid]
            folders: dict[str, Any] = {}
            for place, metric in enumerate(METRICS):
                path = browse_path(metric.name)
                parent = obj
                if len(path) > 1:
                    if path[0] not in folders:
                        folders[path[0]] = await obj.add_folder(
                            _nid(f"{eq}.{path[0]}", self.ns), self._qn(path[0])
                        )
                        made.append(folders[path[0]].nodeid)
                    parent = folders[path[0]]
                made += await self._variable(
                    parent, (eq, place), node_name(eq, metric.name), metric
                )
            compact(aspace, made, interner)
            # Its engineering units are made again when asked for (nodes.VirtualProperties).
            make_properties_virtual(aspace, made)
            await asyncio.sleep(0)  # the agent's other tasks run between two equipment
        agent = await site.add_object(_nid(f"{self.site}.Agent", self.ns), self._qn("Agent"))
        made = [agent.nodeid]
        made += await self._variable(agent, ("", 0), f"{self.site}.Agent.OutboxDepth", OUTBOX_DEPTH)
        links = await agent.add_folder(_nid(f"{self.site}.Agent.Links", self.ns), self._qn("Links"))
        made.append(links.nodeid)
        for conn in self.connections:
            folder = await links.add_folder(
                _nid(f"{self.site}.Agent.Links.{conn}", self.ns), self._qn(conn)
            )
            made.append(folder.nodeid)
            made += await self._variable(
                folder,
                (f"link:{conn}", 0),
                f"{self.site}.Agent.Links.{conn}.Connected",
                _LINK,
            )
        compact(aspace, made + containers, interner)
        # Until the first update writes what is known, every value is undefined: one null
        # value with BadNoData for all (asyncua would store a copy of its own per node for a
        # write of a bad status), and an update writes only the values that are defined.
        undefined = ua.DataValue(
            ua.Variant(None, ua.VariantType.Null),
            StatusCode=UNDEFINED,
            SourceTimestamp=datetime.now(UTC),  # type: ignore[arg-type]
        )
        for row, nodeids in self._nodes.items():
            for nodeid in nodeids:
                if nodeid is not None:
                    aspace[nodeid].value.value = undefined  # type: ignore[attr-defined]
            self._written[row] = [None] * len(nodeids)

    def _rows(self) -> Iterator[tuple[str, Sequence[Metric], list[Value]]]:
        for eq, item in self.source.read().items():
            yield eq, METRICS, [item.values.get(metric.name) for metric in METRICS]
        yield "", (OUTBOX_DEPTH,), [self.source.outbox_depth()]
        links = self.source.links()
        for conn in self.connections:
            yield f"link:{conn}", (_LINK,), [links.get(conn, False)]

    async def update(self) -> None:
        """Write every value that changed since the last update (one source timestamp)."""
        if self.server is None:
            raise RuntimeError("the OPC UA server is not started")
        now = datetime.now(UTC)
        # Equal values written in one update share their DataValue (asyncua never changes a
        # stored one): one `True` for every link that is up, one `running` for every press.
        made: dict[tuple[str, Value], ua.DataValue] = {}
        for row, metrics, values in self._rows():
            nodeids = self._nodes.get(row)
            if nodeids is None:
                continue
            written = self._written.setdefault(row, [_UNWRITTEN] * len(nodeids))
            cells = zip(nodeids, metrics, values, strict=False)  # a row is served whole
            for place, (nodeid, metric, value) in enumerate(cells):
                if nodeid is None or written[place] == value:
                    continue
                key = (metric.kind, value)
                data = made.get(key)
                if data is None:
                    data = made[key] = _data_value(metric, value, now)
                await self.server.write_attribute_value(nodeid, data)
                written[place] = value

    async def run(self) -> None:
        delay = 1.0
        while True:
            try:
                self.server = await self._build()
                async with self.server:
                    self.log.info("OPC UA server listening", policies=self.cfg.security)
                    delay = 1.0
                    failing = False
                    while True:
                        try:
                            await self.update()
                        except Exception as exc:  # keep serving the last values
                            if not failing:
                                self.log.error(
                                    "live values unreadable; serving the last ones",
                                    error=repr(exc),
                                )
                            failing = True
                        else:
                            if failing:
                                self.log.info("live values readable again")
                            failing = False
                        self.ready.set()
                        await asyncio.sleep(self.cfg.update_interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the floor output must never stop the agent
                self.log.error("OPC UA server failed; restarting", error=repr(exc))
                self.ready.clear()
                self._nodes.clear()
                self._written.clear()
                with contextlib.suppress(Exception):
                    if self.server is not None:
                        await self.server.stop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
