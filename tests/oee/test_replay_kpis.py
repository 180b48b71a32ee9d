"""`edge-agent replay --json` prints the KPI catalogue under `kpis`, from oee.kpis, beside the
output keys it always had."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from oee.components import Components
from oee.kpis import KPI_NAMES, kpis
from oee.targets import judge

CASES = Path(__file__).parent / "cases"
EARLIER_KEYS = {
    "equipment", "from", "to", "availability", "performance", "quality", "oee", "components",
    "downtime_by_reason", "buckets", "flags", "warnings",
}  # fmt: skip


def replay_json(
    case: str,
    start: str,
    end: str,
    capsys: pytest.CaptureFixture[str],
    config: Path | None = None,
) -> Any:
    """`edge-agent replay --json` of a case (with `config` in place of its own, if given)."""
    argv = [
        "replay", "--config", str(config or CASES / case / "config.yaml"),
        "--samples", str(CASES / case / "samples.jsonl"), "--from", start, "--to", end, "--json",
    ]  # fmt: skip
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_replay_prints_failures_mtbf_mttr_by_hand(capsys: pytest.CaptureFixture[str]) -> None:
    # Early and late shift, threshold 2 min (classic): 13:59-14:01 is a micro-stop, 14:30 to
    # 14:32:01 (121 s) and 21:59:30 to 22:01:31 (30 s inside the window) are failures.
    result = replay_json(
        "stop_across_shift_edge", "2026-01-05T06:00:00Z", "2026-01-05T22:00:00Z", capsys
    )
    assert set(result) >= EARLIER_KEYS
    k = result["kpis"]
    assert list(k) == list(KPI_NAMES)
    assert k["failures"] == 2
    assert k["micro_stops"] == 1
    assert k["mttr_s"] == pytest.approx(151 / 2)
    assert k["mtbf_s"] == pytest.approx((57_600 - 151) / 2)
    assert k["loading"] == pytest.approx(1.0)  # 16 h planned of a 16 h window
    assert k["technical_efficiency"] == pytest.approx(57_449 / 57_600)
    assert k["throughput_per_hour"] == 0  # this case counts no parts
    assert k["first_pass_yield"] is None
    c = Components(**result["components"])
    assert (c.fault_stops, c.micro_stops) == (2, 1)
    assert k == kpis(c, 16 * 3600)


def test_replay_kpis_of_several_equipment_pool_their_calendars(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # m1: 3,600 s planned, OEE 2,700/3,600; m2: 2,400 s planned of its 3,600 s (a 20 min
    # planned stop), one 10 min fault. Two machines over one hour: 7,200 s of calendar.
    result = replay_json(
        "pooled_machines_mixed_products", "2026-01-05T06:00:00Z", "2026-01-05T07:00:00Z", capsys
    )
    k = result["kpis"]
    assert k["loading"] == pytest.approx(6_000 / 7_200)
    assert k["teep"] == pytest.approx(0.64 * 6_000 / 7_200)
    assert k["oee"] == pytest.approx(0.64) == result["oee"]
    assert k["failures"] == 1
    assert k["mttr_s"] == pytest.approx(600)
    m2 = result["by_equipment"]["m2"]["kpis"]
    assert m2["loading"] == pytest.approx(2_400 / 3_600)
    assert m2["failures"] == 1 and m2["mtbf_s"] == pytest.approx(1_800)
    assert result["by_equipment"]["m1"]["kpis"]["failures"] == 0
    assert result["by_equipment"]["m1"]["kpis"]["mtbf_s"] is None


def test_replay_judges_the_yaml_targets_by_each_kpis_direction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = "pooled_machines_mixed_products"
    text = (CASES / case / "config.yaml").read_text(encoding="utf-8")
    # The site: OEE 0.7, MTTR 900 s; m2 (one 10 min fault, MTTR 600 s) has its own 300 s.
    text = text.replace(
        "shifts:", "targets: {site: {oee: 0.7, mttr_s: 900}}\nshifts:", 1
    ).replace(
        "  - id: m2\n", "  - id: m2\n    line: l2\n    targets: {mttr_s: 300}\n", 1
    )  # fmt: skip
    config = tmp_path / "config.yaml"
    config.write_text(text, encoding="utf-8")
    result = replay_json(case, "2026-01-05T06:00:00Z", "2026-01-05T07:00:00Z", capsys, config)
    # The whole site: the site's targets, judged on the pooled KPIs.
    assert result["targets"] == {"oee": 0.7, "mttr_s": 900.0}
    assert result["against_targets"] == {
        "oee": {"target": 0.7, "better": "higher", "met": False},  # 0.64
        "mttr_s": {"target": 900.0, "better": "lower", "met": True},  # 600 s
    }
    m1, m2 = result["by_equipment"]["m1"], result["by_equipment"]["m2"]
    assert m2["targets"] == {"oee": 0.7, "mttr_s": 300.0}  # its own over the site's
    assert m2["against_targets"]["mttr_s"] == {"target": 300.0, "better": "lower", "met": False}
    # m1 has no failure: its MTTR is undefined, neither met nor missed.
    assert m1["against_targets"]["mttr_s"] == {"target": 900.0, "better": "lower", "met": None}
    for eq in (m1, m2):
        assert eq["against_targets"] == judge(eq["kpis"], eq["targets"])
