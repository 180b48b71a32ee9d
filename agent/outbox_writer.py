"""Writing the engine's events into the outbox: batching, the when-full policy and fill alarms.

`OutboxWriter.write(events, state)` commits events (OEE, state, count, agent events in
their own batches; raw samples in separate, sheddable batches) together with the engine
state write (agent/engine_store.py), or keeps them for the next attempt when the outbox is
full. With
`when_full: shed_samples` it first deletes stored raw-sample batches and drops raw samples
held in memory, and records exactly how many were dropped in a `data_shed` agent event that
travels to the cloud like any other event. Fill alarms (70 %, 90 %, full, back to normal) are
logged once per change and sent as `outbox_fill` agent events.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import structlog

from buffer.outbox import NewBatch, Outbox, OutboxFull, Sealer, StateWrite
from oee.events import AgentEvent, Event, SampleEvent

WhenFull = Literal["block", "shed_samples"]
FillLevel = Literal["ok", "warning", "critical", "full"]
WARNING_FILL = 0.70
CRITICAL_FILL = 0.90
# After shedding, stored raw samples are cut back to this share of the capacity, so the
# outbox does not shed again on every flush while the outage lasts.
SHED_TARGET_FILL = 0.85

log = structlog.get_logger("agent.outbox")


@dataclass
class WriteResult:
    seqs: list[int] = field(default_factory=list)
    held: list[Event] = field(default_factory=list)  # not written: the caller keeps them
    shed_events: int = 0
    committed: bool = False  # the events and the state write are on disk


def fill_level(fill: float, *, full: bool) -> FillLevel:
    if full or fill >= 1.0:
        return "full"
    if fill >= CRITICAL_FILL:
        return "critical"
    if fill >= WARNING_FILL:
        return "warning"
    return "ok"


class OutboxWriter:
    """Owns how events become outbox batches; used by the runtime's flush."""

    def __init__(
        self,
        outbox: Outbox,
        sealer_for: Callable[[list[Event]], Sealer],
        *,
        agent_id: str,
        site_id: str,
        batch_max_events: int,
        when_full: WhenFull = "block",
    ) -> None:
        self.outbox = outbox
        self.sealer_for = sealer_for
        self.agent_id = agent_id
        self.site_id = site_id
        self.batch_max_events = batch_max_events
        self.when_full = when_full
        self.level: FillLevel = "ok"
        self.shed_events_total = 0
        self._alarms: list[Event] = []  # fill alarms waiting for the next write
        self._log = log.bind(agent=agent_id, site=site_id)

    def _agent_event(self, at: datetime, code: str, message: str, data: dict[str, object]) -> Event:
        return AgentEvent(
            agent_id=self.agent_id,
            site_id=self.site_id,
            ts=at,
            code=code,
            message=message,
            data=data,
        )

    def _batches(self, events: list[Event]) -> list[NewBatch]:
        size = self.batch_max_events
        kept: list[Event] = [e for e in events if not isinstance(e, SampleEvent)]
        samples: list[Event] = [e for e in events if isinstance(e, SampleEvent)]
        out: list[NewBatch] = []
        for group, sheddable in ((kept, False), (samples, True)):
            for i in range(0, len(group), size):
                chunk = group[i : i + size]
                out.append(NewBatch(len(chunk), self.sealer_for(chunk), sheddable))
        return out

    def _append(self, events: list[Event], state: StateWrite | None) -> list[int]:
        return self.outbox.append(self._batches(events), state)

    def write(self, events: list[Event], state: StateWrite | None, now: datetime) -> WriteResult:
        """Commit `events` with `state`, or hold them (and maybe shed raw samples)."""
        result = WriteResult()
        self._alarm(now, full=False)
        pending = [*events, *self._alarms]
        self._alarms = []
        try:
            result.seqs = self._append(pending, state)
            result.committed = True
            return result
        except OutboxFull as exc:
            problem = str(exc)
        if self.when_full == "shed_samples":
            shed = self._shed(pending, now)
            if shed is not None:
                pending, result.shed_events = shed
                try:
                    result.seqs = self._append(pending, state)
                    result.committed = True
                    self._alarm(now, full=False)  # goes out with the next write
                    return result
                except OutboxFull as exc:
                    problem = str(exc)
        self._alarm(now, full=True)
        pending += self._alarms
        self._alarms = []
        self._log.warning("outbox full, holding events", error=problem, held=len(pending))
        result.held = pending
        return result

    def _shed(self, pending: list[Event], now: datetime) -> tuple[list[Event], int] | None:
        stats = self.outbox.stats()
        report = self.outbox.shed(
            max(1, stats.bytes - int(stats.capacity_bytes * SHED_TARGET_FILL))
        )
        in_memory = sum(1 for e in pending if isinstance(e, SampleEvent))
        if not report.seqs and not in_memory:
            return None
        kept = [e for e in pending if not isinstance(e, SampleEvent)]
        total = report.events + in_memory
        self.shed_events_total += total
        self._log.error(
            "outbox full: raw samples shed",
            stored_batches=len(report.seqs),
            stored_events=report.events,
            held_samples=in_memory,
        )
        loss = self._agent_event(
            now,
            "data_shed",
            f"outbox full: {total} raw sample event(s) dropped under when_full: shed_samples",
            {
                "kind": "sample",
                "events": total,
                "stored_events": report.events,
                "held_events": in_memory,
                "epoch": report.epoch,
                "seqs": report.seqs,
                "bytes": report.bytes,
            },
        )
        return [*kept, loss], total

    def _alarm(self, now: datetime, *, full: bool) -> None:
        """Queue an `outbox_fill` event when the fill level changes (logged once per change)."""
        # Checked at every write: the fill ratio alone first, the full stats (what the event
        # reports) only when the level may have changed.
        if fill_level(self.outbox.fill_ratio(), full=full) == self.level:
            return
        stats = self.outbox.stats()
        level = fill_level(stats.fill_ratio, full=full)
        if level == self.level:
            return
        previous, self.level = self.level, level
        data: dict[str, object] = {
            "level": level,
            "previous": previous,
            "fill": round(stats.fill_ratio, 4),
            "bytes": stats.bytes,
            "capacity_bytes": stats.capacity_bytes,
            "quota_bytes": stats.max_bytes,
            "disk_free_bytes": stats.disk_free_bytes,
            "min_free_bytes": stats.min_free_bytes,
            "policy": self.when_full,
        }
        if level == "ok":
            self._log.info("outbox fill back to normal", **data)
        else:
            self._log.warning("outbox fill alarm", **data)
        self._alarms.append(self._agent_event(now, "outbox_fill", f"outbox fill {level}", data))
