"""`cloud-api alerts`: run the alerts worker (rules of the cloud YAML applied at start)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from cloud_api.config import load_settings
from common.logs import configure_logging


def cmd_alerts(args: argparse.Namespace) -> int:
    from cloud_api.alerts.worker import AlertWorker
    from cloud_api.db import make_pool

    settings = load_settings(args.config)
    configure_logging(args.log_level)
    print(f"cloud-api: {settings.database.describe()}", file=sys.stderr)
    # Evaluation, the delivery loop and each receiver served at once hold a connection.
    size = settings.alerts.delivery.concurrency + 2
    database = settings.database.model_copy(update={"pool_max": max(size, 2)})
    pool = make_pool(database, name="alerts")
    worker = AlertWorker(
        pool,
        settings.alerts,
        origin=str(args.config or "environment"),
        # LISTEN needs a session of its own: behind PgBouncer, the direct URL.
        listen_url=settings.database.listen_url or settings.database.require_url(),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        worker.start()
        stop.wait()
    finally:
        worker.stop()
        pool.close()
    return 0


def register(sub: Any) -> None:
    """Add the `alerts` command to the `cloud-api` parser."""
    p = sub.add_parser(
        "alerts",
        help="run the alerts worker: evaluate rules, deliver notifications (several may run)",
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_alerts)
