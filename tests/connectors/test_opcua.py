"""The OPC UA hub against a real asyncua server (the press simulator) started in the test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from asyncua import ua

from agent.cli import main
from agent.config import ConfigError, parse_config
from common.checks import validate
from connectors.modbus.simulator import Press
from connectors.opcua.certs import create_certificate
from connectors.opcua.config import OpcUaConnection
from connectors.opcua.hub import OpcUaError, OpcUaHub, OpcUaTag, OpcUaTrustError
from connectors.opcua.simulator import OpcUaPressServer
from tests.conftest import free_port
from tests.connectors.harness import running, wait_until


def presses(n: int = 2) -> list[Press]:
    # a frozen press keeps its values still, so a test decides when something changes
    out = [Press(seed=i + 1) for i in range(n)]
    for p in out:
        p.frozen = True
    return out


@pytest.fixture
async def sim() -> AsyncIterator[OpcUaPressServer]:
    server = OpcUaPressServer(presses(), port=free_port())
    await server.start(tick=0.05)
    yield server
    await server.stop()


def connection(sim: OpcUaPressServer, **kw: object) -> OpcUaConnection:
    data: dict[str, object] = {
        "id": "plc",
        "url": sim.url,
        "publishing_interval": "100ms",
        "sampling_interval": "50ms",
        "poll_interval": "100ms",
        "reconnect_min": "100ms",
        "reconnect_max": "1s",
        "timeout": "3s",
    }
    data.update(kw)
    return validate(OpcUaConnection, data)


def press_tags(sim: OpcUaPressServer) -> list[OpcUaTag]:
    return [
        OpcUaTag("p1", "state", sim.nsu_id(1, "State")),  # namespace by URI
        OpcUaTag("p1", "total_count", "/Objects/Press1/TotalCount"),  # browse path, any ns
        OpcUaTag("p2", "state", sim.node_id(2, "State")),  # ns=..;s=..
        OpcUaTag(
            "p2",
            "total_count",
            f"/Objects/{sim.namespace_index}:Press2/{sim.namespace_index}:TotalCount",
        ),
    ]


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_values_flow_and_changes_arrive(sim: OpcUaPressServer, mode: str) -> None:
    hub = OpcUaHub(connection(sim, mode=mode), press_tags(sim))
    async with running(hub) as got:
        await wait_until(
            lambda: len({(s.equipment_id, s.signal) for s in got.samples}) == 4,
            "a value of every tag",
        )
        assert all(s.quality == "good" for s in got.samples), hub.problems
        sim.presses[0].set_state("fault", reason=3)
        sim.presses[1].total_raw = 1234
        await wait_until(lambda: got.value("p1", "state") == 2, "p1 fault")
        await wait_until(lambda: got.value("p2", "total_count") == 1234, "p2 count")
        assert hub.connected
    assert hub.problems == {}


async def test_polling_reads_all_tags_in_one_request_per_cycle(sim: OpcUaPressServer) -> None:
    tags = [
        OpcUaTag(f"p{m}", v, sim.nsu_id(m, v))
        for m in (1, 2)
        for v in ("State", "TotalCount", "ScrapCount", "Reason")
    ]
    hub = OpcUaHub(connection(sim, mode="poll"), tags)
    async with running(hub) as got:
        await wait_until(lambda: len(got.samples) >= 8, "the first poll")
        # Connecting also reads each node's DataType once: count the polls from here.
        base_requests, base_samples = hub.requests, len(got.samples)
        await wait_until(lambda: hub.requests - base_requests >= 5, "five more polls")
        requests = hub.requests - base_requests
        samples = len(got.samples) - base_samples
    # every request carried all eight nodes (one poll may be in flight at either end)
    assert samples >= 8 * (requests - 1)
    assert samples <= 8 * (requests + 1)


async def test_subscription_recreated_after_restart_with_new_namespace_index(
    sim: OpcUaPressServer,
) -> None:
    tags = [
        OpcUaTag("p1", "state", sim.nsu_id(1, "State")),
        OpcUaTag("p1", "total_count", "/Objects/Press1/TotalCount"),
    ]
    hub = OpcUaHub(connection(sim), tags)
    async with running(hub) as got:
        await wait_until(lambda: len(got.samples) >= 2, "first values")
        before = hub.resolved["p1/state"]
        await sim.restart(extra_namespaces=2)
        assert sim.namespace_index != before.NamespaceIndex
        await wait_until(lambda: any(s.quality == "bad" for s in got.samples), "loss noticed")
        await wait_until(
            lambda: hub.connected and hub.resolved.get("p1/state") != before,
            "reconnected and resolved again",
        )
        mark = len(got.of("p1", "state")), len(got.of("p1", "total_count"))
        sim.presses[0].set_state("setup", reason=2)
        sim.presses[0].total_raw = 77
        await wait_until(
            lambda: any(s.value == 3 for s in got.of("p1", "state")[mark[0] :]),
            "state change after restart",
        )
        await wait_until(
            lambda: any(s.value == 77 for s in got.of("p1", "total_count")[mark[1] :]),
            "count change after restart",
        )
    assert hub.resolved["p1/state"].NamespaceIndex == sim.namespace_index
    assert hub.problems == {}


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_bad_status_gives_bad_quality_then_recovers(sim: OpcUaPressServer, mode: str) -> None:
    hub = OpcUaHub(connection(sim, mode=mode), press_tags(sim))
    async with running(hub) as got:
        await wait_until(lambda: got.last("p1", "state") is not None, "first value")
        await sim.write_status(1, "State", ua.StatusCodes.BadSensorFailure)
        await wait_until(lambda: got.quality("p1", "state") == "bad", "bad quality")
        bad = got.last("p1", "state")
        assert bad is not None and bad.value is None
        assert hub.problems["p1/state"] == f"node {sim.nsu_id(1, 'State')}: status BadSensorFailure"
        sim.presses[0].set_state("fault")
        await wait_until(lambda: got.quality("p1", "state") == "good", "good again")
    assert got.value("p1", "state") == 2
    # the other machine was never affected
    assert all(s.quality == "good" for s in got.of("p2", "state"))


async def test_node_that_disappears_while_polled(sim: OpcUaPressServer) -> None:
    hub = OpcUaHub(connection(sim, mode="poll"), press_tags(sim))
    async with running(hub) as got:
        await wait_until(lambda: got.last("p1", "total_count") is not None, "first value")
        await sim.delete_variable(1, "TotalCount")
        await wait_until(lambda: got.quality("p1", "total_count") == "bad", "bad")
        assert "BadNodeIdUnknown" in hub.problems["p1/total_count"]
        mark = len(got.of("p2", "state"))
        sim.presses[1].set_state("fault")
        await wait_until(
            lambda: any(s.value == 2 for s in got.of("p2", "state")[mark:]),
            "other nodes keep flowing",
        )


async def test_missing_node_at_connect_is_reported_and_others_flow(sim: OpcUaPressServer) -> None:
    tags = [
        *press_tags(sim),
        OpcUaTag("p1", "reason", sim.nsu_id(1, "NoSuchVariable")),
        OpcUaTag("p2", "reason", "/Objects/Press2/NoSuchVariable"),
    ]
    hub = OpcUaHub(connection(sim), tags)
    async with running(hub) as got:
        await wait_until(
            lambda: len({(s.equipment_id, s.signal) for s in got.samples}) == 6,
            "every tag reported",
        )
        assert got.quality("p1", "reason") == "bad"
        assert got.quality("p2", "reason") == "bad"
        assert got.quality("p1", "state") == "good"
    assert "BadNodeIdUnknown" in hub.problems["p1/reason"]
    assert "NoSuchVariable" in hub.problems["p2/reason"]


async def test_timestamps_source_by_default_agent_as_option_and_skew_reported() -> None:
    sim = OpcUaPressServer(presses(1), port=free_port(), clock_offset=-600)
    await sim.start(tick=0.05)
    try:
        assert sim.server is not None
        sim.server.disable_clock()
        current = sim.server.get_node(ua.NodeId(ua.ObjectIds.Server_ServerStatus_CurrentTime))
        await current.write_value(datetime.now(UTC) - timedelta(seconds=600))
        tags = [OpcUaTag("p1", "state", sim.nsu_id(1, "State"))]
        for option, expect_old in (("source", True), ("agent", False)):
            hub = OpcUaHub(connection(sim, timestamps=option), tags)
            async with running(hub) as got:
                await wait_until(lambda: got.last("p1", "state") is not None, "a value")
            last = got.last("p1", "state")
            assert last is not None
            age = datetime.now(UTC) - last.ts
            assert (age > timedelta(seconds=300)) is expect_old, (option, age)
            assert hub.clock_skew_s is not None and hub.clock_skew_s < -300
    finally:
        await sim.stop()


async def test_connection_refused_then_server_appears() -> None:
    port = free_port()
    sim = OpcUaPressServer(presses(1), port=port)
    hub = OpcUaHub(connection(sim), [OpcUaTag("p1", "state", sim.nsu_id(1, "State"))])
    async with running(hub) as got:
        await wait_until(lambda: hub.last_error is not None, "a failed attempt")
        assert "cannot connect" in (hub.last_error or "")
        assert got.quality("p1", "state") == "bad"
        await sim.start()
        try:
            await wait_until(lambda: got.quality("p1", "state") == "good", "data flows")
        finally:
            await sim.stop()


# -- security -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    files = {
        n: d / n
        for n in ("server.der", "server.pem", "client.der", "client.pem", "other.der", "other.pem")
    }
    create_certificate(
        files["server.der"],
        files["server.pem"],
        application_uri="urn:factory-edge-gateway:press-sim-server",
        hostnames=["127.0.0.1", "localhost"],
    )
    create_certificate(
        files["client.der"],
        files["client.pem"],
        application_uri="urn:factory-edge-gateway:edge-agent",
    )
    create_certificate(
        files["other.der"],
        files["other.pem"],
        application_uri="urn:factory-edge-gateway:press-sim-server",
    )
    return files


POLICIES = ["Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"]


@pytest.fixture
async def secure_sim(pki: dict[str, Path]) -> AsyncIterator[OpcUaPressServer]:
    server = OpcUaPressServer(
        presses(1),
        port=free_port(),
        security=[(p, m) for p in POLICIES for m in ("Sign", "SignAndEncrypt")],
        certificate=pki["server.der"],
        private_key=pki["server.pem"],
        users={"operator": "s3cret-pw"},
    )
    await server.start(tick=0.05)
    yield server
    await server.stop()


def secure(sim: OpcUaPressServer, pki: dict[str, Path], **kw: object) -> OpcUaConnection:
    base: dict[str, object] = {
        "certificate": str(pki["client.der"]),
        "private_key": str(pki["client.pem"]),
        "server_certificate": str(pki["server.der"]),
        "username": "operator",
        "password": "s3cret-pw",
    }
    base.update(kw)
    return connection(sim, **base)


async def test_each_security_policy_and_mode(
    secure_sim: OpcUaPressServer, pki: dict[str, Path]
) -> None:
    # one server offers every combination, so this test pays for one server start
    for policy in POLICIES:
        for mode in ("Sign", "SignAndEncrypt"):
            cfg = secure(secure_sim, pki, security_policy=policy, security_mode=mode)
            hub = OpcUaHub(cfg, [OpcUaTag("p1", "state", secure_sim.nsu_id(1, "State"))])
            async with running(hub) as got:
                await wait_until(
                    lambda: got.quality("p1", "state") == "good", f"a good value ({policy}/{mode})"
                )


async def test_untrusted_certificate_wrong_password_missing_endpoint_are_clear_errors(
    secure_sim: OpcUaPressServer, pki: dict[str, Path]
) -> None:
    tags = [OpcUaTag("p1", "state", secure_sim.nsu_id(1, "State"))]
    strict = {"security_policy": "Basic256Sha256", "security_mode": "SignAndEncrypt"}
    hub = OpcUaHub(
        secure(secure_sim, pki, server_certificate=str(pki["other.der"]), **strict), tags
    )
    with pytest.raises(OpcUaTrustError, match="not the trusted one"):
        await hub.connect()
    hub = OpcUaHub(secure(secure_sim, pki, password="wrong", **strict), tags)
    with pytest.raises(OpcUaTrustError, match="user name or password"):
        await hub.connect()
    hub = OpcUaHub(connection(secure_sim), tags)  # the server has no unsecured endpoint
    with pytest.raises(OpcUaError, match=r"connect failed|no endpoint"):
        await hub.connect()
    # in the running hub the same error is logged, kept in last_error and retried, not raised
    hub = OpcUaHub(
        secure(secure_sim, pki, server_certificate=str(pki["other.der"]), **strict), tags
    )
    async with running(hub) as got:
        await wait_until(lambda: hub.last_error is not None, "the error")
        assert "not the trusted one" in (hub.last_error or "")
        assert got.quality("p1", "state") == "bad"


def test_certificate_has_the_application_uri(pki: dict[str, Path]) -> None:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(pki["client.der"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "urn:factory-edge-gateway:edge-agent" in san.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert pki["client.pem"].stat().st_mode & 0o077 == 0


# -- configuration --------------------------------------------------------------------------

CONFIG = """\
agent: {id: a1, site: s1}
connections:
  - id: plc-ua
    type: opcua
    url: opc.tcp://127.0.0.1:4840
    %s
equipment:
  - id: press-1
    connection: plc-ua
    ideal_cycle_time: 1s
    signals:
      state: {node: "%s", map: {0: idle, 1: running}}
      total_count: {node: "ns=2;s=Press1.TotalCount", type: uint32}
"""


def test_opcua_config_loads() -> None:
    cfg = parse_config(CONFIG % ("mode: poll", "nsu=urn:x:y;s=Press1.State"))
    assert cfg.connections[0].type == "opcua"
    assert cfg.equipment[0].signals["state"].node == "nsu=urn:x:y;s=Press1.State"
    for node in ("ns=2;s=A.B", "ns=3;i=1001", "i=2258", "/Objects/2:Press/State"):
        parse_config(CONFIG % ("mode: subscribe", node))


def test_typo_in_opcua_connection_names_yaml_path_and_line() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(CONFIG % ("sampling_intervall: 1s", "ns=2;s=A"))
    assert "connections[0].sampling_intervall (line 6): unknown key" in str(exc.value)
    assert "opcua" not in str(exc.value).split("connections[0]")[1].split(":")[0]


def test_bad_node_notation_and_missing_node_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"equipment\[0\]\.signals\.state.*not a node id"):
        parse_config(CONFIG % ("mode: poll", "Press1.State"))
    text = (CONFIG % ("mode: poll", "ns=2;s=A")).replace('node: "ns=2;s=A"', 'address: "hr:0"')
    with pytest.raises(ConfigError, match="needs `node:`"):
        parse_config(text)


def test_security_needs_certificate() -> None:
    options = "security_policy: Basic256Sha256\n    security_mode: Sign"
    with pytest.raises(ConfigError, match="needs certificate and private_key"):
        parse_config(CONFIG % (options, "i=1"))


async def test_silent_server_names_the_timeout_actually_used() -> None:
    # A server that accepts the TCP connection and never answers: the Hello request gives
    # up after `timeout`, long before the whole handshake's limit of three times that.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"opc.tcp://127.0.0.1:{port}"
    cfg = validate(OpcUaConnection, {"id": "plc", "url": url, "timeout": "1s"})
    hub = OpcUaHub(cfg, [OpcUaTag("p1", "state", "ns=2;s=Press1.State")])
    try:
        async with running(hub):
            await wait_until(lambda: hub.last_error is not None, "the failed attempt")
    finally:
        server.close()
        await server.wait_closed()
    assert hub.last_error == f"no answer from {url} within 1s"


async def test_browse_a_server_with_only_secure_endpoints(
    secure_sim: OpcUaPressServer,
    pki: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = (
        "security_policy: Basic256Sha256\n    security_mode: SignAndEncrypt\n"
        f"    certificate: {pki['client.der']}\n    private_key: {pki['client.pem']}\n"
        "    username: operator\n    password: ${OPCUA_TEST_PASSWORD}"
    )
    config = tmp_path / "agent.yaml"
    config.write_text(
        CONFIG.replace("opc.tcp://127.0.0.1:4840", secure_sim.url) % (options, "i=2258"),
        encoding="utf-8",
    )
    flags = [
        "--security-policy=Basic256Sha256",
        "--security-mode=SignAndEncrypt",
        f"--certificate={pki['client.der']}",
        f"--private-key={pki['client.pem']}",
        f"--server-certificate={pki['server.der']}",
        "--username=operator",
        "--password=s3cret-pw",
    ]
    monkeypatch.setenv("OPCUA_TEST_PASSWORD", "s3cret-pw")
    # browse runs its own event loop: a thread keeps this one serving
    for args in (
        ["-c", str(config)],
        ["-c", str(config), "--connection", "plc-ua", secure_sim.url],
        [secure_sim.url, *flags],
    ):
        code = await asyncio.to_thread(main, ["browse", *args, "--path", "/Objects/Press1"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "TotalCount" in out and "[UInt32]" in out
    code = await asyncio.to_thread(main, ["browse", secure_sim.url])
    assert code == 1
    assert "offers no endpoint with None/None" in capsys.readouterr().err
