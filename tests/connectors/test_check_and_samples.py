"""The sample YAML of each connector, `edge-agent check` against real simulators, the OPC UA
simulator's restart on demand, and `edge-agent keys opcua-cert` / `browse`."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from agent.check import check_config
from agent.cli import main
from agent.config import load_config, parse_config
from connectors.modbus.simulator import Press, PressLine
from connectors.opcua.browse import browse
from connectors.opcua.simulator import OpcUaPressServer, serve
from tests.conftest import free_port
from tests.connectors.harness import wait_until

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = [ROOT / "connectors/opcua/sample.yaml", ROOT / "connectors/modbus/sample.yaml"]


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.parent.name)
def test_sample_yaml_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.connections and config.equipment


async def test_check_reads_every_signal_of_both_samples() -> None:
    ua_port, mb_port = free_port(), free_port()
    ua_sim = OpcUaPressServer([Press(seed=1), Press(seed=2)], port=ua_port)
    mb_sim = PressLine([Press(seed=1), Press(seed=2)], port=mb_port)
    await ua_sim.start()
    await mb_sim.start()
    try:
        for path, old, new in (
            (SAMPLES[0], "127.0.0.1:4840", f"127.0.0.1:{ua_port}"),
            (SAMPLES[1], "port: 5020", f"port: {mb_port}"),
        ):
            config = parse_config(path.read_text().replace(old, new))
            results = await check_config(config)
            assert results and all(r.ok for r in results), [(r.signal, r.reason) for r in results]
        # nothing listening: every signal says why
        config = parse_config(SAMPLES[1].read_text().replace("port: 5020", f"port: {free_port()}"))
        results = await check_config(config, limit=5)
        assert not any(r.ok for r in results)
        assert all("cannot connect to 127.0.0.1" in (r.reason or "") for r in results)
    finally:
        await ua_sim.stop()
        await mb_sim.stop()


async def test_opcua_simulator_restarts_on_demand_and_wraps_counters() -> None:
    port = free_port()
    stop, restart = asyncio.Event(), asyncio.Event()
    lines: list[str] = []
    task = asyncio.create_task(
        serve(
            1,
            port=port,
            counter_width=16,
            restart_down_for=0.0,
            stop=stop,
            restart=restart,
            announce=lines.append,
        )
    )
    await wait_until(lambda: len(lines) == 1, "the server started")
    namespaces, rows = await browse(f"opc.tcp://127.0.0.1:{port}", "/Objects/Press1")
    first = {r.browse_name.split(":")[1]: r for r in rows}
    assert first["TotalCount"].data_type == "UInt16"
    assert namespaces.index("urn:factory-edge-gateway:press-sim") == 2
    restart.set()
    await wait_until(lambda: len(lines) == 2, "restarted")
    namespaces, rows = await browse(f"opc.tcp://127.0.0.1:{port}", "/Objects/Press1")
    assert namespaces.index("urn:factory-edge-gateway:press-sim") == 3
    assert "ns=3;s=Press1.State" in {r.node_id for r in rows}
    stop.set()
    presses = await task
    press = presses[0]
    press.total_raw = 65535 + 5
    press.width = 16
    sim = OpcUaPressServer([press])
    assert sim._values(press)["TotalCount"][0] == 4  # wrapped at 16 bits


def test_keys_opcua_cert_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(SAMPLES[0].read_text().replace("var/opcua/agent", str(tmp_path / "state")))
    assert main(["keys", "opcua-cert", "-c", str(cfg)]) == 0
    keys = tmp_path / "state" / "keys"
    assert (keys / "opcua-client.der").stat().st_size > 500
    assert (keys / "opcua-client.pem").stat().st_mode & 0o077 == 0
    assert "SHA-1" in capsys.readouterr().out
    assert main(["keys", "opcua-cert", "-c", str(cfg)]) == 2  # kept unless --force


def test_keys_opcua_cert_needs_only_the_application_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography import x509

    # Passwords that only `run` needs are not set where the certificate is made.
    monkeypatch.delenv("OPCUA_PASSWORD", raising=False)
    monkeypatch.delenv("MQTT_PASSWORD", raising=False)
    text = (
        SAMPLES[0]
        .read_text()
        .replace("var/opcua/agent", str(tmp_path / "state"))
        .replace(
            "    # username: edge\n    # password: ${OPCUA_PASSWORD}",
            "    username: edge\n    password: ${OPCUA_PASSWORD}\n"
            "    application_uri: urn:plant-7:edge",
        )
        .replace("connections:", 'mqtt: {password: "${MQTT_PASSWORD}"}\nconnections:')
    )
    assert "${OPCUA_PASSWORD}" in text and "urn:plant-7:edge" in text
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text, encoding="utf-8")
    assert main(["validate", "-c", str(cfg)]) == 2  # the whole file does need them
    old = os.umask(0o022)  # the usual umask: the folders are 0700 whatever it is
    try:
        assert main(["keys", "opcua-cert", "-c", str(cfg), "--connection", "press-server"]) == 0
    finally:
        os.umask(old)
    keys = tmp_path / "state" / "keys"
    for folder in (keys, keys.parent):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    cert = x509.load_der_x509_certificate((keys / "opcua-client.der").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:plant-7:edge"]
    assert "application URI urn:plant-7:edge" in capsys.readouterr().out
    assert main(["keys", "opcua-cert", "-c", str(cfg), "--connection", "nope"]) == 2
    assert "no OPC UA connection with id 'nope'" in capsys.readouterr().err
