"""The agent's YAML: typos fail at start with the YAML path and line, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo-agent.yaml"
EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")


@pytest.mark.parametrize(
    ("old", "new", "where", "why"),
    [
        (
            "ideal_cycle_time: 2s",
            "ideal_cycle_tme: 2s",
            "equipment[0].ideal_cycle_tme",
            "unknown key",
        ),
        ("port: 5020", "port: fivethousand", "connections[0].port", "valid integer"),
        ("2: fault", "2: faulty", "equipment[0]", "unknown state 'faulty'"),
        (
            "timezone: Europe/Berlin",
            "timezone: Mars/Olympus",
            "agent.timezone",
            "unknown IANA time zone",
        ),
    ],
)
def test_a_typo_is_rejected_at_start_naming_the_yaml_path(
    tmp_path: Path, old: str, new: str, where: str, why: str
) -> None:
    text = DEMO.read_text(encoding="utf-8")
    assert old in text
    bad = tmp_path / "agent.yaml"
    bad.write_text(text.replace(old, new, 1), encoding="utf-8")
    result = subprocess.run(
        [EDGE_AGENT, "run", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert where in result.stderr and why in result.stderr, result.stderr
    assert "(line " in result.stderr
    assert "Traceback" not in result.stderr


def test_environment_variables_fill_secrets_and_a_missing_one_is_named() -> None:
    text = DEMO.read_text(encoding="utf-8")
    config = parse_config(text, "demo.yaml", env={"MQTT_PASSWORD": "s3cret"})
    assert config.mqtt.password == "s3cret"
    assert "s3cret" not in repr(config.mqtt)
    strict = text.replace("${MQTT_PASSWORD:-}", "${MQTT_PASSWORD}")
    with pytest.raises(ConfigError, match=r"mqtt.password: environment variable MQTT_PASSWORD"):
        parse_config(strict, "demo.yaml", env={})


def test_the_demo_configuration_loads() -> None:
    config = load_config(DEMO)
    assert [e.id for e in config.equipment] == [
        "press-1", "press-2", "press-3", "welder-1", "welder-2", "packer-1"
    ]  # fmt: skip
    # The other machines share press-1's signals through a YAML anchor; press-3 overrides
    # its counter with a 16-bit one.
    assert config.equipment[4].signals == config.equipment[0].signals
    assert config.equipment[2].signals["total_count"].width == 16
