"""The `opcua_server:` and `plant_mqtt:` blocks: the example loads, mistakes fail at start
with the YAML path and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import ConfigError, parse_config
from agent.floor.config import selected

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "plant-floor-outputs.yaml"
SECRETS = {"MQTT_PASSWORD": "x", "HMI_PASSWORD": "hmi-password", "PLANT_MQTT_PASSWORD": "y"}


def example() -> str:
    return EXAMPLE.read_text(encoding="utf-8")


def test_the_example_loads() -> None:
    config = parse_config(example(), "example", env=SECRETS)
    assert config.opcua_server is not None and config.plant_mqtt is not None
    assert config.opcua_server.users[0].password == "hmi-password"
    assert "None" not in config.opcua_server.security
    assert config.plant_mqtt.sparkplug.primary_host_id == "ignition-1"
    assert selected(config.plant_mqtt.publish["press-2"]) == [
        "State",
        "Reason",
        "Link/Connected",
        "Shift/Produced",
        "Shift/OEE",
    ]
    assert len(selected(config.plant_mqtt.publish["press-1"])) > 30


def test_both_outputs_are_off_unless_configured() -> None:
    text = example()
    text = text[: text.index("opcua_server:")] + text[text.index("shifts:") :]
    config = parse_config(text, "example", env=SECRETS)
    assert config.opcua_server is None and config.plant_mqtt is None


@pytest.mark.parametrize(
    ("old", "new", "where", "why"),
    [
        ("Shift/OEE]", "Shift/Oee]", "plant_mqtt.publish", "unknown metric(s) 'Shift/Oee'"),
        ("    press-1: all", "    press-9: all", "plant_mqtt.publish", "no equipment with id"),
        (
            "[Basic256Sha256_SignAndEncrypt, Aes256",
            "[Basic256Sha256_SignAndEncrypt, Basic128Rsa15, Aes256",
            "opcua_server.security",
            "Input should be",
        ),
        ("    group_id: plant-a", "    group_id: plant/a", "plant_mqtt.sparkplug.group_id", ""),
    ],
)
def test_a_mistake_names_its_yaml_path(old: str, new: str, where: str, why: str) -> None:
    text = example()
    assert old in text
    with pytest.raises(ConfigError) as err:
        parse_config(text.replace(old, new), "example", env=SECRETS)
    assert where in str(err.value) and why in str(err.value), str(err.value)


def test_a_server_without_a_way_to_log_in_is_refused() -> None:
    text = example().replace('    - {username: hmi, password: "${HMI_PASSWORD}"}\n', "")
    text = text.replace("  users:\n", "")
    with pytest.raises(ConfigError, match="no way to log in"):
        parse_config(text, "example", env=SECRETS)


def test_a_short_password_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"opcua_server\.users\[0\]\.password"):
        parse_config(example(), "example", env={**SECRETS, "HMI_PASSWORD": "short"})
