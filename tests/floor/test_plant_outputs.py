"""The agent's plant-floor outputs against foreign clients, with real components.

A pymodbus press feeds the real `edge-agent run` process; the agent ships to the cloud
through the test broker (ingest, PostgreSQL, API) and serves the plant floor:
- a Sparkplug B edge node on a second Mosquitto started by the test, whose messages a small
  host application written here records and checks (births before data, seq continuity,
  DDEATH when the PLC link is lost, rebirth on NCMD, STATE of the primary host honoured),
  every payload decoded by Eclipse Tahu's JavaScript decoder (npm sparkplug-payload);
- an OPC UA server read by a node-opcua client (Basic256Sha256 SignAndEncrypt, user name,
  trusted client certificate) that browses, reads and subscribes.
Both must report the same running-shift numbers as `/v1/equipment/press-1/oee` over
[Shift/Start, Shift/Through); the test ends with the cross-view invariant checker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from paho.mqtt.enums import CallbackAPIVersion

from agent.floor import sparkplug_b_pb2 as pb
from cloud_api.ingest.worker import IngestWorker
from connectors.modbus.simulator import Press, PressLine
from connectors.opcua.certs import create_certificate
from sync.keys import CloudKeyring
from tests.conformance.harness import finish, new_agent
from tests.conftest import free_port
from tests.faults.harness import EDGE_AGENT, Mosquitto, port_open, wait_for
from tests.invariants import Truth, api_client, closed_until

NODE = Path(__file__).parent / "node"
GROUP, EDGE, HOST = "plant-conformance", "edge-conformance", "scada-1"
USER, PASSWORD = "hmi", "floor-secret-1"
CLIENT_URI = "urn:plant:test-hmi"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None
    or shutil.which("npm") is None
    or shutil.which("mosquitto") is None,
    reason="Node.js, npm or mosquitto is not installed",
)


def install_node_clients() -> None:
    """npm ci of the pinned clients (the committed lock file), once per checkout."""
    if (NODE / "node_modules" / "sparkplug-payload").is_dir() and (
        NODE / "node_modules" / "node-opcua-client"
    ).is_dir():
        return
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=NODE,
        check=True,
        timeout=600,
    )


BODY = """
connections:
  - id: plc
    type: modbus
    host: 127.0.0.1
    port: {plc_port}
    poll_interval: 200ms
    timeout: 1s
plant_mqtt:
  host: 127.0.0.1
  port: {plant_port}
  publish_interval: 300ms
  reconnect_min: 200ms
  reconnect_max: 2s
  sparkplug: {{group_id: {group}, edge_node_id: {edge}, primary_host_id: {host}}}
  publish:
    press-1: all
opcua_server:
  endpoint: opc.tcp://127.0.0.1:{opcua_port}
  security: [Basic256Sha256_Sign, Basic256Sha256_SignAndEncrypt]
  trusted_clients: {trusted}
  users:
    - {{username: {user}, password: {password}}}
  update_interval: 300ms
equipment:
  - id: press-1
    line: line-1
    connection: plc
    unit: 1
    ideal_cycle_time: 250ms
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running, 2: fault, 3: setup}}}}
      total_count: {{address: "holding:1", type: uint32}}
      scrap_count: {{address: "holding:3", type: uint32}}
      reason: {{address: "holding:5", map: {{1: no material, 2: tool change, 3: jam}}}}
"""


class HostApplication:
    """A Sparkplug host application: declares itself online (STATE, retained), records
    every message of the group, and can ask for a rebirth."""

    def __init__(self, port: int) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="test-host-app"
        )
        self.client.will_set(f"spBv1.0/STATE/{HOST}", self._state(False), qos=1, retain=True)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"spBv1.0/{GROUP}/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    @staticmethod
    def _state(online: bool) -> bytes:
        return json.dumps({"online": online, "timestamp": int(time.time() * 1000)}).encode()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def online(self) -> None:
        self.client.publish(f"spBv1.0/STATE/{HOST}", self._state(True), qos=1, retain=True)

    def rebirth(self) -> None:
        payload = pb.Payload()
        payload.timestamp = int(time.time() * 1000)
        metric = payload.metrics.add()
        metric.name, metric.datatype, metric.boolean_value = (
            "Node Control/Rebirth",
            pb.Boolean,
            True,
        )
        self.client.publish(f"spBv1.0/{GROUP}/NCMD/{EDGE}", payload.SerializeToString(), qos=0)

    def kinds(self) -> list[str]:
        with self.lock:
            return [topic.split("/")[2] for topic, _ in self.messages]

    def snapshot(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def tahu_decode(payloads: list[bytes]) -> list[dict[str, Any]]:
    """Every payload through Eclipse Tahu's decoder (npm sparkplug-payload)."""
    lines = "".join(base64.b64encode(p).decode() + "\n" for p in payloads)
    out = subprocess.run(
        ["node", "decode.js"], cwd=NODE, input=lines, capture_output=True, text=True, check=True
    )
    decoded = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(decoded) == len(payloads), out.stderr
    assert not [d for d in decoded if "error" in d], decoded
    return decoded


def host_view(
    messages: list[tuple[str, bytes]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Replays the recorded messages as a host application must; returns press-1's values
    by metric name after each DBIRTH and DDATA, and the message kinds in order. Asserts the
    Sparkplug rules on the way."""
    decoded = tahu_decode([p for _, p in messages])
    kinds: list[str] = []
    names: dict[int, str] = {}
    values: dict[str, Any] = {}
    expected_seq: int | None = None
    node_alive = False
    devices: set[str] = set()
    bdseq: int | None = None
    views: list[dict[str, Any]] = []
    for (topic, _), body in zip(messages, decoded, strict=True):
        parts = topic.split("/")
        kind = parts[2]
        kinds.append(kind)
        if kind == "NDEATH":
            metric = body["metrics"][0]
            assert metric["name"] == "bdSeq"
            assert bdseq is None or int(metric["value"]) == bdseq, "NDEATH of another session"
            node_alive, expected_seq = False, None
            devices.clear()
            continue
        if kind == "NCMD":
            continue
        seq = int(body["seq"])
        if kind == "NBIRTH":
            assert seq == 0, "NBIRTH starts the seq at 0"
            by_name = {m["name"]: m for m in body["metrics"]}
            bdseq = int(by_name["bdSeq"]["value"])
            assert by_name["Node Control/Rebirth"]["type"] == "Boolean"
            node_alive, devices = True, set()
        else:
            assert node_alive, f"{kind} before NBIRTH"
            assert seq == expected_seq, f"{kind}: seq {seq}, expected {expected_seq}"
        expected_seq = (seq + 1) % 256
        if kind == "DBIRTH":
            devices.add(parts[4])
            for m in body["metrics"]:
                names[int(m["alias"])] = m["name"]
                values[m["name"]] = m.get("value")
            views.append(dict(values))
        elif kind == "DDATA":
            assert parts[4] in devices, "DDATA before DBIRTH"
            for m in body["metrics"]:
                assert "name" not in m, "DDATA carries aliases only"
                values[names[int(m["alias"])]] = m.get("value")
            views.append(dict(values))
        elif kind == "DDEATH":
            assert parts[4] in devices, "DDEATH of a device not born"
            devices.discard(parts[4])
    return views, kinds


def at_minute(views: list[dict[str, Any]], after: datetime) -> dict[str, Any] | None:
    """The host's view when the shift values last reached a whole minute after `after`: the
    cloud API sums minute rollups, so a window ending on a minute is one it answers exactly."""
    for values in reversed(views):
        through = values.get("Shift/Through")
        if through is not None and int(through) % 60_000 == 0 and int(through) > _ms(after):
            return values
    return None


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def api_shift(api: Any, start: datetime, through: datetime) -> dict[str, Any]:
    response = api.get(
        "/v1/equipment/press-1/oee",
        params={"from": start.isoformat(), "to": through.isoformat()},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_same_as_api(got: dict[str, Any], api: dict[str, Any], what: str) -> None:
    c = api["components"]
    assert int(got["Produced"]) == c["produced"], (what, got, c)
    assert int(got["Good"]) == c["good"], (what, got, c)
    assert int(got["Scrap"]) == c["scrap"], (what, got, c)
    assert int(got["Rework"]) == c["rework"], (what, got, c)
    assert got["PlannedBusyTime"] == pytest.approx(c["planned_busy_s"], abs=1e-6), what
    assert got["ProductionTime"] == pytest.approx(c["production_s"], abs=1e-6), what
    for name, key in (
        ("Availability", "availability"),
        ("Performance", "performance"),
        ("Quality", "quality"),
        ("OEE", "oee"),
    ):
        if api[key] is None:
            assert got[name] is None, (what, name)
        else:
            assert got[name] == pytest.approx(api[key], rel=1e-9), (what, name, got, api)


async def test_plant_floor_outputs_match_the_api(
    tmp_path: Path,
    pg_url: str,
    cloud_keys: CloudKeyring,
    topic_prefix: str,
    ingest: IngestWorker,
) -> None:
    await asyncio.to_thread(install_node_clients)
    plant = Mosquitto(tmp_path / "plant-broker", persistence=False)
    plant.start()
    host = HostApplication(plant.port)
    press = Press(seed=11, time_scale=0.15, cycle_time=0.25)
    press.frozen = True
    press.set_state("idle")
    plc_port = free_port()
    line = PressLine([press], port=plc_port)
    await line.start()

    # Certificates: the server's (`edge-agent keys opcua-server-cert`) and the HMI's, which
    # the server trusts through its trusted_clients folder.
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    hmi = tmp_path / "hmi"
    cert = create_certificate(
        hmi / "hmi.der", hmi / "hmi.pem", application_uri=CLIENT_URI, hostnames=["127.0.0.1"]
    )
    (trusted / "hmi.der").write_bytes(cert.public_bytes(Encoding.DER))
    (hmi / "hmi-cert.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    opcua_port = free_port()
    agent = new_agent(
        tmp_path / "agent",
        cloud_keys,
        pg_url,
        topic_prefix,
        BODY.format(
            plc_port=plc_port,
            plant_port=plant.port,
            group=GROUP,
            edge=EDGE,
            host=HOST,
            opcua_port=opcua_port,
            trusted=trusted,
            user=USER,
            password=PASSWORD,
        ),
    )
    agent.write_config()
    made = await asyncio.to_thread(
        subprocess.run,
        [
            EDGE_AGENT,
            "keys",
            "opcua-server-cert",
            "-c",
            str(agent.config_path),
            "--hostname",
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    assert (agent.keys_dir / "opcua-server.der").exists()
    agent.start()
    try:
        # The primary host is not online yet: the edge node must not be born.
        await wait_for(lambda: port_open(opcua_port), 60, "the agent's OPC UA server")
        await asyncio.sleep(2)
        assert "NBIRTH" not in host.kinds(), "born before the primary host was online"
        host.online()
        await wait_for(lambda: "DBIRTH" in host.kinds(), 30, "NBIRTH and DBIRTH")

        press.frozen = False
        await asyncio.sleep(3)
        # The PLC link is lost: DDEATH; back: DBIRTH again.
        await line.stop()
        await wait_for(lambda: "DDEATH" in host.kinds(), 30, "DDEATH on the lost PLC link")
        line = PressLine([press], port=plc_port)
        await line.start()
        await wait_for(lambda: host.kinds().count("DBIRTH") >= 2, 30, "DBIRTH after the link")
        await asyncio.sleep(2)
        host.rebirth()
        await wait_for(lambda: host.kinds().count("NBIRTH") >= 2, 30, "NBIRTH on NCMD rebirth")
        await asyncio.sleep(2)
        press.frozen = True
        press.set_state("idle")
        frozen_at = datetime.now(UTC)

        # The OPC UA server's view, through node-opcua (it reads at a whole minute too) ...
        ua_task = asyncio.create_task(
            asyncio.to_thread(
                subprocess.run,
                [
                    "node",
                    "opcua_client.js",
                    f"opc.tcp://127.0.0.1:{opcua_port}",
                    USER,
                    PASSWORD,
                    str(hmi / "hmi-cert.pem"),
                    str(hmi / "hmi.pem"),
                    str(tmp_path / "hmi-pki"),
                    CLIENT_URI,
                    "Plant/plant-conformance/line-1/press-1/Shift/Through",
                    "Plant/plant-conformance/line-1/press-1/Shift/PlannedBusyTime",
                    "Plant/plant-conformance/Agent/OutboxDepth",
                ],
                cwd=NODE,
                capture_output=True,
                text=True,
                timeout=240,
                env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "hmi-pki")},
            )
        )

        # ... and the host application's view of the running shift at a whole minute.
        def covered() -> bool:
            return at_minute(host_view(host.snapshot())[0], frozen_at) is not None

        await wait_for(covered, 120, "shift values at a minute past the end of production")
        views, kinds = host_view(host.snapshot())
        values = at_minute(views, frozen_at)
        assert values is not None
        start = datetime.fromtimestamp(int(values["Shift/Start"]) / 1000, UTC)
        through = datetime.fromtimestamp(int(values["Shift/Through"]) / 1000, UTC)
        assert kinds.index("NBIRTH") < kinds.index("DBIRTH") < kinds.index("DDATA")

        ua_out = await ua_task
        result_line = [ln for ln in ua_out.stdout.splitlines() if ln.startswith("RESULT ")]
        assert result_line, ua_out.stdout[-3000:] + ua_out.stderr[-3000:]
        ua = json.loads(result_line[0].removeprefix("RESULT "))
        base = "Plant/plant-conformance/line-1/press-1"
        ua_values = {k.removeprefix(base + "/"): v for k, v in ua["values"].items()}
        assert ua["writeStatus"] != "Good", "the server must be read-only"
        assert ua["units"][f"{base}/Shift/OEE"]["displayName"] == "1"
        assert ua["units"][f"{base}/Shift/Produced"]["displayName"] == "parts"
        assert ua["dataTypes"][f"{base}/Shift/Produced"] == "ns=0;i=9"  # UInt64
        assert ua["dataTypes"][f"{base}/Shift/OEE"] == "ns=0;i=11"  # Double
        assert len(ua["notifications"][f"{base}/Shift/PlannedBusyTime"]) >= 2, ua
        assert ua_values["Link/Connected"] is True

        with api_client(pg_url, tmp_path / "views-keys") as api:
            # The cloud holds every bucket of the window once the agent shipped it.
            await wait_for(
                lambda: closed_until(pg_url).get("press-1", start) >= through,
                60,
                "the cloud to hold the shift's buckets",
            )
            cloud = api_shift(api, start, through)
            sparkplug_shift = {
                k.removeprefix("Shift/"): v for k, v in values.items() if k.startswith("Shift/")
            }
            assert_same_as_api(sparkplug_shift, cloud, "Sparkplug B host application")
            ua_start = datetime.fromisoformat(ua_values["Shift/Start"])
            ua_through = datetime.fromisoformat(ua_values["Shift/Through"])
            assert ua_start == start
            cloud_ua = api_shift(api, ua_start, ua_through)
            ua_shift = {
                k.removeprefix("Shift/"): v for k, v in ua_values.items() if k.startswith("Shift/")
            }
            assert_same_as_api(ua_shift, cloud_ua, "node-opcua client")
        assert int(values["Shift/Produced"]) > 0, "the press should have produced parts"

        truth = press.truth
        truths = {
            "press-1": Truth(
                produced=truth.produced,
                scrap=truth.scrap,
                reasons={"fault": frozenset({"jam"}), "idle": frozenset({"no material", None})},
            )
        }
        await finish(
            "plant floor",
            agent,
            pg_url,
            tmp_path,
            truths,
            frozen_at + timedelta(seconds=1),
            tolerance_s=1.0,
        )
    finally:
        host.close()
        if agent.running():
            await asyncio.to_thread(agent.stop)
        plant.kill()
        await line.stop()
