"""What the alerts tests share: a local webhook receiver (http.server in a thread) that
checks every signature, and a press whose engine runs on the wall clock, so that its state
events are as recent as a live agent's."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cloud_api.alerts import signature
from common.checks import validated
from connectors.sample import Sample
from oee.calendar import ShiftCalendar
from oee.config import ShiftSpec
from oee.engine import PlantEngine
from oee.events import Event
from tests.cloud_api.ingestion import Agent, press_spec

SECRET = "test-webhook-secret-0123456789"


@dataclass
class Received:
    at: float  # time.time() on arrival
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class WebhookReceiver:
    """An HTTP receiver on 127.0.0.1:`port`; `down()` closes its socket (connections are
    refused), `up()` listens again on the same port. Every request's signature is verified
    with `secret`; one that fails is answered 401 and recorded in `bad`."""

    port: int
    secret: bytes = SECRET.encode()
    got: list[Received] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    signature.verify(
                        owner.secret,
                        raw,
                        headers.get(signature.TIMESTAMP_HEADER.lower(), ""),
                        headers.get(signature.SIGNATURE_HEADER.lower(), ""),
                    )
                except signature.SignatureError as exc:
                    with owner._lock:
                        owner.bad.append(str(exc))
                    self.send_response(401)
                    self.end_headers()
                    return
                with owner._lock:
                    owner.got.append(Received(time.time(), headers, json.loads(raw)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def messages(self) -> list[Received]:
        with self._lock:
            return list(self.got)

    def events(self) -> list[tuple[str, int]]:
        """(event, alert id) of each notification, in arrival order."""
        return [(m.body["event"], m.body["alert"]["id"]) for m in self.messages()]


def wait_for(predicate: Callable[[], bool], what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class LivePress:
    """Presses of one agent, their engine on the wall clock: `set_state` feeds a state sample
    stamped now and ships what the engine emitted (state events, closed buckets) as a batch."""

    def __init__(self, agent: Agent, equipment: list[str]) -> None:
        self.agent = agent
        calendar = ShiftCalendar(
            [validated(ShiftSpec, name="all-day", start="00:00", end="00:00")], "UTC"
        )  # type: ignore[arg-type]
        self.plant = PlantEngine(
            [press_spec(e) for e in equipment],
            calendar,
            agent_id=agent.agent_id,
            site_id=agent.site_id,
            bucket_seconds=60,
        )
        self.equipment = equipment
        self.started = self.now()
        self.agent.send(self.plant.start(self.started))

    @staticmethod
    def now() -> datetime:
        return datetime.now(UTC)

    def set_state(self, state: int, reason: int = 0, *, only: list[str] | None = None) -> datetime:
        """Every press (or those in `only`) enters `state` now; returns the samples' time."""
        at = self.now()
        self.agent.send(self.feed(state, reason, only=only, at=at))
        return at

    def feed(
        self,
        state: int,
        reason: int = 0,
        *,
        only: list[str] | None = None,
        at: datetime | None = None,
    ) -> list[Event]:
        """What the engine emits when the presses enter `state` at `at` (now), unsent."""
        at = at or self.now()
        events: list[Event] = []
        for eq in only or self.equipment:
            events += self.plant.feed(Sample(eq, "reason", reason, at))
            events += self.plant.feed(Sample(eq, "state", state, at))
        # The scan at `at` applies once time moves past it, as on the agent's next tick.
        return events + self.plant.tick(at + timedelta(microseconds=1))

    def finish(self) -> None:
        """Close every bucket now (the agent stops) and ship them."""
        self.agent.send(self.plant.finish(self.now()))
