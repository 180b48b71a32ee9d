"""Targets judged by each KPI's one direction (oee.kpis.BETTER): a higher OEE meets its target,
a higher scrap ratio misses it; an undefined value neither meets nor misses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from oee.components import Components
from oee.kpis import BETTER, KPI_DEFINITIONS, KPI_NAMES, kpis
from oee.targets import effective, judge, meets, target_error

LOWER = {"setup_ratio", "scrap_ratio", "rework_ratio", "failures", "micro_stops", "mttr_s"}


def test_each_kpi_has_one_direction_losses_are_lower_is_better() -> None:
    assert set(BETTER) == set(KPI_NAMES)
    assert {name for name, better in BETTER.items() if better == "lower"} == LOWER
    assert {d.better for d in KPI_DEFINITIONS} == {"higher", "lower"}
    for name in ("oee", "availability", "performance", "quality", "nee", "teep", "mtbf_s"):
        assert BETTER[name] == "higher"
    assert BETTER["first_pass_yield"] == "higher"
    assert BETTER["throughput_per_hour"] == "higher"


def test_the_readme_catalogue_shows_each_kpis_direction() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z_]+)` \| [^\n]* \| (higher|lower) \|$", readme, re.M)
    assert dict(rows) == BETTER


@pytest.mark.parametrize(
    ("kpi", "value", "target", "met"),
    [
        ("oee", 0.85, 0.85, True),
        ("oee", 0.84, 0.85, False),
        ("oee", 0.9, 0.85, True),
        ("scrap_ratio", 0.02, 0.02, True),
        ("scrap_ratio", 0.03, 0.02, False),
        ("scrap_ratio", 0.01, 0.02, True),
        ("mttr_s", 600.0, 300.0, False),
        ("mttr_s", 200.0, 300.0, True),
        ("mtbf_s", 600.0, 1800.0, False),
        ("failures", 0, 2, True),
        ("failures", 3, 2, False),
        ("setup_ratio", 0.2, 0.1, False),
        ("oee", None, 0.85, None),
        ("scrap_ratio", None, 0.02, None),
    ],
)
def test_meets_by_direction(kpi: str, value: float | None, target: float, met: bool | None) -> None:
    assert meets(kpi, value, target) is met


def test_judge_the_kpis_of_a_window_against_their_targets() -> None:
    # 1 h planned, 30 min running, 20 min fault (2 failures), 10 min setup; 1800 parts, 90
    # scrap, ideal 1 s.
    c = Components(
        planned_busy_s=3600,
        production_s=1800,
        downtime_s=1200,
        setup_s=600,
        fault_s=1200,
        fault_stops=2,
        produced=1800,
        good=1710,
        scrap=90,
        ideal_produced_s=1800,
        ideal_good_s=1710,
    )
    values = kpis(c, 3600)
    assert values["oee"] == pytest.approx(0.475)
    assert values["scrap_ratio"] == pytest.approx(0.05)
    targets = {"oee": 0.4, "scrap_ratio": 0.02, "mttr_s": 300.0, "loading": 0.9}
    judged = judge(values, targets)
    assert judged == {
        "oee": {"target": 0.4, "better": "higher", "met": True},
        "scrap_ratio": {"target": 0.02, "better": "lower", "met": False},
        "mttr_s": {"target": 300.0, "better": "lower", "met": False},
        "loading": {"target": 0.9, "better": "higher", "met": True},
    }
    # A target of a KPI the answer does not show is left out; an undefined value is not met
    # nor missed.
    assert judge({"oee": values["oee"]}, targets) == {
        "oee": {"target": 0.4, "better": "higher", "met": True}
    }
    idle = kpis(Components(planned_busy_s=3600, downtime_s=3600), 3600)
    assert judge(idle, {"mttr_s": 900.0, "oee": 0.4}) == {
        "mttr_s": {"target": 900.0, "better": "lower", "met": None},
        "oee": {"target": 0.4, "better": "higher", "met": False},
    }


def test_the_most_specific_scope_wins_per_kpi_and_bad_targets_are_named() -> None:
    site, line, equipment = {"oee": 0.6, "scrap_ratio": 0.05}, {"oee": 0.7}, {"scrap_ratio": 0.01}
    assert effective([site, line, equipment]) == {"oee": 0.7, "scrap_ratio": 0.01}
    assert target_error("scrap_ratio", 2.0) is not None
    assert target_error("mttr_s", 2.0) is None
    assert target_error("nope", 1.0) is not None
