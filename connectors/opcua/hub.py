"""One hub per OPC UA server: session, security, node resolution, subscriptions or polling.

The hub owns the session and its reconnect loop. Every (re)connect starts from a fresh
client: node ids are resolved again (a restarted server may hand out other namespace indexes;
`nsu=` ids and browse paths follow it) and the subscription and its monitored items are
created anew, so a server restart never leaves the agent with BadNodeIdUnknown until a
restart. Reconnects back off exponentially with jitter, capped.

Values map to Samples: a Good status gives quality "good", anything else "bad" with no
value. Timestamps are the source's by default (server's or the agent's as options); the
server's clock is compared with the agent's at connect and every minute, and a skew beyond
`max_clock_skew` is logged and kept in `clock_skew_s`. Errors that need a person (a server
certificate that is not trusted, a client certificate or user the server rejects) raise
`OpcUaTrustError` with a message saying what to do; the hub logs it and keeps retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.ua_utils import get_base_data_type
from asyncua.crypto import security_policies as sp
from asyncua.crypto import uacrypto
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError

from common.retry import Backoff
from connectors.connector import Emit, EquipmentSource, raise_if_cancelled
from connectors.opcua.config import OpcUaConnection
from connectors.sample import Sample

_POLICIES: dict[str, type[sp.SecurityPolicy]] = {
    "Basic256Sha256": sp.SecurityPolicyBasic256Sha256,
    "Aes128Sha256RsaOaep": sp.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256Sha256RsaPss": sp.SecurityPolicyAes256Sha256RsaPss,
}
_MODES = {
    "None": ua.MessageSecurityMode.None_,
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}
# What servers answer when they do not trust the client certificate (most say only
# BadSecurityChecksFailed, so as not to tell an attacker why).
_UNTRUSTED = frozenset({StatusCodes.BadSecurityChecksFailed, StatusCodes.BadCertificateUntrusted})
_REJECTED = {
    StatusCodes.BadCertificateInvalid: "the server says the client certificate is invalid",
    StatusCodes.BadCertificateUriInvalid: "the client certificate's application URI does not "
    "match application_uri",
    StatusCodes.BadIdentityTokenRejected: "the server rejected the user name or password",
    StatusCodes.BadIdentityTokenInvalid: "the server rejected the user name or password",
    StatusCodes.BadUserAccessDenied: "the server rejected the user name or password",
}
# The built-in data types (namespace 0) a node's DataType resolves to, in the names the
# Modbus codec uses, so a counter reads the same way whichever protocol delivers it.
_BUILTIN_TYPES = {
    ObjectIds.Boolean: "bool",
    ObjectIds.SByte: "int8",
    ObjectIds.Byte: "uint8",
    ObjectIds.Int16: "int16",
    ObjectIds.UInt16: "uint16",
    ObjectIds.Int32: "int32",
    ObjectIds.UInt32: "uint32",
    ObjectIds.Int64: "int64",
    ObjectIds.UInt64: "uint64",
    ObjectIds.Float: "float32",
    ObjectIds.Double: "float64",
    ObjectIds.String: "string",
    ObjectIds.Enumeration: "int32",  # enumerations travel as Int32
}
_READ_CHUNK = 1000  # nodes per Read / CreateMonitoredItems request (servers cap these)
_SKEW_CHECK_EVERY = 60.0
_AFTER = timedelta(microseconds=1)  # the smallest step the engine tells apart


class _TranslatedFailures(logging.Filter):
    """Drops asyncua's own report of a connection failure that the hub turns into one
    message saying what to do, logged once: asyncua logs it with a traceback, every retry."""

    MESSAGES = frozenset(
        {
            "Exception raised while parsing message from server",
            "Got error status from server: %s",
            "Received an error: %r",
            "create_session fault response: %s (%s)",
        }
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.MESSAGES


_TRANSLATED = _TranslatedFailures()


class OpcUaError(Exception):
    """The OPC UA connection cannot be used (refused, timed out, no matching endpoint)."""


class OpcUaTrustError(OpcUaError):
    """A certificate or user that a person must trust or fix; retrying alone will not help."""


@dataclass(frozen=True)
class OpcUaTag:
    """One signal of one equipment, as the hub reads it."""

    equipment_id: str
    signal: str
    node: str
    scale: float = 1.0
    offset: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.equipment_id}/{self.signal}"


def opcua_tags(connection_id: str, equipment: Sequence[EquipmentSource]) -> list[OpcUaTag]:
    """The tags of every equipment attached to connection `connection_id`."""
    return [
        OpcUaTag(eq.id, str(name), sig.node, sig.scale, sig.offset)
        for eq in equipment
        if eq.connection == connection_id
        for name, sig in eq.signals.items()
        if sig.node is not None
    ]


def thumbprint(der: bytes) -> str:
    return hashlib.sha1(der, usedforsecurity=False).hexdigest()


def _load_der(path: Path) -> bytes:
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        return x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
    return data


def _utc(ts: datetime | None) -> datetime | None:
    if ts is None:
        return None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def plain_value(value: Any) -> bool | int | float | str | None:
    """An OPC UA variant value as a Sample value; raises ValueError for what has none."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return int(value.value) if isinstance(value.value, int) else str(value.name)
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, datetime):
        return _utc(value).isoformat()  # type: ignore[union-attr]
    if isinstance(value, bytes):
        return value.hex()
    raise ValueError(f"a {type(value).__name__} value cannot be a signal value")


async def resolve_node(client: Client, text: str, namespaces: list[str]) -> ua.NodeId:
    """A node id from config notation, against the server's current namespace table."""
    if text.startswith("/"):
        node = client.nodes.root
        for part in (p for p in text.split("/") if p):
            prefix, _, name = part.partition(":")
            if name and prefix.isdigit():
                node = await node.get_child(part)
                continue
            # No namespace index given: match the name in any namespace, so the path keeps
            # working when the server hands out other indexes after a restart.
            refs = await node.get_children_descriptions()
            found = [r for r in refs if r.BrowseName.Name == part]
            if not found:
                raise ValueError(f"no child {part!r} under {node.nodeid.to_string()}")
            node = client.get_node(found[0].NodeId)
        return node.nodeid
    if text.startswith("nsu="):
        uri, _, rest = text[4:].partition(";")
        if uri not in namespaces:
            raise ValueError(f"the server has no namespace {uri}")
        return ua.NodeId.from_string(f"ns={namespaces.index(uri)};{rest}")
    return ua.NodeId.from_string(text)


async def _builtin_type(client: Client, data_type: ua.NodeId) -> str | None:
    """The built-in type a DataType is or derives from (UInt32 for Counter), or None for a
    structure, an abstract type (Number) or a type the server cannot trace back."""

    def known(node_id: ua.NodeId) -> bool:
        return node_id.NamespaceIndex == 0 and node_id.Identifier in _BUILTIN_TYPES

    if not known(data_type):
        try:
            data_type = (await get_base_data_type(client.get_node(data_type))).nodeid
        except (UaError, ValueError):
            return None
    return _BUILTIN_TYPES[data_type.Identifier] if known(data_type) else None  # type: ignore[index]


def _no_endpoint(cfg: OpcUaConnection, endpoints: Sequence[ua.EndpointDescription]) -> str:
    offered = sorted(
        {f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name}" for e in endpoints}
    )
    return (
        f"the server offers no endpoint with {cfg.security_policy}/{cfg.security_mode}; "
        f"it offers {', '.join(offered)} (set security_policy and security_mode to one of them)"
    )


class _Handler:
    """asyncua calls this for each notification; it only queues, the hub does the work."""

    def __init__(self, queue: asyncio.Queue[tuple[int, ua.DataValue]], lost: asyncio.Event):
        self.queue = queue
        self.lost = lost

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        item = data.monitored_item
        self.queue.put_nowait((int(item.ClientHandle), item.Value))

    def status_change_notification(self, status: Any) -> None:
        self.lost.set()


class OpcUaHub:
    """Reads one OPC UA server; `async with hub: await hub.run(emit)`."""

    def __init__(self, config: OpcUaConnection, tags: Sequence[OpcUaTag]) -> None:
        self.config = config
        self.tags = list(tags)
        self.connected = False
        self.requests = 0
        self.notifications = 0
        self.last_read_latency_s: float | None = None
        self.clock_skew_s: float | None = None
        self.problems: dict[str, str] = {}
        self.last_error: str | None = None
        self.resolved: dict[str, ua.NodeId] = {}
        self.source_types: dict[str, str] = {}  # tag key -> the node's declared data type
        # tag key -> when the hub last declared it unreadable (stamped with the agent's clock).
        # A value read after that is news from then on, even when the server stamps it with the
        # older time the value last changed (a restarted server, a machine running for hours):
        # stamped earlier, the engine would drop it as older than the loss and keep the machine
        # unknown until its next change.
        self._bad_since: dict[str, datetime] = {}
        self._client: Client | None = None
        self._skew_reported = False
        self._lost = asyncio.Event()
        self._log = structlog.get_logger("connectors.opcua").bind(connection=config.id)
        # The hub logs connection state changes itself; asyncua would add a warning for every
        # closed socket on every failed reconnect attempt.
        logging.getLogger("asyncua").setLevel(logging.ERROR)
        for name in ("asyncua.client.ua_client.UASocketProtocol", "asyncua.client.client"):
            logging.getLogger(name).addFilter(_TRANSLATED)  # once: addFilter skips a repeat

    async def __aenter__(self) -> OpcUaHub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._disconnect()

    # -- session ------------------------------------------------------------------------

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        self.connected = False
        if client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await client.disconnect()
            # a half-open client may still hold its socket after a failed disconnect
            with contextlib.suppress(Exception):
                client.uaclient.disconnect_socket()

    async def _secure(self, client: Client) -> None:
        cfg = self.config
        if cfg.certificate is None or cfg.private_key is None:  # see OpcUaConnection
            raise ValueError("a secure connection needs certificate and private_key")
        policy = _POLICIES[cfg.security_policy]
        mode = _MODES[cfg.security_mode]
        endpoints = await client.connect_and_get_server_endpoints()
        match = [
            e for e in endpoints if e.SecurityPolicyUri == policy.URI and e.SecurityMode == mode
        ]
        if not match:
            raise OpcUaError(_no_endpoint(cfg, endpoints))
        server_der = match[0].ServerCertificate
        if cfg.server_certificate is not None:
            trusted = await asyncio.to_thread(_load_der, cfg.server_certificate)
            if server_der[: len(trusted)] != trusted:
                raise OpcUaTrustError(
                    f"the server's certificate (SHA-1 {thumbprint(server_der)}) is not the "
                    f"trusted one in {cfg.server_certificate} (SHA-1 {thumbprint(trusted)}); "
                    "if the server's certificate was replaced on purpose, put the new one there"
                )
        from cryptography.hazmat.primitives.serialization import Encoding

        # the endpoint may carry a chain; the channel is secured with its first certificate
        server_cert = uacrypto.x509_from_der(server_der)  # type: ignore[no-untyped-call]
        await client._set_security(  # the public wrapper would fetch the endpoints again
            policy,
            uacrypto.CertProperties(str(cfg.certificate)),
            uacrypto.CertProperties(str(cfg.private_key), password=cfg.private_key_password),
            uacrypto.CertProperties(server_cert.public_bytes(Encoding.DER), extension="der"),
            mode,
        )

    async def connect(self) -> Client:
        """A connected, activated session with every tag resolved (or its problem noted)."""
        cfg = self.config
        client = Client(cfg.url, timeout=cfg.timeout, watchdog_intervall=max(1.0, cfg.timeout / 2))
        client.application_uri = cfg.application_uri
        # Servers free the session of an agent that died after this long (ms); asyncua's
        # default of an hour keeps dead sessions around on small PLC servers.
        client.session_timeout = 60_000
        client.name = client.description = "edge-agent"
        if cfg.username is not None:
            client.set_user(cfg.username)
            client.set_password(cfg.password or "")
        lost = asyncio.Event()

        async def on_lost(exc: Exception) -> None:
            lost.set()

        client.connection_lost_callback = on_lost
        self._lost = lost
        secure = cfg.security_policy != "None"
        try:
            async with asyncio.timeout(cfg.timeout * 3) as whole:
                if secure:
                    await self._secure(client)
                await client.connect()
        except UaStatusCodeError as exc:
            await self._abandon(client)
            if exc.code in _UNTRUSTED and secure:
                raise OpcUaTrustError(await self._untrusted(exc.code)) from exc
            if exc.code in _REJECTED:
                raise OpcUaTrustError(f"{_REJECTED[exc.code]} ({exc})") from exc
            raise OpcUaError(f"connect failed: {exc}") from exc
        except TimeoutError as exc:
            await self._abandon(client)
            # either one request went unanswered or the whole handshake took too long
            limit = cfg.timeout * 3 if whole.expired() else cfg.timeout
            raise OpcUaError(f"no answer from {cfg.url} within {limit:g}s") from exc
        except (OSError, ConnectionError) as exc:
            await self._abandon(client)
            raise OpcUaError(f"cannot connect to {cfg.url}: {exc}") from exc
        except OpcUaError:
            await self._abandon(client)
            raise
        except Exception as exc:
            await self._abandon(client)
            if secure:
                # A server that does not trust the certificate answers the request to open
                # the secure channel with a fault that asyncua cannot parse (node-opcua and
                # others), so it surfaces as an AssertionError.
                self._log.debug("secure handshake failed", error=repr(exc))
                raise OpcUaTrustError(await self._untrusted(None)) from exc
            if (no_endpoint := await self._no_insecure_endpoint()) is not None:
                raise OpcUaError(no_endpoint) from exc
            raise OpcUaError(f"connect failed: {type(exc).__name__}: {exc}") from exc
        self._client = client
        self.problems.clear()  # what the last connection (or its failure) left is history
        try:
            await self._resolve(client)
            await self._check_clock(client)
        except Exception:
            await self._disconnect()
            raise
        return client

    async def _no_insecure_endpoint(self) -> str | None:
        """Why a connection without security failed, when the server offers none (asks the
        server for its endpoints on this failure path only)."""
        client = Client(self.config.url, timeout=self.config.timeout)
        try:
            async with asyncio.timeout(self.config.timeout * 3):
                endpoints = await client.connect_and_get_server_endpoints()
        except Exception:  # the first failure is the one to report
            return None
        finally:
            await self._abandon(client)
        if any(e.SecurityMode == ua.MessageSecurityMode.None_ for e in endpoints):
            return None
        return _no_endpoint(self.config, endpoints)

    async def _untrusted(self, status: int | None) -> str:
        """What to do when the server did not accept our certificate."""
        cert = self.config.certificate
        if cert is None:  # a secure connection has one (see OpcUaConnection)
            raise ValueError("a secure connection needs a certificate")
        try:
            ours = f"SHA-1 {thumbprint(await asyncio.to_thread(_load_der, cert))}"
        except (OSError, ValueError) as exc:
            ours = f"unreadable: {exc}"
        answer = f" ({ua.StatusCode(ua.UInt32(status)).name})" if status else ""
        return (
            f"the server rejected our certificate {cert} ({ours}){answer}: trust it on the "
            "server; for most servers, move it from the server's rejected certificates folder "
            "to its trusted folder (the agent retries by itself)"
        )

    async def _abandon(self, client: Client) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await client.disconnect()
        with contextlib.suppress(Exception):
            client.uaclient.disconnect_socket()

    async def _resolve(self, client: Client) -> None:
        self.resolved.clear()
        self.source_types.clear()
        namespaces = list(await client.get_namespace_array())
        for tag in self.tags:
            try:
                self.resolved[tag.key] = await resolve_node(client, tag.node, namespaces)
            except (UaStatusCodeError, UaError, ValueError) as exc:
                self._problem(tag.key, f"node {tag.node} not found: {exc}")
        await self._read_source_types(client)

    async def _read_source_types(self, client: Client) -> None:
        """The DataType each resolved node declares, before any of its values is emitted, so
        a counter without `type:` counts at the width the PLC declares (see Sample)."""
        keys = list(self.resolved)
        builtin: dict[ua.NodeId, str | None] = {}
        for i in range(0, len(keys), _READ_CHUNK):
            chunk = keys[i : i + _READ_CHUNK]
            self.requests += 1
            values = await client.uaclient.read_attributes(
                [self.resolved[k] for k in chunk], AttributeIds.DataType
            )
            for key, dv in zip(chunk, values, strict=True):
                data_type = dv.Value.Value if dv.Value is not None else None
                if not isinstance(data_type, ua.NodeId):
                    continue  # unreadable: the configured type applies
                if data_type not in builtin:
                    builtin[data_type] = await _builtin_type(client, data_type)
                if (name := builtin[data_type]) is not None:
                    self.source_types[key] = name

    async def _check_clock(self, client: Client) -> None:
        before = datetime.now(UTC)
        try:
            server_now = await client.nodes.server.get_child(["0:ServerStatus", "0:CurrentTime"])
            value = await server_now.read_value()
        except (UaError, ValueError, TypeError) as exc:
            # a server without a readable clock still serves values; skew stays unknown
            self._log.debug("server clock not readable", error=str(exc))
            return
        after = datetime.now(UTC)
        server_time = _utc(value) if isinstance(value, datetime) else None
        if server_time is None:
            return
        skew = (server_time - (before + (after - before) / 2)).total_seconds()
        self.clock_skew_s = skew
        too_far = abs(skew) > self.config.max_clock_skew
        if too_far and not self._skew_reported:
            self._log.warning(
                "server clock differs from the agent's",
                skew_s=round(skew, 3),
                limit_s=self.config.max_clock_skew,
                timestamps=self.config.timestamps,
            )
        elif not too_far and self._skew_reported:
            self._log.info("server clock agrees with the agent's again", skew_s=round(skew, 3))
        self._skew_reported = too_far

    # -- values -------------------------------------------------------------------------

    def _problem(self, key: str, reason: str) -> None:
        if self.problems.get(key) != reason:
            self._log.warning("signal unreadable", tag=key, reason=reason)
        self.problems[key] = reason

    def _timestamp(self, dv: ua.DataValue, now: datetime) -> datetime:
        mode = self.config.timestamps
        ts = None
        if mode == "source":
            ts = _utc(dv.SourceTimestamp) or _utc(dv.ServerTimestamp)
        elif mode == "server":
            ts = _utc(dv.ServerTimestamp)
        if ts is None:
            return now
        # A timestamp from the future would reorder the equipment's history: use ours.
        if ts - now > timedelta(seconds=self.config.max_clock_skew):
            return now
        return ts

    def sample(self, tag: OpcUaTag, dv: ua.DataValue) -> Sample:
        now = datetime.now(UTC)
        ts = self._timestamp(dv, now)
        lost_at = self._bad_since.get(tag.key)
        if lost_at is not None and ts <= lost_at:
            ts = lost_at + _AFTER
        status = dv.StatusCode or ua.StatusCode()
        if not status.is_good():
            self._problem(tag.key, f"node {tag.node}: status {status.name}")
            return Sample(tag.equipment_id, tag.signal, None, ts, "bad")
        try:
            value = plain_value(dv.Value.Value if dv.Value is not None else None)
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if numeric and (tag.scale != 1.0 or tag.offset != 0.0):
                value = value * tag.scale + tag.offset  # type: ignore[operator]
        except ValueError as exc:
            self._problem(tag.key, str(exc))
            return Sample(tag.equipment_id, tag.signal, None, ts, "bad")
        if self.problems.pop(tag.key, None) is not None:
            self._log.info("signal readable again", tag=tag.key)
        return Sample(
            tag.equipment_id, tag.signal, value, ts, source_type=self.source_types.get(tag.key)
        )

    def _unresolved(self) -> list[Sample]:
        return self._declare_bad([t for t in self.tags if t.key not in self.resolved])

    def _all_bad(self) -> list[Sample]:
        return self._declare_bad(self.tags)

    def _declare_bad(self, tags: Sequence[OpcUaTag]) -> list[Sample]:
        now = datetime.now(UTC)
        for t in tags:
            self._bad_since[t.key] = now
        return [Sample(t.equipment_id, t.signal, None, now, "bad") for t in tags]

    async def read_once(self, client: Client) -> list[Sample]:
        """One batched Read of every resolved tag."""
        tags = [t for t in self.tags if t.key in self.resolved]
        out: list[Sample] = []
        started = time.monotonic()
        for i in range(0, len(tags), _READ_CHUNK):
            chunk = tags[i : i + _READ_CHUNK]
            self.requests += 1
            values = await client.uaclient.read_attributes(
                [self.resolved[t.key] for t in chunk], AttributeIds.Value
            )
            out.extend(self.sample(t, dv) for t, dv in zip(chunk, values, strict=True))
        self.last_read_latency_s = time.monotonic() - started
        return out

    async def _poll(self, client: Client, emit: Emit) -> None:
        last_clock = time.monotonic()
        while True:
            raise_if_cancelled()
            started = time.monotonic()
            if self._lost.is_set():
                raise ConnectionError("connection lost")
            for sample in await self.read_once(client):
                await emit(sample)
            if started - last_clock > _SKEW_CHECK_EVERY:
                await self._check_clock(client)
                last_clock = started
            await asyncio.sleep(max(0.0, self.config.poll_interval - (time.monotonic() - started)))

    async def _subscribe(self, client: Client, emit: Emit) -> None:
        cfg = self.config
        queue: asyncio.Queue[tuple[int, ua.DataValue]] = asyncio.Queue()
        handler = _Handler(queue, self._lost)
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=cfg.publishing_interval * 1000,
            RequestedLifetimeCount=max(30, int(3 * 10 * cfg.timeout / cfg.publishing_interval)),
            RequestedMaxKeepAliveCount=max(3, int(cfg.timeout / cfg.publishing_interval)),
            MaxNotificationsPerPublish=10_000,
            PublishingEnabled=True,
            Priority=0,
        )
        self.requests += 1
        sub = await client.create_subscription(params, handler)
        handles = {i + 1: t for i, t in enumerate(self.tags) if t.key in self.resolved}
        for sample in await self._monitor(sub, handles, with_filter=cfg.deadband > 0):
            await emit(sample)
        last_clock = time.monotonic()
        while True:
            raise_if_cancelled()
            try:
                handle, dv = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if self._lost.is_set():
                    raise ConnectionError("connection lost") from None
                if time.monotonic() - last_clock > _SKEW_CHECK_EVERY:
                    await self._check_clock(client)
                    last_clock = time.monotonic()
                continue
            tag = handles.get(handle)
            if tag is None:
                continue
            self.notifications += 1
            await emit(self.sample(tag, dv))

    def _item(self, handle: int, tag: OpcUaTag, with_filter: bool) -> ua.MonitoredItemCreateRequest:
        cfg = self.config
        params = ua.MonitoringParameters(
            ClientHandle=handle,
            SamplingInterval=cfg.sampling_interval * 1000,
            QueueSize=cfg.queue_size,
            DiscardOldest=True,
        )
        if with_filter:
            params.Filter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=ua.DeadbandType.Absolute,
                DeadbandValue=cfg.deadband,
            )
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(
                NodeId=self.resolved[tag.key], AttributeId=AttributeIds.Value
            ),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=params,
        )

    async def _monitor(
        self, sub: Any, handles: dict[int, OpcUaTag], *, with_filter: bool
    ) -> list[Sample]:
        """Create the monitored items; returns a bad Sample for each one the server refused."""
        items = list(handles.items())
        retry: dict[int, OpcUaTag] = {}
        bad: list[Sample] = []
        for i in range(0, len(items), _READ_CHUNK):
            chunk = items[i : i + _READ_CHUNK]
            self.requests += 1
            results = await sub.create_monitored_items(
                [self._item(h, t, with_filter) for h, t in chunk]
            )
            for (handle, tag), result in zip(chunk, results, strict=True):
                if not isinstance(result, ua.StatusCode):
                    continue
                if with_filter and result.value in (
                    StatusCodes.BadFilterNotAllowed,
                    StatusCodes.BadMonitoredItemFilterUnsupported,
                ):
                    retry[handle] = tag  # a deadband only applies to numbers
                    continue
                self._problem(tag.key, f"cannot monitor {tag.node}: {result.name}")
                bad.append(Sample(tag.equipment_id, tag.signal, None, datetime.now(UTC), "bad"))
        if retry:
            bad += await self._monitor(sub, retry, with_filter=False)
        return bad

    # -- the loop -----------------------------------------------------------------------

    async def run(self, emit: Emit) -> None:
        """Read forever; reconnect with capped exponential backoff and jitter."""
        attempt = 0
        ever = False
        while True:
            try:
                client = await self.connect()
                self.connected = True
                self.last_error = None
                self._log.info("recovered" if ever else "connected", url=self.config.url)
                ever = True
                attempt = 0
                for sample in self._unresolved():
                    await emit(sample)
                if self.config.mode == "poll":
                    await self._poll(client, emit)
                else:
                    await self._subscribe(client, emit)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelled(exc)
                message = str(exc) or type(exc).__name__
                if isinstance(exc, TimeoutError):  # a request asyncua gave up on
                    message = f"no answer from {self.config.url} within {self.config.timeout:g}s"
                was_connected = self.connected
                await self._disconnect()
                # every signal is unreadable for the same reason, logged once for the hub
                self.problems = dict.fromkeys((t.key for t in self.tags), message)
                if was_connected or message != self.last_error:
                    self._log.warning("lost" if was_connected else "cannot connect", error=message)
                    for sample in self._all_bad():
                        await emit(sample)
                self.last_error = message
                attempt += 1
                backoff = Backoff(self.config.reconnect_min, self.config.reconnect_max)
                await asyncio.sleep(backoff.delay(attempt))
