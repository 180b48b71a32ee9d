"""Targets (agent YAML -> config event -> real ingest; PUT /v1/targets, audited) beside the
values of /v1/oee, /v1/kpis, /v1/equipment/{id}/oee and /v1/plant/live; scrap by reason in
/v1/quality from count events the engine made. Real PostgreSQL; the cross-view checker last."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from agent.config import ConfigError, parse_config
from agent.runtime import AgentRuntime
from cloud_api.access.auth import TokenKeyring, issue_token
from cloud_api.config import CloudSettings, DatabaseSettings
from connectors.sample import Sample
from oee.events import Event
from sync.keys import AgentKeys, CloudKeyring
from tests.cloud_api.ingestion import enrolled_agent, press_spec
from tests.cloud_api.test_kpis_api import PRESS_1, PRESS_2, T0, at, get, press_samples, window
from tests.cloud_api.test_query_api import ApiClient, api  # noqa: F401 (the api fixture)
from tests.invariants import check_views

YAML = """
agent: {{id: edge-a, site: plant-a, timezone: UTC, state_dir: "{state}"}}
targets:
  site: {{oee: 0.6, mtbf_s: 1800}}
  lines: {{line-1: {{oee: 0.7, availability: 0.9}}}}
equipment:
  - id: press-1
    line: line-1
    ideal_cycle_time: 1s
    targets: {{oee: 0.85}}
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running, 2: fault, 3: setup}}}}
      total_count: {{address: "holding:1"}}
      scrap_count: {{address: "holding:3"}}
      reason: {{address: "holding:4", map: {{1: jam, 2: no material}}}}
      scrap_reason: {{address: "holding:5", map: {{1: burr, 2: crack}}}}
  - id: press-2
    line: line-1
    ideal_cycle_time: 1s
    signals:
      state: {{address: "holding:0", map: {{0: idle, 1: running, 2: fault, 3: setup}}}}
      total_count: {{address: "holding:1"}}
"""


def test_yaml_targets_are_validated_with_path_and_line(tmp_path: Path) -> None:
    text = YAML.format(state=tmp_path).replace("{oee: 0.85}", "{oee: 85}")
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    message = str(caught.value)
    assert "equipment[0].targets (line 10)" in message and "0.85 for 85 %" in message
    bad_line = YAML.format(state=tmp_path).replace("line-1: {", "line-9: {")
    with pytest.raises(ConfigError, match=r"targets\.lines\.line-9.*no equipment is on line"):
        parse_config(bad_line)
    no_scrap = YAML.format(state=tmp_path).replace('scrap_count: {address: "holding:3"}', "")
    with pytest.raises(ConfigError, match="scrap_reason needs a scrap_count"):
        parse_config(no_scrap)


def test_targets_from_yaml_and_api_beside_values_and_scrap_by_reason(
    api: ApiClient,  # noqa: F811
    pg_url: str,
    pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    tmp_path: Path,
) -> None:
    agent = enrolled_agent(
        pg_url, pool, cloud_keys, tmp_path / "keys", agent_id="edge-a", site_id="plant-a"
    )
    config = parse_config(YAML.format(state=tmp_path / "state"))
    runtime = AgentRuntime(config, AgentKeys.load(tmp_path / "keys"))
    try:
        config_event = runtime.config_event(T0)
    finally:
        runtime.outbox.close()
    specs = {s.id: s for s in config.oee_specs()}
    assert specs["press-1"].scrap_reason_map == {"1": "burr", "2": "crack"}
    samples = press_samples("press-1", PRESS_1)
    samples = [s for s in samples if s.signal != "rework_count"]
    # The scrap reason: burr from 06:00, crack from 06:45, none from 07:30.
    samples += [Sample("press-1", "scrap_reason", v, at(m)) for m, v in ((0, 1), (45, 2), (90, 0))]
    samples.sort(key=lambda s: s.ts)
    events: list[Event] = [config_event]
    events += agent.engine_events([specs["press-1"]], samples, T0, T0 + timedelta(hours=2))
    press_2 = [
        s
        for s in press_samples("press-2", PRESS_2)
        if s.signal in ("state", "reason", "total_count")
    ]
    events += agent.engine_events([press_spec("press-2")], press_2, T0, T0 + timedelta(hours=2))
    assert agent.send(events) == "stored"

    # YAML targets: equipment > line > site, per KPI.
    one = get(api, "/v1/equipment/press-1/oee", **window())
    assert one["targets"] == {"availability": 0.9, "oee": 0.85}
    two = get(api, "/v1/oee", **window(scope="equipment", id="press-2"))
    assert two["total"]["targets"] == {"availability": 0.9, "oee": 0.7}
    kpis = get(api, "/v1/kpis", **window(scope="equipment", id="press-1", kpi="oee,mtbf_s"))
    assert kpis["total"]["targets"] == {"oee": 0.85, "mtbf_s": 1800.0}
    by_eq = get(api, "/v1/oee", **window(scope="site", id="plant-a", group_by="equipment"))
    assert by_eq["total"]["targets"] == {"oee": 0.6}
    assert {g["equipment"]: g["total"]["targets"]["oee"] for g in by_eq["groups"]} == {
        "press-1": 0.85,
        "press-2": 0.7,
    }
    live = get(api, "/v1/plant/live", site="plant-a")
    assert {m["equipment_id"]: m["targets"]["oee"] for m in live["equipment"]} == {
        "press-1": 0.85,
        "press-2": 0.7,
    }

    # An API target overrides the YAML's at its scope; a cached answer sees the change.
    keys = tmp_path / "api-keys"

    def bearer(role: str) -> dict[str, str]:
        token, _ = issue_token(
            TokenKeyring.load(keys),
            CloudSettings(database=DatabaseSettings(url=pg_url), keys_dir=keys).security,
            subject=f"{role}-a", role=role, sites=["plant-a"], ttl=timedelta(hours=1),
        )  # fmt: skip
        return {"Authorization": f"Bearer {token}"}

    engineer = bearer("engineer")
    viewer_put = api.put(
        "/v1/targets",
        json={"site": "plant-a", "scope": "site", "targets": {"oee": 0.5}},
        headers=bearer("viewer"),
    )
    assert viewer_put.status_code == 403
    cached = get(api, "/v1/oee", **window(scope="line", id="line-1"))
    assert cached["total"]["targets"]["oee"] == 0.7
    put = api.put(
        "/v1/targets",
        json={"site": "plant-a", "scope": "line", "id": "line-1", "targets": {"oee": 0.75}},
        headers=engineer,
    )
    assert put.status_code == 200, put.text
    assert put.json()["targets"] == {"availability": 0.9, "oee": 0.75, "mtbf_s": 1800.0}
    assert {(t["kpi"], t["source"]) for t in put.json()["set_here"]} == {
        ("oee", "config"),
        ("oee", "api"),
        ("availability", "config"),
    }
    again = get(api, "/v1/oee", **window(scope="line", id="line-1"))
    assert again["total"]["targets"]["oee"] == 0.75
    assert (
        get(api, "/v1/oee", **window(scope="equipment", id="press-2"))["total"]["targets"]["oee"]
        == 0.75
    )
    # The equipment's own YAML target is more specific than the line's API one.
    assert get(api, "/v1/equipment/press-1/oee", **window())["targets"]["oee"] == 0.85
    with pool.connection() as conn:
        audited = conn.execute(
            "SELECT action, target, detail->'targets' FROM audit.records "
            "WHERE action = 'targets.set'"
        ).fetchall()
    assert audited == [("targets.set", "plant-a/line/line-1", {"oee": 0.75})]

    bad = api.put(
        "/v1/targets",
        json={"site": "plant-a", "scope": "equipment", "id": "press-1", "targets": {"oee": 85}},
        headers=engineer,
    )
    assert bad.status_code == 422 and "0.85 for 85 %" in bad.text
    unknown = api.put(
        "/v1/targets",
        json={"site": "plant-a", "scope": "equipment", "id": "press-9", "targets": {"oee": 0.5}},
        headers=engineer,
    )
    assert unknown.status_code == 404
    # null removes the API's target: the YAML's applies again.
    removed = api.put(
        "/v1/targets",
        json={"site": "plant-a", "scope": "line", "id": "line-1", "targets": {"oee": None}},
        headers=engineer,
    )
    assert removed.status_code == 200 and removed.json()["targets"]["oee"] == 0.7
    listed = get(api, "/v1/targets", site="plant-a", scope="equipment", id="press-1")
    assert listed["targets"] == {"availability": 0.9, "oee": 0.85, "mtbf_s": 1800.0}

    # Each KPI's direction: a target above the value is met by a lower-is-better KPI (scrap
    # ratio, MTTR) and missed by a higher-is-better one (OEE, MTBF).
    picked = window(scope="equipment", id="press-1", kpi="oee,mtbf_s,scrap_ratio,mttr_s")
    values = get(api, "/v1/kpis", **picked)["total"]
    assert all(values[k] is not None and values[k] < 1 for k in ("oee", "scrap_ratio"))
    assert all(values[k] is not None and values[k] > 0 for k in ("mtbf_s", "mttr_s"))
    above = {
        "oee": (1 + values["oee"]) / 2,
        "scrap_ratio": (1 + values["scrap_ratio"]) / 2,
        "mtbf_s": values["mtbf_s"] * 2,
        "mttr_s": values["mttr_s"] * 2,
    }
    put = api.put(
        "/v1/targets",
        json={"site": "plant-a", "scope": "equipment", "id": "press-1", "targets": above},
        headers=engineer,
    )
    assert put.status_code == 200, put.text
    judged = get(api, "/v1/kpis", **picked)["total"]
    assert judged["targets"] == above
    assert judged["against_targets"] == {
        "oee": {"target": above["oee"], "better": "higher", "met": False},
        "mtbf_s": {"target": above["mtbf_s"], "better": "higher", "met": False},
        "scrap_ratio": {"target": above["scrap_ratio"], "better": "lower", "met": True},
        "mttr_s": {"target": above["mttr_s"], "better": "lower", "met": True},
    }
    # /v1/oee, /v1/equipment/{id}/oee and /v1/plant/live judge by the same definition.
    oee_total = get(api, "/v1/oee", **window(scope="equipment", id="press-1"))["total"]
    assert oee_total["against_targets"]["oee"] == judged["against_targets"]["oee"]
    assert oee_total["against_targets"]["availability"] == {
        "target": 0.9,
        "better": "higher",
        "met": oee_total["availability"] >= 0.9,
    }
    one = get(api, "/v1/equipment/press-1/oee", **window())
    assert one["against_targets"]["oee"] == judged["against_targets"]["oee"]
    live_press = next(
        m for m in get(api, "/v1/plant/live", site="plant-a")["equipment"]
        if m["equipment_id"] == "press-1"
    )  # fmt: skip
    shift_oee = (live_press["shift"] or {}).get("oee")
    assert live_press["against_targets"]["oee"] == {
        "target": above["oee"],
        "better": "higher",
        "met": None if shift_oee is None else shift_oee >= above["oee"],
    }

    # Scrap by reason: 10 scrap per 10 minutes (counted at n*10+0.5 min).
    quality = get(api, "/v1/quality", **window(scope="equipment", id="press-1"))
    by_reason: dict[str, Any] = {r["reason"]: r["scrap"] for r in quality["by_reason"]}
    # 06:10..06:40 burr (4 x 10), 06:50..07:20 crack (4 x 10), 07:30..07:50 none (3 x 10).
    assert by_reason == {"burr": 40, "crack": 40, "unspecified": 30}
    assert sum(by_reason.values()) == quality["total"]["scrap"]

    check_views(api, pg_url)
