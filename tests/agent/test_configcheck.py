"""The running agent's configuration is validated in a child process (agent.configcheck):
it must give the configuration, and the problems, that validating in-process gives."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, parse_config
from agent.configcheck import load_config_apart, parse_config_apart

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo-agent.yaml"
PUSHED = Path(__file__).resolve().parents[2] / "configs" / "plant-floor-outputs.yaml"


@pytest.mark.parametrize("path", [DEMO, PUSHED], ids=["demo", "plant-floor-outputs"])
def test_the_child_gives_the_configuration_validating_here_gives(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    env = {"MQTT_PASSWORD": "s3cret", "PLANT_MQTT_PASSWORD": "pl4nt", "HMI_PASSWORD": "hmi-s3cret"}
    here = parse_config(text, path.name, env=env)
    apart = parse_config_apart(text, path.name, env=env)
    assert apart == here
    assert apart is not here and apart.equipment[0] is not here.equipment[0]
    # The checked values, not only equal ones: durations in seconds, codes as text.
    assert dataclasses.asdict(apart) == dataclasses.asdict(here)
    assert apart.mqtt.password == "s3cret"


def test_the_child_reports_every_problem_as_validating_here_does(tmp_path: Path) -> None:
    text = DEMO.read_text(encoding="utf-8")
    bad = (
        text.replace("ideal_cycle_time: 2s", "ideal_cycle_tme: 2s", 1)
        .replace("port: 5020", "port: fivethousand", 1)
        .replace("timezone: Europe/Berlin", "timezone: Mars/Olympus", 1)
    )
    with pytest.raises(ConfigError) as here:
        parse_config(bad, "agent.yaml", env={})
    with pytest.raises(ConfigError) as apart:
        parse_config_apart(bad, "agent.yaml", env={})
    assert str(apart.value) == str(here.value)
    assert apart.value.problems == here.value.problems
    assert len(here.value.problems) == 3
    assert "ideal_cycle_tme" in str(apart.value) and "Mars/Olympus" in str(apart.value)


def test_the_child_sees_the_agents_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without `env`, `${VAR}` is what the agent's own environment says.
    monkeypatch.setenv("MQTT_PASSWORD", "from-the-unit")
    config = load_config_apart(DEMO)
    assert config.mqtt.password == "from-the-unit"


def test_a_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config_apart(tmp_path / "missing.yaml")


def test_a_child_that_gives_no_answer_is_an_error_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An interpreter that cannot run the check (here: one told to exit at once) is reported
    # as the configuration not being checkable, with what it said.
    monkeypatch.setattr(
        "agent.configcheck._command",
        lambda: [sys.executable, "-c", "import sys; sys.exit('no checker here')"],
    )
    with pytest.raises(ConfigError, match=r"ended without an answer \(exit status 1\): no checker"):
        parse_config_apart(DEMO.read_text(encoding="utf-8"), "agent.yaml")


def test_run_refuses_a_bad_file_through_the_child(tmp_path: Path) -> None:
    # `edge-agent run` validates apart: the message is the one `validate` gives.
    bad = tmp_path / "agent.yaml"
    bad.write_text(
        DEMO.read_text(encoding="utf-8").replace("2: fault", "2: faulty", 1), encoding="utf-8"
    )
    edge_agent = str(Path(sys.executable).parent / "edge-agent")
    runs = [
        subprocess.run(
            [edge_agent, command, "-c", str(bad)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for command in ("run", "validate")
    ]
    assert [r.returncode for r in runs] == [2, 2]
    assert runs[0].stderr == runs[1].stderr
    assert "unknown state 'faulty'" in runs[0].stderr and "Traceback" not in runs[0].stderr
