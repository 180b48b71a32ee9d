"""`edge-agent` finds its file without -c, and `validate` reports every problem of a file at
once: one line each, with the YAML path and line, a misspelling once with the key it meant."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import (
    CONFIG_PATH_ENV,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    default_config_path,
    parse_config,
)

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo-agent.yaml"
EDGE_AGENT = str(Path(sys.executable).parent / "edge-agent")


def edge_agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in (CONFIG_PATH_ENV, "MQTT_PASSWORD")}
    return subprocess.run(
        [EDGE_AGENT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environ, **(env or {})},
    )


def test_without_c_the_file_comes_from_the_environment_variable(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(DEMO.read_text(encoding="utf-8"), encoding="utf-8")
    done = edge_agent("validate", env={CONFIG_PATH_ENV: str(config)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{config}: ok (6 equipment")

    missing = tmp_path / "nowhere.yaml"
    done = edge_agent("validate", env={CONFIG_PATH_ENV: str(missing)})
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"edge-agent: no configuration file at {missing} (from ${CONFIG_PATH_ENV}); "
        "give one with -c FILE or set EDGE_AGENT_CONFIG"
    )
    # -c wins over the variable
    done = edge_agent("validate", "-c", str(config), env={CONFIG_PATH_ENV: str(missing)})
    assert done.returncode == 0, done.stderr


def test_without_c_or_variable_the_installed_file_is_used() -> None:
    assert default_config_path({}) == (Path("/etc/edge-agent/agent.yaml"), "the default")
    if DEFAULT_CONFIG_PATH.exists():
        pytest.skip(f"{DEFAULT_CONFIG_PATH} is installed on this machine")
    for command in (["validate"], ["check"], ["status"], ["buffer", "stats"], ["run"]):
        done = edge_agent(*command)
        assert done.returncode == 2, command
        assert done.stderr.strip() == (
            "edge-agent: no configuration file at /etc/edge-agent/agent.yaml (the default); "
            "give one with -c FILE or set EDGE_AGENT_CONFIG"
        ), command


def broken_demo() -> str:
    """The demo file with four mistakes: a misspelled key inside the YAML anchor that all six
    machines share, a misspelled required key, a connection that does not exist, and a
    secret from an unset variable."""
    text = DEMO.read_text(encoding="utf-8")
    changes = [
        ('state: {address: "holding:0"', 'state: {adress: "holding:0"'),
        ("ideal_cycle_time: 2.5s", "ideal_cycle_tim: 2.5s"),
        ("welder-2, line: line-2, connection: plc-1", "welder-2, line: line-2, connection: plc-9"),
        ("${MQTT_PASSWORD:-}", "${MQTT_PASSWORD}"),
    ]
    for old, new in changes:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def test_validate_reports_every_problem_once_with_path_line_and_suggestion(
    tmp_path: Path,
) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(broken_demo(), encoding="utf-8")
    done = edge_agent("validate", "-c", str(config))
    assert done.returncode == 2, done.stdout
    lines = done.stderr.splitlines()
    assert lines[0] == f"edge-agent: {config}: invalid configuration (4 problems):"
    assert lines[1:] == [
        "  mqtt.password (line 23): environment variable MQTT_PASSWORD is not set "
        "(and the file gives no ${MQTT_PASSWORD:-default})",
        "  equipment[0].signals.state.adress (line 59): unknown key `adress`; did you mean "
        "`address`? (the same line serves equipment[1], equipment[2], equipment[3], "
        "equipment[4], equipment[5])",
        "  equipment[2].ideal_cycle_tim (line 71): unknown key `ideal_cycle_tim`; "
        "did you mean `ideal_cycle_time`?",
        "  equipment[4].connection (line 77): no connection with id 'plc-9' (known: plc-1)",
    ]


def test_an_unset_variable_does_not_hide_the_rest() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(broken_demo(), "demo.yaml", env={})
    problems = caught.value.problems
    assert [p.path for p in problems] == [
        "mqtt.password",
        "equipment[0].signals.state.adress",
        "equipment[2].ideal_cycle_tim",
        "equipment[4].connection",
    ]
    # with the variable set, the same three mistakes remain and nothing else
    with pytest.raises(ConfigError) as caught:
        parse_config(broken_demo(), "demo.yaml", env={"MQTT_PASSWORD": "s3cret"})
    assert [p.path for p in caught.value.problems] == [
        "equipment[0].signals.state.adress",
        "equipment[2].ideal_cycle_tim",
        "equipment[4].connection",
    ]
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "poll_interval: 500ms",
            "pol_interval: 500ms",
            "connections[0].pol_interval (line 17): unknown key `pol_interval`; "
            "did you mean `poll_interval`?",
        ),
        (
            "  bucket_seconds: 60",
            "  bucket_seconds: 60\n  log_level: warn",
            "agent.log_level (line 10): Input should be 'debug', 'info', 'warning' or 'error', "
            "got 'warn'; did you mean `warning`?",
        ),
        (
            '      total_count: {address: "holding:1"',
            '      total_cont: {address: "holding:1"',
            "equipment[0].signals.total_cont (line 61): Input should be 'state', 'total_count', "
            "'good_count', 'scrap_count', 'rework_count', 'reason', 'scrap_reason' or 'product', "
            "got 'total_cont'; did you mean `total_count`? (the same line serves equipment[1], "
            "equipment[2], equipment[3], equipment[4], equipment[5])",
        ),
        (
            "  - name: early",
            "  - nme: early",
            "shifts[0].nme",
        ),
    ],
)
def test_did_you_mean(old: str, new: str, expected: str) -> None:
    text = DEMO.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    with pytest.raises(ConfigError) as caught:
        parse_config(text.replace(old, new), "demo.yaml", env={})
    assert len(caught.value.problems) == 1, caught.value
    assert str(caught.value.problems[0]).startswith(expected), caught.value


def test_unit_zero_is_refused_on_a_serial_line() -> None:
    text = DEMO.read_text(encoding="utf-8")
    rtu = text.replace("type: modbus\n", "type: modbus-rtu\n    port: /dev/ttyUSB0\n", 1)
    assert rtu != text
    rtu = "\n".join(
        line for line in rtu.splitlines() if not line.strip().startswith(("host:", "port: 5020"))
    )
    parse_config(rtu, "rtu.yaml", env={})  # units 1..6 are fine
    with pytest.raises(ConfigError) as caught:
        parse_config(rtu.replace("    unit: 1\n", "    unit: 0\n"), "rtu.yaml", env={})
    assert [str(p) for p in caught.value.problems] == [
        "equipment[0].unit (line 54): unit 0 is the broadcast address on a serial line: "
        "no device answers a read there; use the device's id, 1..247"
    ]


def test_two_mistakes_on_one_line_stay_two() -> None:
    """Only one mistake written once (in an anchor) is merged; the same typo written twice
    on one line (flow style) is two problems."""
    signals = "{state: {map: {0: idle, 1: running}}, total_count: {}}"
    text = (
        "agent: {id: a, site: s}\n"
        f"equipment: [{{id: p1, colour: red, ideal_cycle_time: 1s, signals: {signals}}}, "
        f"{{id: p2, colour: red, ideal_cycle_time: 1s, signals: {signals}}}]\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "flow.yaml", env={})
    assert [str(p) for p in caught.value.problems] == [
        "equipment[0].colour (line 2): unknown key `colour` (check the spelling)",
        "equipment[1].colour (line 2): unknown key `colour` (check the spelling)",
    ]
