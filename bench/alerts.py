"""Benchmark: from a machine stop to the webhook, and from its restart to the resolution.

A press's engine runs on the wall clock; each run it stops (fault) and, once the opened
notification has arrived, runs again. Its events are sealed and stored by the real ingest
path (BatchStore.process, without the MQTT hop, which bench.e2e measures), an `AlertWorker`
evaluates a `machine_stopped` rule (`for`, default 0s) and a local HTTP receiver verifies
each signature and notes its arrival. Latency = arrival - the state event's timestamp (the
agent's clock, here the same host); `beyond_threshold` subtracts the rule's `for`. Each stop
and restart comes after a random pause of up to `evaluate_every`, so that they fall at random
phases of the evaluation cycle.

The worker listens for stored batches as `cloud-api alerts` does (`--no-listen`: the timer
alone). Listening, a stop with `for: 0s` is evaluated within about a `poll` of its batch's
commit. On the timer alone the wait for the rule's next evaluation dominates (on average half
of `evaluate_every`); with a `for` longer than `evaluate_every`, an evaluation that sees the
stop schedules the next one for the moment the threshold is crossed, and the notification
follows that moment by about one `poll`.
Uses the machine's PostgreSQL (a fresh database, dropped afterwards).
Run: `python -m bench.alerts [--runs 10] [--evaluate-every 15s] [--poll 1s] [--for 0s]
[--no-listen]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg import sql

from cloud_api.alerts.settings import AlertsSettings
from cloud_api.alerts.worker import AlertWorker
from cloud_api.config import DatabaseSettings
from cloud_api.db import make_pool, migrate
from sync.keys import CloudKeyring, generate_cloud_ack_key, generate_cloud_hpke_key
from tests.cloud_api.alerting import SECRET, LivePress, WebhookReceiver, wait_for
from tests.cloud_api.ingestion import enrolled_agent
from tests.conftest import free_port

PG = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
RUNNING, FAULT = 1, 2


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_s": round(statistics.median(ordered), 3),
        "p95_s": round(ordered[max(0, round(0.95 * len(ordered)) - 1)], 3),
        "max_s": round(ordered[-1], 3),
        "min_s": round(ordered[0], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.alerts", description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--evaluate-every", default="15s")
    parser.add_argument("--poll", default="1s")
    parser.add_argument("--for", dest="for_", default="0s", help="the rule's threshold")
    parser.add_argument("--no-listen", action="store_true", help="evaluate on the timer only")
    args = parser.parse_args(argv)

    os.environ["BENCH_ALERTS_SECRET"] = SECRET
    db = f"bench_alerts_{secrets.token_hex(4)}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    url = f"{PG}/{db}"
    hook = WebhookReceiver(free_port())
    hook.up()
    try:
        migrate(url)
        with tempfile.TemporaryDirectory() as tmp:
            keys = Path(tmp) / "cloud"
            generate_cloud_hpke_key(keys)
            generate_cloud_ack_key(keys)
            ring = CloudKeyring.load(keys)
            settings = AlertsSettings.model_validate(
                {
                    "evaluate_every": args.evaluate_every,
                    "poll": args.poll,
                    "receivers": {
                        "ops": {"type": "webhook", "url": hook.url,
                                "secret_env": "BENCH_ALERTS_SECRET"},
                    },
                    "rules": [{"name": "stop", "kind": "machine_stopped", "for": args.for_,
                               "receivers": ["ops"]}],
                }
            )  # fmt: skip
            pool = make_pool(DatabaseSettings(url=url, pool_min=1, pool_max=4), name="ingest")
            worker_pool = make_pool(DatabaseSettings(url=url, pool_min=1, pool_max=12), name="a")
            agent = enrolled_agent(
                url, pool, ring, Path(tmp) / "agent", agent_id="edge-bench", site_id="bench"
            )
            press = LivePress(agent, ["press-1"])
            press.set_state(RUNNING)
            worker = AlertWorker(
                worker_pool, settings, actor="bench", listen_url=None if args.no_listen else url
            )
            worker.start()
            opened: list[float] = []
            resolved: list[float] = []
            try:
                for run in range(1, args.runs + 1):
                    time.sleep(random.uniform(0, settings.evaluate_every))
                    stopped = press.set_state(FAULT, 1).timestamp()
                    wait_for(lambda run=run: len(hook.messages()) >= 2 * run - 1, "opened", 120)
                    opened.append(hook.messages()[-1].at - stopped)
                    time.sleep(random.uniform(0, settings.evaluate_every))
                    restarted = press.set_state(RUNNING).timestamp()
                    wait_for(lambda run=run: len(hook.messages()) >= 2 * run, "resolved", 120)
                    resolved.append(hook.messages()[-1].at - restarted)
                    print(
                        json.dumps({"run": run, "opened_s": round(opened[-1], 3),
                                    "resolved_s": round(resolved[-1], 3)}),
                        flush=True,
                    )  # fmt: skip
            finally:
                worker.stop()
                worker_pool.close()
                pool.close()
            assert not hook.bad, hook.bad
            events = [m.body["event"] for m in hook.messages()]
            assert events == ["opened", "resolved"] * args.runs, events
    finally:
        hook.down()
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
            )
    threshold = settings.rules[0].for_ or 0.0
    result = {
        "bench": "alerts",
        "runs": args.runs,
        "evaluate_every": args.evaluate_every,
        "poll": args.poll,
        "listen": not args.no_listen,
        "for_s": threshold,
        "stop_to_webhook": summary(opened),
        "beyond_threshold": summary([v - threshold for v in opened]),
        "restart_to_resolution": summary(resolved),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
