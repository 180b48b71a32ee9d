"""Configuration versions in the cloud: who may push, what is stored and audited, what is
published (retained, signed for the agent's trust), list, show, diff and rollback; against
PostgreSQL, the machine's Mosquitto and the HTTP API."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from psycopg_pool import ConnectionPool

from cloud_api.api.app import create_app
from cloud_api.cli import main as cloud_main
from cloud_api.config import CloudSettings, DatabaseSettings, MqttSettings
from sync.config_message import ConfigBody, config_topic, verify_config
from sync.keys import AgentKeys, CloudKeyring
from tests.conftest import MQTT_HOST, MQTT_PORT, bearer, enroll, make_agent_keys

FILE = """agent:
  id: {agent}
  site: {site}
mqtt:
  username: edge
  password: {password}
equipment:
  - id: press-1
"""


def retained(topic: str) -> bytes:
    """The message the broker keeps on `topic`, as a new subscriber gets it."""
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(c: mqtt.Client, u: object, message: mqtt.MQTTMessage) -> None:
        got.append(bytes(message.payload))
        done.set()

    client.on_message = on_message
    client.on_connect = lambda c, u, f, r, p: c.subscribe(topic, qos=1)
    client.connect(MQTT_HOST, MQTT_PORT)
    client.loop_start()
    try:
        assert done.wait(10), f"nothing retained on {topic}"
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


@pytest.fixture
def app_settings(
    tmp_path: Path, pg_url: str, topic_prefix: str, cloud_keys: CloudKeyring
) -> CloudSettings:
    return CloudSettings(
        database=DatabaseSettings(url=pg_url),
        mqtt=MqttSettings(host=MQTT_HOST, port=MQTT_PORT, topic_prefix=topic_prefix),
        keys_dir=tmp_path / "cloud-keys",
    )


async def test_push_list_show_rollback_with_roles_audit_and_signed_publication(
    tmp_path: Path,
    pg_url: str,
    pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    topic_prefix: str,
    app_settings: CloudSettings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    enroll(pg_url, "edge-a", "site-a", make_agent_keys(tmp_path / "a-keys", cloud_keys))
    enroll(pg_url, "edge-b", "site-b", make_agent_keys(tmp_path / "b-keys", cloud_keys))
    agent_keys = AgentKeys.load(tmp_path / "a-keys")
    keys_dir = app_settings.keys_dir
    app = create_app(app_settings, pool=pool)
    engineer_a = bearer(keys_dir, role="engineer", sites=["site-a"])
    url = "/v1/agents/edge-a/config"
    v1 = FILE.format(agent="edge-a", site="site-a", password="${MQTT_PASSWORD}")
    v2 = v1.replace("press-1", "press-2")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as client:
        # Who may push: an admin, or an engineer of the agent's site; nobody else.
        for headers, status in (
            (bearer(keys_dir, role="viewer", sites=["site-a"]), 403),
            (bearer(keys_dir, role="service", sites=["site-a"]), 403),
            (bearer(keys_dir, role="engineer", sites=["site-b"]), 404),
        ):
            response = await client.post(url, json={"yaml": v1}, headers=headers)
            assert response.status_code == status, response.text
        # A secret written as a value, or a file for another agent, is not stored.
        leaked = FILE.format(agent="edge-a", site="site-a", password="hunter2")
        response = await client.post(url, json={"yaml": leaked}, headers=engineer_a)
        assert response.status_code == 422 and "mqtt.password" in response.text
        assert "hunter2" not in response.text
        foreign = FILE.format(agent="edge-b", site="site-b", password="${P}")
        response = await client.post(url, json={"yaml": foreign}, headers=engineer_a)
        assert response.status_code == 422, response.text

        response = await client.post(url, json={"yaml": v1, "comment": "first"}, headers=engineer_a)
        assert response.status_code == 201, response.text
        assert response.json()["version"] == 1 and response.json()["published"] is True
        admin = bearer(keys_dir, role="admin")
        response = await client.post(url, json={"yaml": v2, "comment": "swap"}, headers=admin)
        assert response.status_code == 201 and response.json()["version"] == 2

        # Published retained and signed so the agent's ack trust verifies it.
        topic = config_topic(topic_prefix, "site-a", "edge-a")
        body: ConfigBody = verify_config(
            retained(topic), verify_keys=agent_keys.ack_verify_keys, agent_id="edge-a"
        )
        assert (body.version, body.serial, body.rollback, body.yaml) == (2, 2, None, v2)
        assert "${MQTT_PASSWORD}" in body.yaml

        listing = (await client.get(url, headers=engineer_a)).json()
        assert [(v["version"], v["current"], v["comment"]) for v in listing["versions"]] == [
            (2, True, "swap"),
            (1, False, "first"),
        ]
        assert listing["status"]["desired_version"] == 2
        assert listing["versions"][0]["author"] == "test-admin"
        response = await client.get(url, params={"version": 2, "diff_from": 1}, headers=engineer_a)
        assert "-  - id: press-1\n+  - id: press-2" in response.json()["diff"]
        hidden = bearer(keys_dir, role="viewer", sites=["site-b"])
        assert (await client.get(url, headers=hidden)).status_code == 404

        response = await client.post(f"{url}/rollback", json={"to": 1}, headers=engineer_a)
        assert response.status_code == 201, response.text
        assert (response.json()["version"], response.json()["serial"]) == (1, 3)
        body = verify_config(
            retained(topic), verify_keys=agent_keys.ack_verify_keys, agent_id="edge-a"
        )
        assert (body.version, body.serial, body.rollback) == (1, 3, 1)
        response = await client.get("/v1/agents/edge-a", headers=engineer_a)
        config = response.json()["config"]
        assert config["desired_version"] == 1 and config["last_result"] is None

    with psycopg.connect(pg_url) as conn:
        audited = conn.execute(
            "SELECT action, actor, site_id, detail->>'version' FROM audit.records "
            "WHERE action LIKE 'agents.config.%%' ORDER BY id"
        ).fetchall()
        assert audited == [
            ("agents.config.push", "test-engineer", "site-a", "1"),
            ("agents.config.push", "test-admin", "site-a", "2"),
            ("agents.config.rollback", "test-engineer", "site-a", "1"),
        ]
        with pytest.raises(psycopg.errors.RaiseException):
            conn.execute("UPDATE registry.agent_configs SET yaml = ''")

    # The same from the command line: push a file, list, diff.
    cloud_yaml = tmp_path / "cloud.yaml"
    cloud_yaml.write_text(
        f"database: {{url: '{pg_url}'}}\n"
        f"mqtt: {{host: '{MQTT_HOST}', port: {MQTT_PORT}, topic_prefix: '{topic_prefix}'}}\n"
        f"keys_dir: '{keys_dir}'\n",
        encoding="utf-8",
    )
    (tmp_path / "v3.yaml").write_text(v2 + "# third\n", encoding="utf-8")
    base = ["--config", str(cloud_yaml), "agents", "config"]
    push = ["push", "--agent", "edge-a", "--file", str(tmp_path / "v3.yaml")]
    assert cloud_main([*base, *push, "--comment", "cli"]) == 0
    assert cloud_main([*base, "list", "--agent", "edge-a"]) == 0
    assert (
        cloud_main([*base, "show", "--agent", "edge-a", "--version", "3", "--diff-from", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert "stored version 3 of edge-a" in out and "published version 3" in out
    assert "desired 3" in out and "+# third" in out
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT actor FROM audit.records WHERE action = 'agents.config.push' "
            "AND detail->>'version' = '3'"
        ).fetchone()
    assert row is not None and row[0].startswith("cli:")
