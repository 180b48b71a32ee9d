"""Data-driven OEE cases: each folder under cases/ is replayed through `edge-agent replay`.

A case holds the agent's `config.yaml`, `samples.jsonl` and `expected.json`, whose `runs`
name replay windows with hand-computed expectations, and whose `pools` say which runs must
add up to another one (shift sums equal day sums, machines pool to the plant).
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from oee.components import COMPONENT_FIELDS, QUANTITY_FIELDS, Components, ratios

CASES = sorted(p for p in (Path(__file__).parent / "cases").iterdir() if p.is_dir())
RATIOS = ("availability", "performance", "quality", "oee")
TOL = 1e-6


def replay(case: Path, run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[Any, str]:
    argv = [
        "replay",
        "--config",
        str(case / "config.yaml"),
        "--samples",
        str(case / "samples.jsonl"),
        "--from",
        run["from"],
        "--to",
        run["to"],
        "--json",
    ]
    if run.get("equipment"):
        argv += ["--equipment", run["equipment"]]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


def check_ratios(got: dict[str, Any], expect: dict[str, Any], where: str) -> None:
    for name in RATIOS:
        if name in expect:
            if expect[name] is None:
                assert got[name] is None, f"{where}: {name} should be null"
            else:
                assert got[name] == pytest.approx(expect[name], abs=TOL), f"{where}: {name}"


def check_components(got: dict[str, Any], expect: dict[str, Any], where: str) -> None:
    for name, value in expect.items():
        if name in QUANTITY_FIELDS:
            assert got[name] == value, f"{where}: {name}"
        else:
            assert got[name] == pytest.approx(value, abs=TOL), f"{where}: {name}"


def check_run(result: dict[str, Any], err: str, expect: dict[str, Any], where: str) -> None:
    check_ratios(result, expect, where)
    if "published" in expect:
        # The published figures are rounded to six places; ours must round to them.
        for name, value in expect["published"].items():
            assert round(result[name], 6) == value, f"{where}: published {name}"
    check_components(result["components"], expect.get("components", {}), where)
    if "equipment" in expect:
        assert result["equipment"] == expect["equipment"]
    if "downtime_by_reason" in expect:
        assert result["downtime_by_reason"] == pytest.approx(expect["downtime_by_reason"], abs=TOL)
    codes = Counter(flag["code"] for flag in result["flags"])
    for code, count in expect.get("flags", {}).items():
        assert codes[code] == count, f"{where}: flag {code}: {result['flags']}"
    for code, data in expect.get("flag_data", {}).items():
        flagged = [f["data"] for f in result["flags"] if f["code"] == code]
        for key, value in data.items():
            assert all(d[key] == pytest.approx(value, abs=TOL) for d in flagged), where
    if "warning_lines" in expect:
        assert sorted(w["line"] for w in result["warnings"]) == expect["warning_lines"]
        for line in expect["warning_lines"]:
            assert f"samples.jsonl:{line}: " in err, f"{where}: line {line} not on stderr"
    else:
        assert result["warnings"] == [], f"{where}: unexpected warnings {result['warnings']}"
    if "bucket_count" in expect:
        assert len(result["buckets"]) == expect["bucket_count"], where
    by_start = {b["start"]: b for b in result["buckets"]}
    for bucket in expect.get("buckets", []):
        got = by_start[bucket["start"]]
        for key in ("shift", "shift_start"):
            if key in bucket:
                assert got[key] == bucket[key], f"{where}: bucket {bucket['start']} {key}"
        check_components(got["components"], bucket.get("components", {}), where)
    for eq, sub in expect.get("by_equipment", {}).items():
        check_ratios(result["by_equipment"][eq], sub, f"{where}/{eq}")
        check_components(result["by_equipment"][eq]["components"], sub.get("components", {}), where)


def check_invariants(result: dict[str, Any], run: dict[str, Any], where: str) -> None:
    """What must hold for any replay: the time model is a partition, buckets add up."""
    c = result["components"]
    equipment = result["equipment"]
    n = 1 if isinstance(equipment, str) else len(equipment)
    window = (
        datetime.fromisoformat(run["to"]) - datetime.fromisoformat(run["from"])
    ).total_seconds()
    classes = c["planned_busy_s"] + c["planned_down_s"] + c["off_plan_s"]
    assert classes == pytest.approx(window * n, abs=TOL), f"{where}: classes vs window"
    busy = c["production_s"] + c["setup_s"] + c["downtime_s"] + c["unknown_s"]
    assert busy == pytest.approx(c["planned_busy_s"], abs=TOL), f"{where}: classes of PBT"
    assert c["produced"] == c["good"] + c["scrap"] + c["rework"], where
    pooled = Components.pool(Components(**b["components"]) for b in result["buckets"])
    for name in COMPONENT_FIELDS:
        assert getattr(pooled, name) == pytest.approx(c[name], abs=TOL), f"{where}: {name}"
    for bucket in result["buckets"]:
        start = datetime.fromisoformat(bucket["start"])
        end = datetime.fromisoformat(bucket["end"])
        seconds = sum(bucket["components"][k] for k in ("planned_busy_s", "planned_down_s"))
        seconds += bucket["components"]["off_plan_s"]
        assert seconds == pytest.approx((end - start).total_seconds(), abs=TOL), where
        assert 0 < (end - start).total_seconds() <= 60 or start == end, where
    r = ratios(Components(**c))
    if r.oee is not None and None not in (r.availability, r.performance, r.quality):
        # OEE = A x P x Q = ideal_good / PBT: the built-in self-check.
        assert r.availability * r.performance * r.quality == pytest.approx(r.oee, abs=TOL)  # type: ignore[operator]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = json.loads((case / "expected.json").read_text())
    results: dict[str, dict[str, Any]] = {}
    for run in spec["runs"]:
        where = f"{case.name}/{run['name']}"
        result, err = replay(case, run, capsys)
        assert datetime.fromisoformat(result["from"]) == datetime.fromisoformat(run["from"])
        assert datetime.fromisoformat(result["to"]) == datetime.fromisoformat(run["to"])
        check_run(result, err, run["expect"], where)
        check_invariants(result, run, where)
        results[run["name"]] = result
    for pool in spec.get("pools", []):
        parts = Components.pool(Components(**results[name]["components"]) for name in pool["parts"])
        whole = results[pool["whole"]]
        check_components(
            whole["components"],
            {name: getattr(parts, name) for name in COMPONENT_FIELDS},
            f"{case.name}: pool {pool['parts']} vs {pool['whole']}",
        )
        pooled = ratios(parts)
        check_ratios(whole, pooled.as_dict(), f"{case.name}: pooled ratios")


def test_every_edge_case_of_the_spec_has_a_case() -> None:
    names = {c.name for c in CASES}
    required = {
        "oee_com_shift",
        "planned_busy_time_zero",
        "production_zero",
        "produced_zero",
        "performance_above_one",
        "counter_wrap_unsigned",
        "counter_wrap_signed",
        "counter_reset_to_zero",
        "restart_no_phantom_delta",
        "stop_across_shift_edge",
        "shift_sums_equal_day_sums",
        "pooled_machines_mixed_products",
        "product_change_mid_shift",
        "production_off_plan",
        "out_of_order_and_duplicates",
        "late_arriving_counts",
        "dst_spring_23h_day",
        "dst_autumn_25h_day",
        "night_shift_across_midnight",
        "communication_loss_unknown",
    }
    assert required <= names, sorted(required - names)
