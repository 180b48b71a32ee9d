"""The alerts worker (`cloud-api alerts`): evaluates due rules and delivers notifications.

Two loops on threads of their own, each with its own database connections:
- evaluation: takes one due rule at a time (row lock, SKIP LOCKED) until none is due, then
  sleeps `poll`; several workers share the rules without evaluating one twice at once;
- delivery: finds receivers whose oldest pending notification is due and hands each to a
  bounded thread pool; one receiver is served by one thread of one worker at a time (an
  advisory lock), so a slow or failing receiver holds only its own thread and its own queue.

Database errors are logged and retried on the next round; nothing here ends the process
except `stop()`.
"""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
import structlog
from psycopg_pool import ConnectionPool, PoolTimeout

from cloud_api.alerts import store
from cloud_api.alerts.delivery import Sender
from cloud_api.alerts.settings import AlertsSettings

log = structlog.get_logger("cloud_api.alerts")


def worker_actor() -> str:
    """How this worker appears in the audit trail."""
    return f"alerts:{socket.gethostname()}:{os.getpid()}"


class AlertWorker:
    def __init__(
        self,
        pool: ConnectionPool,
        settings: AlertsSettings,
        *,
        actor: str | None = None,
        origin: str = "cloud.yaml",
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.actor = actor or worker_actor()
        self.origin = origin
        self.sender = Sender(settings)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._executor = ThreadPoolExecutor(
            max_workers=settings.delivery.concurrency, thread_name_prefix="alerts-delivery"
        )
        self._in_flight: dict[str, Future[Any]] = {}

    def start(self) -> None:
        with self.pool.connection() as conn:
            changed = store.sync_file_rules(conn, self.settings.rules, self.origin)
        log.info("alerts worker started", rules_changed=changed, actor=self.actor)
        for target, name in ((self._evaluate_loop, "alerts-evaluate"),
                             (self._deliver_loop, "alerts-deliver")):  # fmt: skip
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(30)
        self._executor.shutdown(wait=True)
        self.sender.close()

    def _evaluate_loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self.pool.connection() as conn:
                    while not self._stop.is_set():
                        outcome = store.evaluate_due_rule(
                            conn, every_s=self.settings.evaluate_every, actor=self.actor
                        )
                        if outcome is None:
                            break
                        if outcome.opened or outcome.resolved:
                            self._wake.set()
            except (psycopg.Error, PoolTimeout) as exc:
                log.warning("rule evaluation interrupted", error=type(exc).__name__)
            except Exception:
                log.exception("rule evaluation failed")
            self._stop.wait(self.settings.poll)

    def _deliver_loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self.pool.connection() as conn:
                    receivers = store.due_receivers(conn)
            except (psycopg.Error, PoolTimeout) as exc:
                log.warning("delivery round interrupted", error=type(exc).__name__)
                receivers = []
            for receiver in receivers:
                running = self._in_flight.get(receiver)
                if running is not None and not running.done():
                    continue
                self._in_flight[receiver] = self._executor.submit(self._drain, receiver)
            self._wake.wait(self.settings.poll)
            self._wake.clear()

    def _drain(self, receiver: str) -> None:
        """Send the receiver's due notifications in order until none is due (or it fails)."""
        try:
            with self.pool.connection() as conn:
                while not self._stop.is_set():
                    if not store.deliver_next(conn, receiver, self.sender, self.settings.delivery):
                        return
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("delivery interrupted", receiver=receiver, error=type(exc).__name__)
        except Exception:
            log.exception("delivery failed", receiver=receiver)
