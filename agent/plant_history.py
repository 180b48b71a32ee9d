"""A simulated plant history: deterministic PLC samples for every equipment of a configuration.

`make demo` seeds its database with it, through the agent's own engine and outbox
(`AgentRuntime.record`), so the dashboard opens on days of data. The samples are what the
agent would have read: raw state and reason codes (from the configuration's maps), cumulative
counters at the configured width (a 16-bit counter wraps), one reading a minute plus one at
every change. Within shifts the machines run, stop for faults and missing material with a
reason, and now and then change over when work resumes; they idle through breaks; a line
whose name ends in an even number is planned down at night. The same seed gives the same
history.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from agent.config import AgentConfig, EquipmentConfig
from connectors.sample import Sample

COUNTER_READ_S = 60.0
LAST_READ_BEFORE = timedelta(milliseconds=100)
# (reason name, share of unplanned stops, min minutes, max minutes, state)
STOPS: tuple[tuple[str, float, float, float, str], ...] = (
    ("jam", 0.35, 2.0, 9.0, "fault"),
    ("no material", 0.30, 3.0, 15.0, "idle"),
    ("hydraulics", 0.10, 10.0, 40.0, "fault"),
    ("quality check", 0.15, 4.0, 12.0, "idle"),
    ("tool change", 0.10, 5.0, 15.0, "fault"),
)
STOP_WEIGHTS = [stop[1] for stop in STOPS]
MEAN_RUN_MIN = 35.0
SETUP_CHANCE = 0.4  # share of shift starts with a changeover
SETUP_MIN = (12.0, 30.0)


@dataclass
class MachineCounters:
    """The raw counter registers at the end of the history (the live simulator goes on)."""

    total: int
    scrap: int


def _codes(mapping: dict[str, str] | None) -> dict[str, int]:
    """Name -> PLC code, from a configuration map (code -> name)."""
    return {name: int(code) for code, name in (mapping or {}).items()}


class _Machine:
    def __init__(self, eq: EquipmentConfig, seed: int, start: datetime) -> None:
        self.eq = eq
        self.rng = random.Random(zlib.crc32(eq.id.encode()) ^ seed)
        self.states = _codes(eq.signals["state"].map)
        reason = eq.signals.get("reason")
        self.reasons = _codes(reason.map if reason else None)
        self.width = eq.signals["total_count"].width or 32
        self.speed = self.rng.uniform(0.86, 0.96)
        self.scrap_rate = self.rng.uniform(0.01, 0.04)
        # A 16-bit counter starts close to its top, so the history shows it wrapping.
        top = 1 << self.width
        self.total = top - self.rng.randint(2_000, 6_000) if self.width == 16 else 0
        self.scrap = 0
        self.progress = 0.0
        self.samples: list[Sample] = []
        self.t = start
        line = eq.line or ""
        self.night_off = line[-1:].isdigit() and int(line[-1]) % 2 == 0

    def _sample(self, at: datetime, signal: str, value: int) -> None:
        self.samples.append(Sample(self.eq.id, signal, value, at))

    def _counters(self, at: datetime) -> None:
        self._sample(at, "total_count", self.total % (1 << self.width))
        if "scrap_count" in self.eq.signals:
            self._sample(at, "scrap_count", self.scrap % (1 << 32))

    def _produce(self, seconds: float) -> None:
        self.progress += seconds * self.speed / self.eq.ideal_cycle_time
        parts = int(self.progress)
        self.progress -= parts
        self.total += parts
        self.scrap += sum(1 for _ in range(parts) if self.rng.random() < self.scrap_rate)

    def hold(self, state: str, until: datetime, reason: str | None = None) -> None:
        """The machine is in `state` from self.t to `until`, read like a PLC would be."""
        if until <= self.t:
            return
        if self.reasons:
            self._sample(self.t, "reason", self.reasons.get(reason or "", 0))
        self._sample(self.t, "state", self.states[state])
        t = self.t
        while t < until:
            nxt = min(until, t + timedelta(seconds=COUNTER_READ_S))
            if state == "running":
                self._produce((nxt - t).total_seconds())
            t = nxt
            # The last reading is taken just before the change, while the parts made so far
            # still belong to this state (and to the shift, when a break follows).
            self._counters(t if t < until else until - LAST_READ_BEFORE)
        self.t = until

    def shift(self, end: datetime, name: str) -> None:
        if self.night_off and name == "night":
            # A line off for the night: planned where the PLC has a code for it, else idle.
            self.hold("planned_stop" if "planned_stop" in self.states else "idle", end)
            return
        if self.rng.random() < SETUP_CHANCE:
            minutes = self.rng.uniform(*SETUP_MIN)
            self.hold("setup", min(end, self.t + timedelta(minutes=minutes)), "tool change")
        while self.t < end:
            run = self.rng.expovariate(1 / MEAN_RUN_MIN)
            self.hold("running", min(end, self.t + timedelta(minutes=run)))
            if self.t >= end:
                break
            reason, _, lo, hi, state = self.rng.choices(STOPS, weights=STOP_WEIGHTS)[0]
            stop = timedelta(minutes=self.rng.uniform(lo, hi))
            self.hold(state, min(end, self.t + stop), reason)


def plant_history(
    config: AgentConfig, start: datetime, end: datetime, *, seed: int = 1
) -> tuple[list[Sample], dict[str, MachineCounters]]:
    """Samples of every equipment in [start, end) in time order, and the counters at `end`."""
    calendar = config.calendar()
    machines = [_Machine(eq, seed, start) for eq in config.equipment]
    for window in calendar.windows(start, end):
        for machine in machines:
            if window.shift is None:
                machine.hold("idle", window.end)
            else:
                machine.shift(window.end, window.shift)
    samples = [s for m in machines for s in m.samples]
    samples.sort(key=lambda s: s.ts)  # stable: a reason stays before its state
    return samples, {m.eq.id: MachineCounters(m.total, m.scrap) for m in machines}
