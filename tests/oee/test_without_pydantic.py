"""The agent makes, checks, dumps and seals events and verifies the cloud's acks and
rejections without importing pydantic (README "Footprint"): checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

AGENT_SIDE = r"""
import json, sys
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from oee.components import Components, ratios
from oee.events import (
    AgentEvent, FieldValueError, OeeEvent, SampleEvent, StateEvent, count_event, dump_events,
)
from sync.envelope import (
    AckBody, EnvelopeHeader, RejectionBody, envelope_digest, parse_header, seal, sign_ack,
    sign_rejection, verify_cloud_message,
)
from sync.keys import SUITE_X25519, CloudPrivateKey, ed25519_key_id

t = datetime(2026, 12, 5, 6, tzinfo=UTC)
ids = {"agent_id": "edge-01", "site_id": "plant-01", "equipment_id": "press-1"}
parts = Components(planned_busy_s=60.0, production_s=50.0, produced=10, good=9, scrap=1,
                   ideal_produced_s=50.0, ideal_good_s=45.0)
events = [
    StateEvent(**ids, ts=t, state="running", previous="unknown", raw=1),
    count_event(**ids, ts=t, produced=1, good=1, scrap=0, rework=0, product="A",
                scrap_reason=None, in_plan=True),
    OeeEvent(**ids, ts=t, bucket_start=t - timedelta(minutes=1), bucket_end=t,
             components=parts + parts, downtime_by_reason={"jam": 10.0}),
    SampleEvent(**ids, ts=t, signal="speed", value=1.5),
    AgentEvent(**ids, ts=t, code="status", message="agent status", data={"n": [1, 2.5]}),
]
refused = []
for bad in ({"produced": 2**60}, {"ts": t.replace(tzinfo=None)}, {"product": "a\x00"}):
    try:
        count_event(**{**ids, "ts": t, "produced": 1, "good": 1, "scrap": 0, "rework": 0,
                       "product": None, "scrap_reason": None, "in_plan": True, **bad})
    except FieldValueError as exc:
        refused.append(str(exc))
plaintext = dump_events(events)

agent_key, ack_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
cloud = CloudPrivateKey.generate(SUITE_X25519)
header = EnvelopeHeader("edge-01", "plant-01", "0190f1e2", 7, len(events),
                        ed25519_key_id(agent_key.public_key()), cloud.key_id)
raw = seal(plaintext, header, agent_key, cloud.public)
assert parse_header(raw) == header
ack_key_id = ed25519_key_id(ack_key.public_key())
keys = {ack_key_id: ack_key.public_key()}
ack = AckBody("edge-01", "0190f1e2", [[7, 7]], {"7": envelope_digest(raw)}, ack_key_id)
got = verify_cloud_message(sign_ack(ack, ack_key), verify_keys=keys, agent_id="edge-01")
rejection = RejectionBody("edge-01", "0190f1e2", 7, envelope_digest(raw), "invalid_schema",
                          "refused", ack_key_id)
no = verify_cloud_message(sign_rejection(rejection, ack_key), verify_keys=keys,
                          agent_id="edge-01")
print(json.dumps({
    "pydantic": sorted(m for m in sys.modules if m.split(".")[0] in ("pydantic", "pydantic_core")),
    "events": len(json.loads(plaintext)),
    "refused": refused,
    "acked": [list(r) for r in got.ranges],
    "rejected": [type(no).__name__, no.seq],
    "oee": ratios(parts).oee,
}))
"""


def test_the_agent_side_runs_without_pydantic() -> None:
    done = subprocess.run(
        [sys.executable, "-c", AGENT_SIDE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["pydantic"] == []
    assert report["events"] == 5
    assert [r.split(":")[0] for r in report["refused"]] == [
        "CountEvent.produced",
        "CountEvent.ts",
        "CountEvent.product",
    ]
    assert report["acked"] == [[7, 7]]
    assert report["rejected"] == ["RejectionBody", 7]
    assert report["oee"] == 0.75  # 45 s of ideal time of good parts in 60 s planned
