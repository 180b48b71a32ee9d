"""Every example in configs/ loads with the models the programs use (agent.config for the
agents, cloud_api.config for the cloud), so the documented examples cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config
from cloud_api.config import ConfigError as CloudConfigError
from cloud_api.config import load_settings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SECRETS = {"MQTT_PASSWORD": "not-a-secret", "OPCUA_PASSWORD": "not-a-secret"}


def agent_example(name: str) -> str:
    return (CONFIGS / name).read_text(encoding="utf-8")


def test_modbus_press_line() -> None:
    config = parse_config(agent_example("modbus-press-line.yaml"), "modbus", env=SECRETS)
    assert [c.type for c in config.connections] == ["modbus"]
    assert [e.id for e in config.equipment] == ["press-1", "press-2", "press-3"]
    assert config.agent.state_dir == Path("/var/lib/edge-agent")  # the unit's StateDirectory
    assert config.health.port == 9650
    assert config.mqtt.password == "not-a-secret"
    assert config.mqtt.addresses == [(f"mqtt-{n}.example.com", 8883) for n in (1, 2, 3)]
    assert "running" in config.equipment[0].oee_spec().state_map.values()


def test_opcua_packaging_line() -> None:
    config = parse_config(agent_example("opcua-packaging-line.yaml"), "opcua", env=SECRETS)
    assert [c.type for c in config.connections] == ["opcua"]
    filler = config.equipment[0]
    assert filler.signals["state"].node == "ns=2;s=Filler1.State"
    assert set(filler.products) == {"0.5l", "1.0l"}
    assert config.agent.timezone == "America/Chicago"


def test_agent_examples_need_their_secrets_from_the_environment() -> None:
    with pytest.raises(ConfigError, match="MQTT_PASSWORD"):
        parse_config(agent_example("modbus-press-line.yaml"), "modbus", env={})


def test_demo_agent_loads() -> None:
    assert load_config(CONFIGS / "demo-agent.yaml").equipment


def test_cloud_example() -> None:
    settings = load_settings(CONFIGS / "cloud.yaml", env={})
    assert settings.mqtt.tls and settings.mqtt.share_group == "ingest"
    assert settings.http.host == "127.0.0.1"
    # the environment overrides the file, so secrets never need to be written into it
    with_env = load_settings(CONFIGS / "cloud.yaml", env={"CLOUD_DATABASE_URL": "postgresql://x"})
    assert with_env.database.url == "postgresql://x"


def test_cloud_broker_cluster_nodes_and_the_environment(tmp_path: Path) -> None:
    text = (CONFIGS / "cloud.yaml").read_text(encoding="utf-8")
    one = text[text.index("  host: mqtt.internal") : text.index("  tls: true")]
    cluster = tmp_path / "cloud.yaml"
    cluster.write_text(
        text.replace(
            one,
            "  brokers:\n    - {host: mqtt-1.internal, port: 8883}\n"
            "    - {host: mqtt-2.internal, port: 8883}\n",
        ),
        encoding="utf-8",
    )
    settings = load_settings(cluster, env={})
    assert settings.mqtt.addresses == [("mqtt-1.internal", 8883), ("mqtt-2.internal", 8883)]
    # CLOUD_MQTT_HOST names one broker: with a list in the file that is a contradiction.
    with pytest.raises(CloudConfigError, match="host and brokers both given"):
        load_settings(cluster, env={"CLOUD_MQTT_HOST": "mqtt.internal"})


def test_cloud_example_alerts() -> None:
    alerts = load_settings(CONFIGS / "cloud.yaml", env={}).alerts
    assert sorted(alerts.receivers) == ["maintenance", "plant-a-slack", "shift-leads"]
    assert [r.kind for r in alerts.rules] == [
        "machine_stopped", "shift_kpi_below", "shift_kpi_below", "agent_silent", "outbox_age",
        "sequence_gap", "rejected_batches",
    ]  # fmt: skip
    assert alerts.rules[0].for_ == 600.0 and alerts.rules[0].line == "press-line-1"
    assert (alerts.rules[2].kpi, alerts.rules[2].above) == ("scrap_ratio", 0.05)
    assert alerts.smtp.password_env == "ALERTS_SMTP_PASSWORD" and alerts.delivery.backoff_max == 600
