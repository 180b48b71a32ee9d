"""Interoperability: the OPC UA hub against a node-opcua server (not asyncua), from npm.

The server (tests/connectors/node_opcua/server.js) is started by the test; its npm packages
are installed into that folder on first use (`npm ci` with the committed lock file). The
test is skipped only when Node.js or npm is not installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from common.checks import validate
from connectors.opcua.certs import create_certificate
from connectors.opcua.config import OpcUaConnection
from connectors.opcua.hub import OpcUaHub, OpcUaTag, thumbprint
from tests.conftest import free_port
from tests.connectors.harness import running, wait_until

HERE = Path(__file__).parent / "node_opcua"
NS = "urn:interop:node-opcua:press"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="Node.js and npm are not installed",
)


def install_node_opcua() -> None:
    """npm ci of the pinned node-opcua (the committed lock file), once per checkout."""
    if (HERE / "node_modules" / "node-opcua-server").is_dir():
        return
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=HERE,
        check=True,
        timeout=600,
    )


@contextlib.contextmanager
def _serve(script: str, home: Path) -> Iterator[str]:
    """Run tests/connectors/node_opcua/`script` until the block ends; yields its URL."""
    install_node_opcua()
    port = free_port()
    proc = subprocess.Popen(
        ["node", script, str(port), str(home / "pki")],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "XDG_CONFIG_HOME": str(home)},
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    seen = []
    try:
        while True:
            try:
                line = lines.get(timeout=120)
            except queue.Empty:
                raise AssertionError(f"node-opcua did not start: {''.join(seen)}") from None
            seen.append(line)
            if line.startswith("READY"):
                break
        yield f"opc.tcp://127.0.0.1:{port}/UA/Press"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        pumper.join(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def node_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _serve("server.js", tmp_path_factory.mktemp("node-opcua")) as url:
        yield url


TAGS = [
    OpcUaTag("p1", "state", f"nsu={NS};s=Press1.State"),
    OpcUaTag("p1", "total_count", "/Objects/Press1/TotalCount"),
    OpcUaTag("p1", "reason", f"nsu={NS};s=Press1.Sensor"),
]


def _conn(url: str, **kw: object) -> OpcUaConnection:
    data: dict[str, object] = {
        "id": "node",
        "url": url,
        "publishing_interval": "200ms",
        "sampling_interval": "100ms",
        "poll_interval": "200ms",
        "reconnect_min": "200ms",
        "timeout": "5s",
    }
    data.update(kw)
    return validate(OpcUaConnection, data)


async def _reads_the_press(hub: OpcUaHub) -> None:
    async with running(hub) as got:
        await wait_until(lambda: got.value("p1", "state") == 1, "state")
        await wait_until(
            lambda: len({s.value for s in got.of("p1", "total_count")}) >= 3, "the counter moving"
        )
        await wait_until(lambda: got.quality("p1", "reason") == "bad", "the failed sensor")
    assert "BadSensorFailure" in hub.problems["p1/reason"]
    counts = [s.value for s in got.of("p1", "total_count") if s.quality == "good"]
    assert counts == sorted(counts)


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_node_opcua_server(node_server: str, mode: str) -> None:
    await _reads_the_press(OpcUaHub(_conn(node_server, mode=mode), TAGS))


async def test_node_opcua_server_signed_and_encrypted(node_server: str, tmp_path: Path) -> None:
    cert, key = tmp_path / "client.der", tmp_path / "client.pem"
    create_certificate(cert, key, application_uri="urn:factory-edge-gateway:edge-agent")
    cfg = _conn(
        node_server,
        security_policy="Basic256Sha256",
        security_mode="SignAndEncrypt",
        certificate=str(cert),
        private_key=str(key),
    )
    await _reads_the_press(OpcUaHub(cfg, TAGS))


async def test_server_that_does_not_trust_our_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One clear message with the thumbprint and what to do, logged once however often the
    agent retries; no traceback from asyncua."""
    cert, key = tmp_path / "client.der", tmp_path / "client.pem"
    create_certificate(cert, key, application_uri="urn:factory-edge-gateway:edge-agent")
    sha1 = thumbprint(cert.read_bytes())
    cfg = _conn(
        "opc.tcp://127.0.0.1:1/UA/Press",
        security_policy="Basic256Sha256",
        security_mode="SignAndEncrypt",
        certificate=str(cert),
        private_key=str(key),
        reconnect_max="200ms",
    )
    with _serve("untrusting_server.js", tmp_path / "server") as url:
        hub = OpcUaHub(dataclasses.replace(cfg, url=url), TAGS)
        with structlog.testing.capture_logs() as logged:
            caplog.set_level(logging.INFO, logger="asyncua.client.client")
            async with running(hub) as got:
                # asyncua logs each attempt at INFO: wait for three of them
                await wait_until(
                    lambda: sum(r.msg.startswith("connect (") for r in caplog.records) >= 3,
                    "three attempts",
                )
        rejected = list((tmp_path / "server" / "pki" / "rejected").iterdir())
    assert [p.name for p in rejected] == [f"edge-agent[{sha1}].pem"]
    message = hub.last_error or ""
    assert f"rejected our certificate {cert} (SHA-1 {sha1})" in message
    assert "move it from the server's rejected certificates folder to its trusted" in message
    assert [e for e in logged if e["event"] == "cannot connect"] == [
        {"event": "cannot connect", "connection": "node", "error": message, "log_level": "warning"}
    ]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert got.quality("p1", "state") == "bad"
    assert set(hub.problems.values()) == {message}
