"""Alerts end to end: engine events ingested into PostgreSQL, the alerts worker evaluating
rules over them, notifications to a local webhook receiver (signed) and an SMTP sink."""

from __future__ import annotations

import email
import math
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Message as MessageHandler
from psycopg_pool import ConnectionPool

from agent.config import parse_config
from agent.plant_history import plant_history
from agent.runtime import AgentRuntime
from cloud_api.alerts import store
from cloud_api.alerts.rules import RuleSpec, evaluate
from cloud_api.alerts.settings import AlertsSettings
from cloud_api.alerts.worker import AlertWorker
from cloud_api.config import DatabaseSettings
from cloud_api.db import make_pool
from cloud_api.ingest.worker import BatchWriter
from sync.keys import AgentKeys, CloudKeyring
from sync.uplink import batch_topic
from tests.cloud_api.alerting import SECRET, LivePress, WebhookReceiver, wait_for
from tests.cloud_api.ingestion import Agent, enrolled_agent
from tests.conftest import bearer, enroll, free_port, make_agent_keys
from tests.invariants import api_client, check_views

RUNNING, IDLE, FAULT = 1, 0, 2
JAM = 1
CLOUD_API = str(Path(sys.executable).parent / "cloud-api")
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo-agent.yaml"


class MailSink(MessageHandler):
    """aiosmtpd handler keeping every message it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[email.message.Message] = []

    def handle_message(self, message: email.message.Message) -> None:
        self.messages.append(message)


@pytest.fixture
def mail() -> Iterator[tuple[MailSink, int]]:
    sink = MailSink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    yield sink, port
    controller.stop()


@pytest.fixture(autouse=True)
def webhook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALERTS_TEST_SECRET", SECRET)


def settings_for(
    hooks: dict[str, WebhookReceiver], rules: list[dict[str, Any]], **extra: Any
) -> AlertsSettings:
    receivers: dict[str, Any] = {
        name: {"type": "webhook", "url": hook.url, "secret_env": "ALERTS_TEST_SECRET",
               "timeout": "1s"}
        for name, hook in hooks.items()
    }  # fmt: skip
    receivers.update(extra.pop("receivers", {}))
    return AlertsSettings.model_validate(
        {
            "evaluate_every": extra.pop("evaluate_every", "200ms"),
            "poll": "100ms",
            "receivers": receivers,
            "delivery": {"backoff_first": "100ms", "backoff_max": "500ms", "max_attempts": 1000},
            "rules": rules,
            **extra,
        }
    )


@pytest.fixture
def worker_pool(pg_url: str) -> Iterator[ConnectionPool]:
    p = make_pool(DatabaseSettings(url=pg_url, pool_min=1, pool_max=12), name="alerts")
    yield p
    p.close()


def evaluations_after(pg_url: str, rule: str, rounds: int = 3) -> None:
    """Wait until `rule` has been evaluated `rounds` more times (nothing more is coming)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        first = conn.execute(
            "SELECT evaluated_at FROM alerts.rules WHERE rule_id = %s", (rule,)
        ).fetchone()
        seen = {first[0] if first else None}

        def advanced() -> bool:
            row = conn.execute(
                "SELECT evaluated_at FROM alerts.rules WHERE rule_id = %s", (rule,)
            ).fetchone()
            if row is not None:
                seen.add(row[0])
            return len(seen) > rounds

        wait_for(advanced, f"{rounds} more evaluations of {rule}")


def run_rules(pg_url: str) -> dict[str, set[str]]:
    """Evaluate every rule once, as a worker does; returns the open alerts' subjects by rule."""
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE alerts.rules SET next_eval_at = now()")
        conn.commit()
        while store.evaluate_due_rule(conn, every_s=3600, actor="test") is not None:
            pass
        rows = conn.execute(
            "SELECT rule_id, subject FROM alerts.alerts WHERE resolved_at IS NULL"
        ).fetchall()
    out: dict[str, set[str]] = {}
    for rule, subject in rows:
        out.setdefault(rule, set()).add(subject)
    return out


def evaluated(pg_url: str) -> dict[str, Any]:
    with psycopg.connect(pg_url) as conn:
        return dict(conn.execute("SELECT rule_id, evaluated_at FROM alerts.rules").fetchall())


def audit_actions(pg_url: str) -> Counter[str]:
    with psycopg.connect(pg_url) as conn:
        return Counter(
            r[0]
            for r in conn.execute(
                "SELECT action FROM audit.records WHERE action LIKE 'alert%%'"
            ).fetchall()
        )


def test_a_stopped_machine_gets_one_signed_notification_and_one_resolution(
    pg_url: str,
    pool: ConnectionPool,
    worker_pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    tmp_path: Path,
    mail: tuple[MailSink, int],
) -> None:
    sink, smtp_port = mail
    hook = WebhookReceiver(free_port())
    hook.up()
    rule = {"name": "press-down", "kind": "machine_stopped", "site": "plant-a", "for": "1s",
            "receivers": ["ops", "mail"]}  # fmt: skip
    settings = settings_for(
        {"ops": hook},
        [rule],
        receivers={"mail": {"type": "email", "to": ["shift-lead@plant-a.example"]}},
        smtp={"host": "127.0.0.1", "port": smtp_port, "sender": "alerts@cloud.example"},
    )
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="edge-a", site_id="plant-a")
    press = LivePress(agent, ["press-1"])
    press.set_state(RUNNING)
    worker = AlertWorker(worker_pool, settings)
    worker.start()
    try:
        evaluations_after(pg_url, "press-down")
        assert hook.messages() == [], "a running press opened an alert"
        stopped_at = press.set_state(FAULT, JAM)
        wait_for(lambda: len(hook.messages()) >= 1, "the opened notification")
        press.set_state(RUNNING)
        wait_for(lambda: len(hook.messages()) >= 2, "the resolution")
        wait_for(lambda: len(sink.messages) >= 2, "both e-mails")
        evaluations_after(pg_url, "press-down")
    finally:
        worker.stop()
        hook.down()

    assert hook.bad == []
    opened, resolved = hook.messages()
    assert [opened.body["event"], resolved.body["event"]] == ["opened", "resolved"]
    assert opened.body["alert"]["id"] == resolved.body["alert"]["id"]
    alert = opened.body["alert"]
    assert (alert["rule"], alert["kind"], alert["site"], alert["equipment"]) == (
        "press-down", "machine_stopped", "plant-a", "press-1"
    )  # fmt: skip
    assert alert["detail"]["state"] == "fault" and alert["detail"]["reason"] == "jam"
    assert alert["since"] == stopped_at.isoformat()
    assert resolved.body["alert"]["resolution"] == "condition cleared"
    assert opened.headers["x-alert-event"] == "opened"
    assert opened.headers["x-alert-delivery"] != resolved.headers["x-alert-delivery"]

    subjects = [m["Subject"] for m in sink.messages]
    assert subjects == [
        "[ALERT] press-down: plant-a/press-1",
        "[RESOLVED] press-down: plant-a/press-1",
    ]
    assert all(m["To"] == "shift-lead@plant-a.example" for m in sink.messages)
    assert "stopped (fault: jam)" in str(sink.messages[0].get_payload())
    assert audit_actions(pg_url) == {"alert_rule.put": 1, "alert.open": 1, "alert.resolve": 1}

    press.finish()
    keys = tmp_path / "api-keys"
    with api_client(pg_url, keys) as api:
        listed = api.get("/v1/alerts", params={"state": "all"}).json()["alerts"]
        assert [(a["alert_id"], a["resolved_at"] is not None) for a in listed] == [
            (alert["id"], True)
        ]
        assert api.get("/v1/alerts").json()["alerts"] == []  # none open
        for sites, seen in ((["plant-z"], 0), (["plant-a"], 1)):
            viewer = bearer(keys, role="viewer", sites=sites)
            r = api.get("/v1/alerts", params={"state": "all"}, headers=viewer)
            assert r.status_code == 200 and len(r.json()["alerts"]) == seen
        check_views(api, pg_url)


def test_a_receiver_down_for_a_while_gets_them_late_and_in_order(
    pg_url: str,
    pool: ConnectionPool,
    worker_pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    tmp_path: Path,
) -> None:
    late, steady = WebhookReceiver(free_port()), WebhookReceiver(free_port())
    steady.up()  # `late` is down: its port refuses connections
    rule = {"name": "press-down", "kind": "machine_stopped", "for": "0s",
            "receivers": ["late", "steady"]}  # fmt: skip
    settings = settings_for({"late": late, "steady": steady}, [rule])
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="edge-b", site_id="plant-b")
    press = LivePress(agent, ["press-1", "press-2"])
    press.set_state(RUNNING)
    worker = AlertWorker(worker_pool, settings)
    worker.start()
    try:
        # Two stops and their ends, while `late` is down: four notifications queue for it.
        press.set_state(FAULT, JAM, only=["press-1"])
        wait_for(lambda: len(steady.events()) == 1, "press-1 opened at the steady receiver")
        press.set_state(IDLE, only=["press-2"])
        wait_for(lambda: len(steady.events()) == 2, "press-2 opened at the steady receiver")
        press.set_state(RUNNING, only=["press-1"])
        press.set_state(RUNNING, only=["press-2"])
        wait_for(lambda: len(steady.events()) == 4, "both resolutions at the steady receiver")

        def retried() -> bool:
            with psycopg.connect(pg_url) as conn:
                row = conn.execute(
                    "SELECT min(attempts) FILTER (WHERE delivery_id = (SELECT min(delivery_id) "
                    "FROM alerts.deliveries WHERE receiver = 'late')), count(*) "
                    "FROM alerts.deliveries WHERE receiver = 'late' AND status = 'pending'"
                ).fetchone()
                return row is not None and row[1] == 4 and (row[0] or 0) >= 3

        wait_for(retried, "failed attempts at the late receiver")
        assert late.messages() == []
        late.up()
        wait_for(lambda: len(late.events()) == 4, "the late receiver's four notifications")
        evaluations_after(pg_url, "press-down")
    finally:
        worker.stop()
        late.down()
        steady.down()

    assert late.bad == steady.bad == []
    # Late, in the order they were queued: the steady receiver's order.
    assert late.events() == steady.events()
    events = late.events()
    assert [e for e, _ in events] == ["opened", "opened", "resolved", "resolved"]
    assert events[2][1] == events[0][1] and events[3][1] == events[1][1]
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT receiver, status, attempts, last_error FROM alerts.deliveries "
            "WHERE receiver = 'late' ORDER BY delivery_id"
        ).fetchall()
    assert all(r[1] == "sent" and r[3] is None for r in rows)
    assert rows[0][2] >= 4  # the head was retried while the receiver was down

    press.finish()
    with api_client(pg_url, tmp_path / "api-keys") as api:
        check_views(api, pg_url)


def test_two_worker_processes_never_send_a_notification_twice(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    hook, other = WebhookReceiver(free_port()), WebhookReceiver(free_port())
    hook.up()
    other.up()
    presses = [f"press-{i}" for i in range(1, 7)]
    rules = [
        {"name": "down-fast", "kind": "machine_stopped", "for": "0s", "receivers": ["a", "b"]},
        {"name": "down-site", "kind": "machine_stopped", "site": "plant-c", "for": "0s",
         "receivers": ["a"]},
    ]  # fmt: skip
    config = {
        "database": {"url": pg_url},
        "alerts": {
            "evaluate_every": "50ms",
            "poll": "20ms",
            "receivers": {
                "a": {"type": "webhook", "url": hook.url, "secret_env": "ALERTS_TEST_SECRET"},
                "b": {"type": "webhook", "url": other.url, "secret_env": "ALERTS_TEST_SECRET"},
            },
            "rules": rules,
        },
    }
    path = tmp_path / "cloud.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "ALERTS_TEST_SECRET": SECRET}
    workers = [
        subprocess.Popen(
            [CLOUD_API, "--config", str(path), "alerts", "--log-level", "warning"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="edge-c", site_id="plant-c")
    press = LivePress(agent, presses)
    try:
        press.set_state(RUNNING)

        def count(event: str) -> int:
            return sum(e == event for e, _ in hook.events())

        for k in range(1, 4):  # three rounds: every press stops and runs again
            press.set_state(FAULT, JAM)
            wait_for(lambda k=k: count("opened") == 12 * k, f"openings of round {k}")
            press.set_state(RUNNING)
            wait_for(lambda k=k: count("resolved") == 12 * k, f"resolutions of round {k}")
        evaluations_after(pg_url, "down-fast", rounds=5)
        evaluations_after(pg_url, "down-site", rounds=5)
        assert all(w.poll() is None for w in workers), "a worker exited"
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            _, err = w.communicate(timeout=30)
            assert w.returncode == 0, err.decode()[-2000:]
        hook.down()
        other.down()

    assert hook.bad == other.bad == []
    # 6 presses x 3 stops x 2 rules at receiver a, x 1 rule at b; each opened and resolved.
    for receiver, alerts_expected in ((hook, 36), (other, 18)):
        got = receiver.events()
        assert len(got) == 2 * alerts_expected
        assert Counter(got).most_common(1)[0][1] == 1, "a notification arrived twice"
        ids = [m.headers["x-alert-delivery"] for m in receiver.messages()]
        assert len(set(ids)) == len(ids)
        for alert_id in {a for _, a in got}:
            assert [e for e, a in got if a == alert_id] == ["opened", "resolved"]
    with psycopg.connect(pg_url) as conn:
        sends = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'sent' AND attempts = 1) "
            "FROM alerts.deliveries"
        ).fetchone()
        actors = conn.execute(
            "SELECT count(DISTINCT actor) FROM audit.records WHERE action LIKE 'alert.%%'"
        ).fetchone()
    assert sends == (108, 108)
    assert audit_actions(pg_url) == {"alert_rule.put": 2, "alert.open": 36, "alert.resolve": 36}
    assert actors is not None and actors[0] >= 1

    press.finish()
    with api_client(pg_url, tmp_path / "api-keys") as api:
        check_views(api, pg_url)


def test_gaps_silence_and_refused_batches_open_and_resolve_alerts(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    """The fleet rules, evaluated one at a time as a worker does (no worker thread)."""
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="edge-d", site_id="plant-d")
    press = LivePress(agent, ["press-1"])  # batch 1
    rules = [
        RuleSpec.model_validate(r)
        for r in (
            {"name": "gaps", "kind": "sequence_gap", "receivers": ["x"]},
            {"name": "refused", "kind": "rejected_batches", "window": "1h", "receivers": ["x"]},
        )
    ]  # fmt: skip
    # Put in place only when the test falls silent, so that however long the steps before
    # take on a loaded machine, the agent is silent only when the test means it to be.
    silent = RuleSpec.model_validate(
        {"name": "silent", "kind": "agent_silent", "for": "5s", "receivers": ["x"]}
    )
    # Rules of the running shift's KPIs, put in place once the shift's buckets are all stored
    # (a bucket closing on the minute during the test would be judged early otherwise).
    shift_rules = [
        RuleSpec.model_validate(r)
        for r in (
            {"name": "oee-low", "kind": "shift_kpi_below", "below": 0.5, "min_planned": "1s",
             "site": "plant-d", "receivers": ["x"]},
            # Lower is better: a shift with a failure is worse than none; its one failure
            # lasted seconds, not over an hour.
            {"name": "failing", "kind": "shift_kpi_below", "kpi": "failures", "above": 0,
             "min_planned": "1s", "site": "plant-d", "receivers": ["x"]},
            {"name": "mttr-long", "kind": "shift_kpi_below", "kpi": "mttr_s", "above": 3600,
             "min_planned": "1s", "site": "plant-d", "receivers": ["x"]},
        )
    ]  # fmt: skip
    with psycopg.connect(pg_url) as conn:
        store.sync_file_rules(conn, rules, "test")

    def run_all() -> dict[str, set[str]]:
        return run_rules(pg_url)

    assert run_all() == {}
    # Batch 3 before batch 2: a gap of one batch.
    events = press.feed(RUNNING)
    assert agent.send(events, seq=3) == "stored"
    gap = f"edge-d/{agent.epoch}/2-2"
    assert run_all() == {"gaps": {gap}}
    assert agent.send(press.feed(FAULT, JAM), seq=2) == "stored"
    agent.seq = 3
    assert run_all() == {}
    # A batch of this agent refused after its signature verified (sent on another site's topic).
    events = press.feed(RUNNING)
    raw = agent.sealed(events, seq=4)
    refused = agent.store.process("test/edge/plant-x/edge-d/v1/batches", raw)
    assert refused.status == "rejected" and refused.reason == "wrong_topic"
    assert agent.send(events, seq=4) == "stored"  # then on its own topic
    agent.seq = 4
    assert run_all() == {"refused": {"edge-d"}}
    # Silence: nothing for more than 5 s.
    rules.append(silent)
    with psycopg.connect(pg_url) as conn:
        store.sync_file_rules(conn, rules, "test")
    time.sleep(5.5)
    assert run_all() == {"refused": {"edge-d"}, "silent": {"edge-d"}}
    press.set_state(RUNNING)  # batch 5
    assert run_all() == {"refused": {"edge-d"}}
    # The running shift's OEE: no part made, so 0 once it has planned time.
    press.finish()
    with psycopg.connect(pg_url) as conn:
        store.sync_file_rules(conn, [*rules, *shift_rules], "test")
    assert run_all() == {
        "refused": {"edge-d"},
        "oee-low": {"plant-d/press-1"},
        "failing": {"plant-d/press-1"},
    }
    with psycopg.connect(pg_url) as conn:
        queued = conn.execute(
            "SELECT a.rule_id, d.event FROM alerts.deliveries d JOIN alerts.alerts a "
            "USING (alert_id) ORDER BY d.delivery_id"
        ).fetchall()
    assert queued == [
        ("gaps", "opened"), ("gaps", "resolved"), ("refused", "opened"),
        ("silent", "opened"), ("silent", "resolved"), ("failing", "opened"),
        ("oee-low", "opened"),
    ]  # fmt: skip
    with api_client(pg_url, tmp_path / "api-keys") as api:
        check_views(api, pg_url)


def test_rules_api_is_for_admins_audited_and_scoped(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    from cloud_api.config import CloudSettings
    from tests.cloud_api.test_query_api import served

    keys = tmp_path / "api-keys"
    settings = CloudSettings.model_validate(
        {
            "database": {"url": pg_url},
            "keys_dir": str(keys),
            "alerts": {
                "receivers": {"ops": {"type": "webhook", "url": "http://127.0.0.1:9/",
                                      "secret_env": "ALERTS_TEST_SECRET"}},
                "rules": [{"name": "from-file", "kind": "agent_silent", "for": "10m",
                           "receivers": ["ops"]}],
            },
        }
    )  # fmt: skip
    with psycopg.connect(pg_url) as conn:
        store.sync_file_rules(conn, settings.alerts.rules, "cloud.yaml")
    rule = {"name": "p-down", "kind": "machine_stopped", "site": "plant-e", "for": "5m",
            "receivers": ["ops"]}  # fmt: skip
    with served(settings, pool) as api:
        admin = bearer(keys, role="admin")
        r = api.put("/v1/alerts/rules/p-down", json=rule, headers=bearer(keys, role="engineer"))
        assert r.status_code == 403
        r = api.put("/v1/alerts/rules/p-down", json=rule, headers=admin)
        assert r.status_code == 200, r.text
        bad = {**rule, "receivers": ["nobody"]}
        r = api.put("/v1/alerts/rules/p-down", json=bad, headers=admin)
        assert r.status_code == 422 and "nobody" in r.text
        r = api.put("/v1/alerts/rules/p-down", json={**rule, "below": 0.5}, headers=admin)
        assert r.status_code == 422 and "below" in r.text
        site_admin = bearer(keys, role="admin", sites=["plant-f"])
        r = api.put("/v1/alerts/rules/p-down", json=rule, headers=site_admin)
        assert r.status_code == 403
        # The name is taken at a site this admin cannot see: refused, the rule unchanged.
        r = api.put("/v1/alerts/rules/p-down", json={**rule, "site": "plant-f"}, headers=site_admin)
        assert r.status_code == 409 and "outside the caller's sites" in r.text
        r = api.put(
            "/v1/alerts/rules/everywhere",
            json={**rule, "name": "everywhere", "site": None},
            headers=site_admin,
        )
        assert r.status_code == 403
        file_rule = {"name": "from-file", "kind": "agent_silent", "for": "1m", "receivers": ["ops"]}
        r = api.put("/v1/alerts/rules/from-file", json=file_rule, headers=admin)
        assert r.status_code == 409
        assert api.delete("/v1/alerts/rules/from-file", headers=admin).status_code == 409
        listed = api.get("/v1/alerts/rules", headers=admin).json()["rules"]
        assert [(x["name"], x["site"], x["source"]) for x in listed] == [
            ("from-file", None, "file"), ("p-down", "plant-e", "api")
        ]  # fmt: skip
        viewer_f = bearer(keys, role="viewer", sites=["plant-f"])
        assert api.get("/v1/alerts/rules", headers=viewer_f).json()["rules"] == []
        assert api.get("/v1/alerts/dead-letters", headers=viewer_f).status_code == 403
        assert api.delete("/v1/alerts/rules/p-down", headers=admin).status_code == 204
        assert api.delete("/v1/alerts/rules/p-down", headers=admin).status_code == 404
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT actor, actor_kind, action, target FROM audit.records "
            "WHERE action LIKE 'alert_rule%%' ORDER BY id"
        ).fetchall()
    assert rows == [
        ("file:cloud.yaml", "config", "alert_rule.put", "from-file"),
        ("test-admin", "token:admin", "alert_rule.put", "p-down"),
        ("test-admin", "token:admin", "alert_rule.delete", "p-down"),
    ]


def test_a_stored_batch_makes_its_rules_due_at_once(
    pg_url: str,
    pool: ConnectionPool,
    worker_pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    tmp_path: Path,
) -> None:
    """With an hour between timed evaluations, only the worker's listener can make the rule
    due when the stop is stored; the rule of another site stays on its timer."""
    hook = WebhookReceiver(free_port())
    hook.up()
    rules = [
        {"name": "here", "kind": "machine_stopped", "site": "plant-g", "for": "0s",
         "receivers": ["ops"]},
        {"name": "elsewhere", "kind": "machine_stopped", "site": "plant-h", "for": "0s",
         "receivers": ["ops"]},
    ]  # fmt: skip
    settings = settings_for({"ops": hook}, rules, evaluate_every="1h")
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="edge-g", site_id="plant-g")
    press = LivePress(agent, ["press-1"])
    press.set_state(RUNNING)
    worker = AlertWorker(worker_pool, settings, listen_url=pg_url)
    worker.start()
    try:
        wait_for(lambda: None not in evaluated(pg_url).values(), "the evaluations at start")
        first = evaluated(pg_url)
        press.set_state(FAULT, JAM)
        wait_for(lambda: hook.events() != [], "the opened notification")
        press.set_state(RUNNING)
        wait_for(lambda: len(hook.events()) == 2, "the resolution")
    finally:
        worker.stop()
        hook.down()
    assert [e for e, _ in hook.events()] == ["opened", "resolved"]
    last = evaluated(pg_url)
    assert last["elsewhere"] == first["elsewhere"] and last["here"] > first["here"]
    press.finish()
    with api_client(pg_url, tmp_path / "api-keys") as api:
        check_views(api, pg_url)


def test_a_notification_is_dead_lettered_after_the_attempt_bound(
    pg_url: str,
    pool: ConnectionPool,
    worker_pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    tmp_path: Path,
) -> None:
    gone, steady = WebhookReceiver(free_port()), WebhookReceiver(free_port())
    steady.up()  # `gone` never listens
    rule = {"name": "press-down", "kind": "machine_stopped", "for": "0s",
            "receivers": ["gone", "steady"]}  # fmt: skip
    settings = settings_for({"gone": gone, "steady": steady}, [rule])
    settings.delivery.max_attempts = 3
    agent = enrolled_agent(pg_url, pool, cloud_keys, tmp_path, agent_id="edge-k", site_id="plant-k")
    press = LivePress(agent, ["press-1"])
    press.set_state(RUNNING)
    worker = AlertWorker(worker_pool, settings)
    worker.start()

    def statuses() -> list[tuple[str, str, int]]:
        with psycopg.connect(pg_url) as conn:
            return [
                (r[0], r[1], r[2])
                for r in conn.execute(
                    "SELECT event, status, attempts FROM alerts.deliveries "
                    "WHERE receiver = 'gone' ORDER BY delivery_id"
                ).fetchall()
            ]

    try:
        press.set_state(FAULT, JAM)
        wait_for(lambda: statuses() == [("opened", "dead", 3)], "the opened one dead-lettered")
        press.set_state(RUNNING)
        wait_for(lambda: len(steady.events()) == 2, "both at the steady receiver")
        wait_for(lambda: len(statuses()) == 2 and statuses()[1][1] == "dead", "the resolution")
    finally:
        worker.stop()
        steady.down()
    assert statuses() == [("opened", "dead", 3), ("resolved", "dead", 3)]
    keys = tmp_path / "api-keys"
    with api_client(pg_url, keys) as api:
        r = api.get("/v1/alerts/dead-letters", headers=bearer(keys, role="admin"))
        assert r.status_code == 200, r.text
        dead = r.json()["deliveries"]
        assert [(d["receiver"], d["event"], d["attempts"]) for d in dead] == [
            ("gone", "resolved", 3), ("gone", "opened", 3)
        ]  # fmt: skip
        assert all(d["last_error"] == "the request failed (ConnectError)" for d in dead)
        press.finish()
        check_views(api, pg_url)


def undrained_agent(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> tuple[AgentRuntime, BatchWriter, Agent]:
    """An enrolled demo agent whose outbox holds 30 minutes of its plant's batches, none
    shipped; the ingest that stores them; and the agent's own channel for its status events
    (AgentRuntime.status_event), which travel on ahead of the batches."""
    text = DEMO.read_text(encoding="utf-8").replace("var/demo/agent", str(tmp_path / "agent"))
    config = parse_config(text, "demo-agent.yaml", env={})
    site, agent_id = config.agent.site, config.agent.id
    enroll(pg_url, agent_id, site, make_agent_keys(config.keys_dir, cloud_keys))
    keys = AgentKeys.load(config.keys_dir)
    end = LivePress.now() - timedelta(minutes=5)
    samples, _ = plant_history(config, end - timedelta(minutes=30), end)
    # The engine starts at the first sample and states "unknown" there; a state read in that
    # same scan would share its timestamp, and two state events of one instant have no
    # defined order in the cloud's timeline (UUIDv7 ids within one millisecond): the first
    # scan here reads counters only.
    samples = [x for x in samples if not (x.ts == samples[0].ts and x.signal == "state")]
    assert AgentRuntime(config, keys).record(samples, end, flush_every_s=600) > 0
    runtime = AgentRuntime(config, keys)  # started again, its batches not shipped yet
    batches = BatchWriter(pool, cloud_keys, topic_prefix="test/")
    return runtime, batches, Agent(agent_id, site, keys, batches)


def ship_all(runtime: AgentRuntime, batches: BatchWriter) -> dict[int, Any]:
    """Store every batch of the agent's outbox and ack them there."""
    site, agent_id = runtime.config.agent.site, runtime.config.agent.id
    acked = {}
    for batch in runtime.outbox.pending(1000):
        outcome = batches.process(batch_topic("test/", site, agent_id), batch.envelope)
        assert outcome.status == "stored", outcome.reason
        acked[batch.seq] = batch.digest
    assert runtime.outbox.ack(runtime.outbox.epoch, acked) == sorted(acked)
    return acked


def test_an_undrained_outbox_opens_an_alert_until_its_batches_are_acked(
    pg_url: str, pool: ConnectionPool, cloud_keys: CloudKeyring, tmp_path: Path
) -> None:
    """The agent's own status events (AgentRuntime.status_event) report its outbox."""
    runtime, batches, status = undrained_agent(pg_url, pool, cloud_keys, tmp_path)
    agent_id = runtime.config.agent.id
    rule = {"name": "outbox", "kind": "outbox_age", "oldest_over": "1s", "receivers": ["x"]}
    with psycopg.connect(pg_url) as conn:
        store.sync_file_rules(conn, [RuleSpec.model_validate(rule)], "test")
    try:
        time.sleep(1.5)  # the oldest batch is now older than the rule's 1 s
        assert status.send([runtime.status_event()]) == "stored"
        assert run_rules(pg_url) == {"outbox": {agent_id}}
        acked = ship_all(runtime, batches)
        assert status.send([runtime.status_event()]) == "stored"
        assert run_rules(pg_url) == {}
    finally:
        runtime.outbox.close()
    with psycopg.connect(pg_url) as conn:
        detail = conn.execute("SELECT detail FROM alerts.alerts").fetchone()
    assert detail is not None and detail[0]["outbox_depth"] == len(acked)
    assert detail[0]["outbox_oldest_unacked_s"] > 1.0
    with api_client(pg_url, tmp_path / "api-keys") as api:
        check_views(api, pg_url)


def test_a_silent_agent_with_an_undrained_outbox_alerts_as_its_outbox_ages(
    pg_url: str,
    pool: ConnectionPool,
    worker_pool: ConnectionPool,
    cloud_keys: CloudKeyring,
    tmp_path: Path,
) -> None:
    """The agent reports its outbox once and goes silent: no later report says the oldest
    batch is over the limit, yet it is now, and the alert opens as it crosses the limit (the
    worker's timer is an hour: the rule's own wake-up time makes it due)."""
    runtime, batches, status = undrained_agent(pg_url, pool, cloud_keys, tmp_path)
    agent_id = runtime.config.agent.id
    hook = WebhookReceiver(free_port())
    hook.up()
    worker: AlertWorker | None = None
    try:
        assert status.send([runtime.status_event()]) == "stored"  # its last report
        with psycopg.connect(pg_url) as conn:
            found = conn.execute(
                "SELECT (status->>'outbox_oldest_unacked_s')::float8, status_reported_at "
                "FROM registry.agents WHERE agent_id = %s",
                (agent_id,),
            ).fetchone()
        assert found is not None
        reported, reported_at = found
        # Over what the agent reported: the reported age alone never reaches it.
        over = math.ceil(reported) + 3
        far = RuleSpec.model_validate(
            {"name": "far", "kind": "outbox_age", "oldest_over": "1h", "receivers": ["ops"]}
        )
        with psycopg.connect(pg_url) as conn:
            due = evaluate(conn, far)
        # Not over an hour yet: due again when the oldest batch will be.
        assert due.firing == {} and due.holding == set()
        assert due.wake_at == reported_at + timedelta(seconds=3600 - reported)

        rule = {"name": "outbox", "kind": "outbox_age", "oldest_over": f"{over}s",
                "receivers": ["ops"]}  # fmt: skip
        worker = AlertWorker(
            worker_pool, settings_for({"ops": hook}, [rule], evaluate_every="1h"),
            listen_url=pg_url,
        )  # fmt: skip
        worker.start()
        wait_for(lambda: len(hook.messages()) >= 1, "the opened notification")
        with psycopg.connect(pg_url) as conn:
            still = conn.execute(
                "SELECT status_reported_at FROM registry.agents WHERE agent_id = %s", (agent_id,)
            ).fetchone()
        # The agent came back: its batches are stored and acked, its report says so.
        acked = ship_all(runtime, batches)
        assert status.send([runtime.status_event()]) == "stored"
        wait_for(lambda: len(hook.messages()) >= 2, "the resolution")
    finally:
        if worker is not None:
            worker.stop()
        hook.down()
        runtime.outbox.close()

    assert still == (reported_at,), "the agent reported nothing while silent"
    assert hook.bad == []
    opened, resolved = hook.messages()
    assert [opened.body["event"], resolved.body["event"]] == ["opened", "resolved"]
    detail = opened.body["alert"]["detail"]
    assert detail["reported_oldest_unacked_s"] == reported < over
    assert detail["outbox_oldest_unacked_s"] > over
    assert detail["outbox_depth"] == len(acked)
    assert detail["reported_at"] == reported_at.isoformat()
    with api_client(pg_url, tmp_path / "api-keys") as api:
        check_views(api, pg_url)
