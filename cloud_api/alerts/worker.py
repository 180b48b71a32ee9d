"""The alerts worker (`cloud-api alerts`): evaluates due rules and delivers notifications.

Two loops on threads of their own, each with its own database connections:
- evaluation: takes one due rule at a time (row lock, SKIP LOCKED) until none is due, then
  sleeps `poll`; several workers share the rules without evaluating one twice at once;
- listening (when given a listen URL): facts that changed (a stored batch, a verified
  refusal; 0034_alerts.sql notifies `gateway_alerts` with the site) make the rules of that
  site and of every site due at once, so a stop is seen within about a `poll`, not only at
  the rule's next timed evaluation;
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
        listen_url: str | None = None,
    ) -> None:
        self.pool = pool
        self.listen_url = listen_url
        self._due = threading.Event()
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
        loops = [(self._evaluate_loop, "alerts-evaluate"), (self._deliver_loop, "alerts-deliver")]
        if self.listen_url is not None:
            loops.append((self._listen_loop, "alerts-listen"))
        for target, name in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._due.set()
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
            self._due.wait(self.settings.poll)
            self._due.clear()

    def _listen_loop(self) -> None:
        """Make rules due when the facts of their site change (see the module docstring)."""
        assert self.listen_url is not None
        lost = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.listen_url, autocommit=True) as conn:
                    conn.execute("LISTEN gateway_alerts")
                    if lost:
                        log.info("alerts listener recovered")
                        lost = False
                    while not self._stop.is_set():
                        sites = {
                            n.payload
                            for n in conn.notifies(timeout=self.settings.poll, stop_after=10_000)
                        }
                        if sites:
                            store.make_due(conn, sites)
                            self._due.set()
            except psycopg.Error as exc:
                if not lost:
                    log.warning("alerts listener lost; rules run on their timer", error=str(exc))
                    lost = True
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
