"""One duration grammar for every duration of the agent's YAML and the cloud's CLI."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from agent.config import ConfigError, parse_config
from cloud_api.access.auth import parse_duration as token_lifetime
from common.duration import parse_duration, parse_timedelta

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo-agent.yaml"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (1, 1.0),
        (0.25, 0.25),
        ("2", 2.0),
        ("500ms", 0.5),
        ("1.3s", 1.3),
        ("1.5 s", 1.5),
        ("2m", 120.0),
        ("5min", 300.0),
        ("1h", 3600.0),
        ("30d", 30 * 86400.0),
        ("2w", 14 * 86400.0),
        ("1h30m", 5400.0),
        ("1d 12h", 129_600.0),
        ("10S", 10.0),
    ],
)
def test_the_grammar(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("5x", "invalid duration '5x'"),
        ("min", "invalid duration"),
        ("1h30", "invalid duration"),
        ("", "invalid duration"),
        (True, "invalid duration True"),
        ("-1s", "invalid duration"),
        (-1, "cannot be negative"),
        (float("inf"), "must be finite"),
    ],
)
def test_what_is_not_a_duration(text: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_duration(text)


def test_token_lifetimes_use_the_same_grammar() -> None:
    assert token_lifetime("30d") == timedelta(days=30)
    assert token_lifetime("1d12h") == timedelta(days=1, hours=12)
    assert token_lifetime("90m") == parse_timedelta("1.5h")
    with pytest.raises(ValueError, match="invalid duration"):
        token_lifetime("soon")


def test_every_yaml_duration_takes_every_unit() -> None:
    """`5min` was valid for ideal_cycle_time but not for a connection's poll_interval."""
    text = DEMO.read_text(encoding="utf-8")
    for old, new in (
        ("poll_interval: 500ms", "poll_interval: 5min"),
        ("flush_interval: 1s", "flush_interval: 1.5s"),
        ("ideal_cycle_time: 2s", "ideal_cycle_time: 1m30s"),
    ):
        assert old in text
        text = text.replace(old, new, 1)
    config = parse_config(text, "demo.yaml", env={})
    assert config.connections[0].poll_interval == 300.0  # type: ignore[union-attr]
    assert config.uplink.flush_interval == 1.5
    assert config.equipment[0].ideal_cycle_time == 90.0


def test_a_bad_duration_names_the_yaml_path_and_line() -> None:
    text = DEMO.read_text(encoding="utf-8")
    for old, new, where in (
        ("poll_interval: 500ms", "poll_interval: 5 minutes", "connections[0].poll_interval"),
        ("flush_interval: 1s", "flush_interval: soon", "uplink.flush_interval"),
        ("ideal_cycle_time: 2s", "ideal_cycle_time: 2x", "equipment[0].ideal_cycle_time"),
    ):
        with pytest.raises(ConfigError) as raised:
            parse_config(text.replace(old, new, 1), "demo.yaml", env={})
        message = str(raised.value)
        assert f"{where} (line " in message, message
        assert "invalid duration" in message, message
