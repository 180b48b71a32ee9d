"""`edge-agent replay` as a command: exit codes, messages, output shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main

CASES = Path(__file__).parent / "cases"
OEE_COM = CASES / "oee_com_shift"
WINDOW = ["--from", "2026-01-05T05:00:00Z", "--to", "2026-01-05T13:00:00Z"]


def args(config: Path, samples: Path, *extra: str) -> list[str]:
    return ["replay", "--config", str(config), "--samples", str(samples), *extra]


def test_readable_summary_without_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args(OEE_COM / "config.yaml", OEE_COM / "samples.jsonl", *WINDOW)) == 0
    out = capsys.readouterr().out
    assert "Availability  88.81 %" in out
    assert "OEE           74.79 %" in out
    assert "18848 good of 19271 produced" in out


def test_config_error_exits_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text("agent: {id: x, site: y}\nequipment:\n  - id: p\n    ideal_cycle_time: fast\n")
    assert main(args(bad, OEE_COM / "samples.jsonl", *WINDOW, "--json")) == 2
    captured = capsys.readouterr()
    assert "ideal_cycle_time" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--from", "yesterday", "--to", "2026-01-05T13:00:00Z"], "not an ISO 8601 time"),
        (["--from", "2026-01-05T05:00:00", "--to", "2026-01-05T13:00:00Z"], "no UTC offset"),
        (["--from", "2026-01-05T13:00:00Z", "--to", "2026-01-05T05:00:00Z"], "later than"),
        ([*WINDOW, "--equipment", "press-9"], "not in the configuration"),
    ],
)
def test_bad_arguments_exit_2(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args(OEE_COM / "config.yaml", OEE_COM / "samples.jsonl", *extra)) == 2
    assert message in capsys.readouterr().err


def test_missing_samples_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(args(OEE_COM / "config.yaml", tmp_path / "nope.jsonl", *WINDOW))
    assert code == 2
    assert "cannot read" in capsys.readouterr().err


def test_garbage_lines_are_reported_and_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples = tmp_path / "s.jsonl"
    lines = (OEE_COM / "samples.jsonl").read_text().splitlines()
    garbage = [
        "[1, 2]",
        '{"ts": 5, "equipment": "press-1", "signal": "state", "value": 1}',
        '{"ts": "2026-01-05T07:00:00Z", "equipment": "press-1", "signal": "state"}',
        '{"ts": "2026-01-05T07:00:00Z", "equipment": "press-1", "signal": "state", '
        '"value": {"x": 1}}',
        '{"ts": "2026-01-05T07:00:00Z", "equipment": "press-1", "signal": "state", '
        '"value": 1, "quality": "so-so"}',
        "\x00\xff",
    ]
    samples.write_text("\n".join(lines[:3] + garbage + lines[3:]) + "\n")
    assert main(args(OEE_COM / "config.yaml", samples, *WINDOW, "--json")) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert [w["line"] for w in result["warnings"]] == [4, 5, 6, 7, 8, 9]
    for line in range(4, 10):
        assert f"s.jsonl:{line}: " in captured.err
    assert result["oee"] == pytest.approx(0.747937, abs=1e-6)  # the good lines still count


def test_several_equipment_report_each_and_the_pool(capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES / "pooled_machines_mixed_products"
    window = ["--from", "2026-01-05T06:00:00Z", "--to", "2026-01-05T07:00:00Z", "--json"]
    assert main(args(case / "config.yaml", case / "samples.jsonl", *window)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["equipment"] == ["m1", "m2"]
    assert set(result["by_equipment"]) == {"m1", "m2"}
    assert {b["equipment"] for b in result["buckets"]} == {"m1", "m2"}
    # The pool is computed from sums, not averaged: (0.75 + 0.475) / 2 would be 0.6125.
    assert result["oee"] == pytest.approx(3840 / 6000, abs=1e-9)
    assert result["oee"] != pytest.approx(
        (result["by_equipment"]["m1"]["oee"] + result["by_equipment"]["m2"]["oee"]) / 2
    )
