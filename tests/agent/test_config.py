"""The agent's YAML: typos fail at start with the YAML path and line, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
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
    refused(tmp_path, "run", old, new, where, why)


def refused(tmp_path: Path, command: str, old: str, new: str, where: str, why: str) -> None:
    """`edge-agent COMMAND` on the demo configuration with one change exits 2, naming the
    YAML path and line and the reason, without a traceback."""
    text = DEMO.read_text(encoding="utf-8")
    assert old in text
    bad = tmp_path / "agent.yaml"
    bad.write_text(text.replace(old, new, 1), encoding="utf-8")
    result = subprocess.run(
        [EDGE_AGENT, command, "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stdout
    assert where in result.stderr and why in result.stderr, result.stderr
    assert "(line " in result.stderr
    assert "Traceback" not in result.stderr


def test_environment_variables_fill_secrets_and_a_missing_one_is_named() -> None:
    text = DEMO.read_text(encoding="utf-8")
    config = parse_config(text, "demo.yaml", env={"MQTT_PASSWORD": "s3cret"})
    assert config.mqtt.password == "s3cret"
    assert "s3cret" not in repr(config.mqtt)
    strict = text.replace("${MQTT_PASSWORD:-}", "${MQTT_PASSWORD}")
    with pytest.raises(
        ConfigError, match=r"mqtt\.password \(line 23\): environment variable MQTT_PASSWORD"
    ):
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


@pytest.mark.parametrize(
    ("old", "new", "where", "why"),
    [
        (
            "bucket_seconds: 60",
            "bucket_seconds: 7",
            "agent.bucket_seconds (line 9)",
            "must divide an hour",
        ),
        (
            '      total_count: {address: "holding:1", type: uint32, width: 32}\n',
            "",
            "equipment[0]",
            "produced parts cannot be derived",
        ),
        (
            "timezone: Europe/Berlin",
            "timezone: Europe/Berlin\n  tick_interval: 1s",
            "agent.tick_interval",
            "unknown key",
        ),
        ("3: jam,", '3: "jam\\u0000",', "equipment[0]", "holds control characters"),
        (
            "ideal_cycle_time: 2s",
            "ideal_cycle_time: 25h",
            "equipment[0].ideal_cycle_time",
            "at most 24h",
        ),
        (
            "  port: 1883\n",
            "  brokers: [{host: node-1}, {host: node-2}]\n",
            "mqtt (line 20)",
            "host and brokers both given",
        ),
        (
            "  host: 127.0.0.1\n  port: 1883\n",
            "  brokers: [{host: node-1}, {host: node-2, port: 1884}, {host: node-1, port: 1883}]\n",
            "mqtt.brokers (line 21)",
            "node-1:1883 is listed twice ([0], [2])",
        ),
        (
            "  host: 127.0.0.1\n  port: 1883\n",
            "  brokers: [{host: node-1, port: 0}]\n",
            "mqtt.brokers[0].port",
            "greater than or equal to 1",
        ),
        ("  host: 127.0.0.1\n  port: 1883\n", "  brokers: []\n", "mqtt.brokers", "at least 1"),
    ],
)
def test_validate_refuses_what_run_would_refuse(
    tmp_path: Path, old: str, new: str, where: str, why: str
) -> None:
    refused(tmp_path, "validate", old, new, where, why)


def test_the_cloud_broker_is_one_address_or_a_list_of_cluster_nodes() -> None:
    text = DEMO.read_text(encoding="utf-8")
    assert parse_config(text, "demo.yaml", env={}).mqtt.addresses == [("127.0.0.1", 1883)]
    cluster = text.replace(
        "  host: 127.0.0.1\n  port: 1883\n",
        "  brokers:\n    - {host: emqx-1.cloud.example, port: 8883}\n    - host: emqx-2\n",
    )
    config = parse_config(cluster, "demo.yaml", env={})
    assert config.mqtt.addresses == [("emqx-1.cloud.example", 8883), ("emqx-2", 1883)]


def test_replay_ignores_connections_but_validate_does_not(tmp_path: Path) -> None:
    text = DEMO.read_text(encoding="utf-8")
    start = text.index("connections:")
    without = text[:start] + text[text.index("mqtt:") :]
    config = tmp_path / "agent.yaml"
    config.write_text(without, encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"equipment\[0\]\.connection \(line \d+\): no connection"
    ):
        load_config(config)
    replayed = load_config(config, replay=True)
    assert {e.connection for e in replayed.equipment} == {"plc-1"}
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        '{"ts": "2026-01-05T06:00:00Z", "equipment": "press-1", "signal": "state", "value": 1}\n'
    )
    window = ["--from", "2026-01-05T06:00:00Z", "--to", "2026-01-05T07:00:00Z", "--json"]
    assert main(["replay", "--config", str(config), "--samples", str(samples), *window]) == 0
