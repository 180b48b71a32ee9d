"""The plant-floor OPC UA server's security and behaviour, with an asyncua client over TCP:
only the configured endpoints are offered (no None unless listed), a session needs a
listed user and, with `trusted_clients`, a trusted client certificate; nothing is writable;
the values are the engine's; a server that cannot start is retried, never raised."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError

from agent.config import parse_config
from agent.floor.live import LiveSource
from agent.floor.opcua_server import PlantOpcUaServer
from connectors.opcua.certs import create_certificate
from connectors.sample import Sample
from oee.engine import PlantEngine
from tests.conftest import free_port
from tests.faults.harness import wait_for

NS = "urn:factory-edge-gateway:plant-floor"
CLIENT_URI = "urn:plant:test-client"
CONFIG = """
agent: {{id: edge-ua, site: plant-ua, timezone: UTC, bucket_seconds: 1}}
shifts: [{{name: all-day, start: "00:00", end: "00:00"}}]
opcua_server:
  endpoint: opc.tcp://127.0.0.1:{port}
  security: {security}
  trusted_clients: {trusted}
  users: [{{username: hmi, password: right-password}}]
  update_interval: 100ms
equipment:
  - id: press-1
    line: line-1
    ideal_cycle_time: 1s
    signals:
      state: {{map: {{0: idle, 1: running, 2: fault}}}}
      total_count: {{}}
      reason: {{map: {{1: jam}}}}
"""


def make_server(
    tmp_path: Path, port: int, security: str = "[Basic256Sha256_SignAndEncrypt]"
) -> PlantOpcUaServer:
    keys = tmp_path / "keys"
    trusted = tmp_path / "trusted"
    trusted.mkdir(exist_ok=True)
    if not (keys / "opcua-server.der").exists():
        create_certificate(
            keys / "opcua-server.der",
            keys / "opcua-server.pem",
            application_uri="urn:factory-edge-gateway:edge-agent:server",
            hostnames=["127.0.0.1"],
        )
    config = parse_config(CONFIG.format(port=port, security=security, trusted=trusted), replay=True)
    assert config.opcua_server is not None
    engine = PlantEngine(
        config.oee_specs(), config.calendar(), agent_id="edge-ua", site_id="plant-ua"
    )
    now = datetime.now(UTC)
    engine.start(now)
    engine.feed(Sample("press-1", "state", 2, now))
    engine.feed(Sample("press-1", "reason", 1, now))
    engine.tick(now + timedelta(microseconds=1))  # applies the scan of `now`
    source = LiveSource(engine, {"press-1": "line-1"}, {"press-1": None}, dict, lambda: 7)
    return PlantOpcUaServer(
        config.opcua_server, source, site="plant-ua", keys_dir=keys, connections=[]
    )


def client_cert(tmp_path: Path, name: str, *, trusted: bool) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.der", tmp_path / f"{name}.pem"
    create_certificate(cert, key, application_uri=CLIENT_URI, hostnames=["127.0.0.1"])
    if trusted:
        (tmp_path / "trusted" / f"{name}.der").write_bytes(cert.read_bytes())
    return cert, key


@contextlib.asynccontextmanager
async def serving(server: PlantOpcUaServer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(server.run())
    try:
        await asyncio.wait_for(server.ready.wait(), 60)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def secure_client(
    url: str,
    cert: Path,
    key: Path,
    *,
    user: str | None,
    password: str | None,
    policy: str = "Basic256Sha256",
) -> Client:
    client = Client(url, timeout=10)
    client.application_uri = CLIENT_URI
    await client.set_security_string(f"{policy},SignAndEncrypt,{cert},{key}")
    if user is not None:
        client.set_user(user)
    if password is not None:
        client.set_password(password)
    return client


async def test_secure_session_reads_the_engine_and_cannot_write(tmp_path: Path) -> None:
    port = free_port()
    server = make_server(tmp_path, port)
    (tmp_path / "trusted").mkdir(exist_ok=True)
    cert, key = client_cert(tmp_path, "hmi", trusted=True)
    async with serving(server):
        url = f"opc.tcp://127.0.0.1:{port}"
        probe = Client(url, timeout=10)
        endpoints = await probe.connect_and_get_server_endpoints()
        offered = {(e.SecurityPolicyUri.rsplit("#", 1)[-1], e.SecurityMode) for e in endpoints}
        assert offered == {("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt)}
        client = await secure_client(url, cert, key, user="hmi", password="right-password")
        async with client:
            ns = await client.get_namespace_index(NS)
            live = server.source.read()["press-1"].values
            for name, metric in (
                ("press-1.State", "State"),
                ("press-1.Reason", "Reason"),
                ("press-1.Product", "Product"),
            ):
                node = client.get_node(ua.NodeId(name, ns))  # type: ignore[arg-type]
                assert await node.read_value() == live[metric]
            assert live["State"] == "fault" and live["Reason"] == "jam"
            # No bucket closed yet: the shift's OEE is undefined, null with BadNoData.
            assert live["Shift/OEE"] is None
            oee = client.get_node(ua.NodeId("press-1.Shift.OEE", ns))  # type: ignore[arg-type]
            value = await oee.read_data_value(raise_on_bad_status=False)
            assert value.StatusCode is not None
            assert value.StatusCode.value == StatusCodes.BadNoData
            assert value.Value is None or value.Value.Value is None
            assert await oee.read_data_type() == ua.NodeId(ObjectIds.Double)  # type: ignore[arg-type]
            depth = client.get_node(ua.NodeId("plant-ua.Agent.OutboxDepth", ns))  # type: ignore[arg-type]
            assert await depth.read_value() == 7
            state = client.get_node(ua.NodeId("press-1.State", ns))  # type: ignore[arg-type]
            with pytest.raises(UaError):
                await state.write_value(ua.Variant("running", ua.VariantType.String))
            assert await state.read_value() == "fault"
            # Browsing by name finds the same node.
            found = await client.nodes.objects.get_child(
                [f"{ns}:Plant", f"{ns}:plant-ua", f"{ns}:line-1", f"{ns}:press-1", f"{ns}:State"]
            )
            assert found.nodeid == state.nodeid


@pytest.mark.parametrize(
    ("user", "password", "trusted"),
    [
        ("hmi", "wrong-password", True),
        (None, None, True),  # anonymous, not allowed
        ("hmi", "right-password", False),  # a certificate not in trusted_clients
    ],
)
async def test_a_session_without_the_right_credentials_is_refused(
    tmp_path: Path, user: str | None, password: str | None, trusted: bool
) -> None:
    port = free_port()
    server = make_server(tmp_path, port)
    cert, key = client_cert(tmp_path, "client", trusted=trusted)
    async with serving(server):
        client = await secure_client(
            f"opc.tcp://127.0.0.1:{port}", cert, key, user=user, password=password
        )
        with pytest.raises((UaError, OSError, TimeoutError)):
            async with client:
                pass


async def test_none_is_offered_only_when_listed(tmp_path: Path) -> None:
    port = free_port()
    server = make_server(tmp_path, port, security="[None, Basic256Sha256_Sign]")
    async with serving(server):
        probe = Client(f"opc.tcp://127.0.0.1:{port}", timeout=10)
        endpoints = await probe.connect_and_get_server_endpoints()
        modes = {e.SecurityMode for e in endpoints}
        assert modes == {ua.MessageSecurityMode.None_, ua.MessageSecurityMode.Sign}


async def test_a_server_that_cannot_listen_is_retried_not_raised(tmp_path: Path) -> None:
    port = free_port()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    server = make_server(tmp_path, port)
    task = asyncio.create_task(server.run())
    try:
        await asyncio.sleep(1.5)
        assert not task.done(), "a failing OPC UA server must not end its task"
        assert not server.ready.is_set()
        blocker.close()
        await wait_for(server.ready.is_set, 60, "the server after the port was freed")
    finally:
        blocker.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_newer_policies(tmp_path: Path) -> None:
    port = free_port()
    server = make_server(
        tmp_path,
        port,
        security="[Aes128Sha256RsaOaep_SignAndEncrypt, Aes256Sha256RsaPss_SignAndEncrypt]",
    )
    cert, key = client_cert(tmp_path, "hmi", trusted=True)
    async with serving(server):
        url = f"opc.tcp://127.0.0.1:{port}"
        for policy in ("Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"):
            client = await secure_client(
                url, cert, key, user="hmi", password="right-password", policy=policy
            )
            async with client:
                ns = await client.get_namespace_index(NS)
                state = client.get_node(ua.NodeId("press-1.State", ns))  # type: ignore[arg-type]
                assert await state.read_value() == "fault"
