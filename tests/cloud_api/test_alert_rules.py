"""The alert rule model, the `alerts:` settings, the webhook signature and payload shapes:
pure code, no servers."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from cloud_api.alerts import signature
from cloud_api.alerts.delivery import webhook_body
from cloud_api.alerts.rules import RuleSpec
from cloud_api.alerts.settings import AlertsSettings
from cloud_api.alerts.store import Delivery

HOOK = {"type": "webhook", "url": "https://example.com/h", "secret_env": "S"}


def test_each_kind_takes_its_own_parameters() -> None:
    rule = RuleSpec.model_validate(
        {"name": "a", "kind": "machine_stopped", "for": "10m", "receivers": ["x"]}
    )
    assert rule.for_ == 600.0 and rule.public()["for"] == 600.0
    with pytest.raises(ValidationError, match="`below` does not apply to a machine_stopped"):
        RuleSpec.model_validate(
            {"name": "a", "kind": "machine_stopped", "for": "1m", "below": 0.5, "receivers": ["x"]}
        )
    with pytest.raises(ValidationError, match="a shift_kpi_below rule needs `below`"):
        RuleSpec.model_validate({"name": "a", "kind": "shift_kpi_below", "receivers": ["x"]})
    with pytest.raises(ValidationError, match="receiver is named twice"):
        RuleSpec.model_validate({"name": "a", "kind": "sequence_gap", "receivers": ["x", "x"]})
    with pytest.raises(ValidationError, match="kind"):
        RuleSpec.model_validate({"name": "a", "kind": "coffee_empty", "receivers": ["x"]})


def test_a_shift_kpi_rule_takes_the_threshold_of_its_kpis_direction() -> None:
    def rule(**params: object) -> RuleSpec:
        return RuleSpec.model_validate(
            {"name": "k", "kind": "shift_kpi_below", "receivers": ["x"], **params}
        )

    assert rule(below=0.5).public()["below"] == 0.5  # OEE by default
    assert rule(kpi="mtbf_s", below=1800).below == 1800
    assert rule(kpi="mttr_s", above=600).public()["above"] == 600
    assert rule(kpi="scrap_ratio", above=0.02).above == 0.02
    with pytest.raises(ValidationError, match=r"`below` does not apply to scrap_ratio \(lower"):
        rule(kpi="scrap_ratio", below=0.02)
    with pytest.raises(ValidationError, match=r"`above` does not apply to oee \(higher"):
        rule(kpi="oee", above=0.5)
    with pytest.raises(ValidationError, match="needs `above` for failures"):
        rule(kpi="failures")
    with pytest.raises(ValidationError, match="unknown KPI 'coffee'"):
        rule(kpi="coffee", below=1)
    with pytest.raises(ValidationError, match=r"0\.85 for 85 %"):
        rule(kpi="availability", below=85)


def test_settings_refuse_unknown_receivers_duplicate_names_and_unsigned_json() -> None:
    rule = {"name": "r", "kind": "agent_silent", "for": "5m", "receivers": ["ops"]}
    with pytest.raises(ValidationError, match="unknown receiver"):
        AlertsSettings.model_validate({"rules": [rule]})
    with pytest.raises(ValidationError, match="used twice"):
        AlertsSettings.model_validate({"receivers": {"ops": HOOK}, "rules": [rule, rule]})
    with pytest.raises(ValidationError, match="a json webhook is signed"):
        AlertsSettings.model_validate({"receivers": {"ops": {**HOOK, "secret_env": None}}})
    slack = AlertsSettings.model_validate(
        {
            "receivers": {
                "s": {"type": "webhook", "url": "https://hooks.slack.com/x", "format": "slack"}
            }
        }
    )
    assert "hooks.slack.com" not in repr(slack)


def test_signature_verifies_the_exact_body_and_a_fresh_timestamp() -> None:
    secret, body = b"k" * 32, b'{"event":"opened"}'
    value = signature.sign(secret, body, 1_767_600_000)
    assert value.startswith("v1=")
    signature.verify(secret, body, "1767600000", value, now=1_767_600_100)
    with pytest.raises(signature.SignatureError, match="does not match"):
        signature.verify(secret, body + b" ", "1767600000", value, now=1_767_600_100)
    with pytest.raises(signature.SignatureError, match="does not match"):
        signature.verify(b"other", body, "1767600000", value, now=1_767_600_100)
    with pytest.raises(signature.SignatureError, match="more than 300 s off"):
        signature.verify(secret, body, "1767600000", value, now=1_767_600_301)
    with pytest.raises(signature.SignatureError, match="not a number"):
        signature.verify(secret, body, "-1", value, now=0)


def test_slack_and_teams_shapes() -> None:
    payload = {
        "event": "resolved",
        "alert": {"id": 7, "rule": "press-down", "subject": "p/press-1", "summary": "stopped",
                  "resolved_at": "2026-01-05T06:10:00+00:00", "resolution": "condition cleared"},
    }  # fmt: skip
    delivery = Delivery(3, 7, "resolved", "r", payload, 0)
    slack = webhook_body(delivery, "slack")
    assert slack == {
        "text": "*[RESOLVED] press-down: p/press-1*\nstopped\n"
        "resolved at 2026-01-05T06:10:00+00:00 (condition cleared)"
    }
    teams = webhook_body(delivery, "teams")
    card = teams["attachments"][0]
    assert teams["type"] == "message"
    assert card["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert card["content"]["type"] == "AdaptiveCard"
    assert card["content"]["body"][0]["text"] == "[RESOLVED] press-down: p/press-1"
    plain = webhook_body(delivery, "json")
    assert plain["delivery_id"] == 3 and json.loads(json.dumps(plain))["alert"]["id"] == 7
