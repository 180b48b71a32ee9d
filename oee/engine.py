"""The OEE engine: samples in, state/count/oee/agent events out, with the clock passed in.

Time is accounted piecewise: the state holds from one state sample to the next, every
stretch is cut at shift/break edges and at UTC bucket edges, and each piece is credited to
exactly one time class of one bucket. Counter increments are credited to the bucket and
product active when they were observed. The whole state is a JSON-able checkpoint.

Internally every instant and duration is an integer number of microseconds since the Unix
epoch: sums are exact (classes of time add up to the window to the microsecond, whatever
the order of additions) and the per-sample path avoids datetime arithmetic. Ideal times are
integers too (parts x ideal cycle time in microseconds). Seconds appear only in events.

Sample order: the engine trusts source timestamps. A sample older than the last accepted
sample of the same signal is stale and ignored (so feeding a stream twice, or a duplicate,
changes nothing); a sample newer than that but older than the time already accounted takes
effect at the accounted time (closed buckets are never revised on the edge; late data is
the cloud's business).

Scans: the samples of one equipment that share a source timestamp (one poll, one
subscription notification) are one snapshot. They are held until a sample with another
timestamp arrives, or until tick() passes their time (finish() and mark_unknown() apply them
at once), and then applied together in a fixed order (_RANK), so the result does not depend
on the order of the signals in the YAML. An open scan is part of the checkpoint.

Read API (health, metrics and replay read the engine only through it, and so should
plant-floor outputs): `EquipmentEngine.snapshot()` returns an `EquipmentSnapshot`, a
frozen copy of what the engine knows at that instant: the state, since when and why, the
product, the instant accounted up to (`cursor`), the last counter readings, the running
shift (name, start, components over its closed buckets and, `live`, with the open buckets
added; its A/P/Q/OEE from the closed buckets) and the shift of the last closed bucket
(`closed_shift`, what the cloud has so far), the open bucket and the last bucket closed
since the engine started, whether a stop waits for its end to be classified, and how many
samples were refused as stale or duplicate. `PlantEngine.snapshots()` returns them all by
equipment id. `EquipmentEngine.diagnose(sample)`, asked before `feed(sample)`, says what
feed() will do with a sample that is not simply applied at its own time: a `FeedDiagnostic`
("stale": older than the signal's last sample, ignored; "duplicate": the same value at the
same instant, ignored; "late": older than the time already taken, applied at that time) or
None. A snapshot costs a copy of the open buckets: ask for one per status read, not per
sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal, Protocol

from oee.bounds import clean_text, int_or_text, number_in_bounds
from oee.calendar import ShiftCalendar
from oee.components import (
    COMPONENT_FIELDS,
    INTEGER_FIELDS,
    Components,
    Ratios,
    performance_excess,
)
from oee.config import CounterSpec, EquipmentSpec
from oee.counters import MAX_COUNTER_DELTA, counter_delta
from oee.events import AgentEvent, Event, OeeEvent, StateEvent, count_event
from oee.quantities import COUNTER_SIGNALS, counter_effects

STOP_STATES = ("fault", "idle")
SIGNALS = ("state", "reason", "scrap_reason", "product", *COUNTER_SIGNALS)
_SIGNAL_SET = frozenset(SIGNALS)  # membership tests on the hot path
# The order in which the samples of one scan apply, whatever the order of the YAML. Counts
# first: the parts a reading counts were made since the previous reading, under the state and
# product in force then (the last part before a planned stop is in plan). Then the reason, so a
# stop's state change carries the reason set in the same scan; then the state; the product last.
# The scrap reason comes before the counts: a PLC sets why a part is scrap, then counts it.
_RANK = (
    {"scrap_reason": 0}
    | dict.fromkeys(COUNTER_SIGNALS, 1)
    | {"reason": 2, "state": 3, "product": 4}
)
_UNSORTED = max(_RANK.values()) + 1  # above every rank


def _rank_of(item: tuple[str, object]) -> int:
    return _RANK[item[0]]


_COUNTER_SET = frozenset(COUNTER_SIGNALS)
UNSPECIFIED = "unspecified"
CHECKPOINT_VERSION = 2

US = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SCALED = frozenset(COMPONENT_FIELDS) - frozenset(INTEGER_FIELDS)  # held in microseconds
_ts_memo: tuple[datetime | None, int] = (None, 0)


def to_us(t: datetime) -> int:
    """Exact microseconds since the epoch of an aware datetime."""
    global _ts_memo
    memo = _ts_memo
    # Samples polled together share one timestamp object: a one-entry memo saves the
    # datetime arithmetic for all but the first of them.
    if memo[0] is t:
        return memo[1]
    if t.tzinfo is None:
        raise ValueError(f"timestamp {t.isoformat()} has no UTC offset")
    d = t - _EPOCH
    us = (d.days * 86_400 + d.seconds) * US + d.microseconds
    _ts_memo = (t, us)
    return us


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


class SampleLike(Protocol):
    """What the engine reads from a sample (connectors' Sample satisfies it)."""

    @property
    def equipment_id(self) -> str: ...
    @property
    def signal(self) -> str: ...
    @property
    def value(self) -> object: ...
    @property
    def ts(self) -> datetime: ...
    @property
    def quality(self) -> str: ...


# -- read API -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BucketSnapshot:
    """One bucket as the engine holds it (open) or emitted it (closed)."""

    start: datetime
    end: datetime
    shift: str | None
    shift_start: datetime | None
    components: Components


@dataclass(frozen=True, slots=True)
class ShiftSnapshot:
    """The shift of the latest bucket accounted in a shift (see EquipmentSnapshot.shift)."""

    name: str
    start: datetime | None
    closed: Components  # the shift's closed buckets (what its OEE events carry so far)
    live: Components  # closed plus the shift's open buckets (a stop not yet judged: not yet)

    @property
    def ratios(self) -> Ratios:
        """A, P, Q and OEE over the closed buckets (the shift-to-date figure of the events)."""
        return self.closed.ratios()


SampleVerdict = Literal["stale", "duplicate", "late"]


@dataclass(frozen=True, slots=True)
class FeedDiagnostic:
    """What feed() does with a sample that is not simply applied at its own time.

    stale      older than the signal's latest sample (`last`): ignored
    duplicate  the same value of the signal at the same instant again: ignored
    late       older than the time already taken (`applied_at`): applied at that time
    """

    verdict: SampleVerdict
    equipment_id: str
    signal: str
    ts: datetime
    last: datetime | None = None
    applied_at: datetime | None = None

    @property
    def ignored(self) -> bool:
        return self.verdict != "late"


@dataclass(frozen=True, slots=True)
class EquipmentSnapshot:
    """A frozen copy of one equipment's engine state (EquipmentEngine.snapshot())."""

    equipment_id: str
    state: str
    state_since: datetime | None
    reason: str | None  # the reason register's meaning (set while running too)
    product: str | None
    cursor: datetime | None  # time is accounted up to here (None: not started)
    counters: Mapping[str, int]  # the last reading of each counter signal
    shift: ShiftSnapshot | None  # None before a bucket in a shift is accounted
    # The shift of the last bucket closed in a shift (what the cloud has of it so far); the
    # same as `shift` except from a shift's start until its first bucket closes.
    closed_shift: ShiftSnapshot | None
    open_bucket: BucketSnapshot | None  # the bucket time is being accounted in
    last_closed: BucketSnapshot | None  # the latest bucket closed since the engine started
    stop_pending: bool  # a stop goes on whose class (micro-stop or not) waits for its end
    refused: Mapping[str, int] = field(default_factory=dict)  # {"stale": n, "duplicate": n}

    @property
    def state_seconds(self) -> float | None:
        """Seconds in the current state up to the accounted time."""
        if self.state_since is None or self.cursor is None:
            return None
        return max(0.0, (self.cursor - self.state_since).total_seconds())


def parse_shift_key(key: str) -> tuple[str, datetime | None]:
    """The (shift name, shift start) of a shift key (`<name>@<start in microseconds>`)."""
    name, _, start = key.rpartition("@")
    if not name:
        return key, None
    try:
        return name, from_us(int(start))
    except ValueError:
        return name, None


def _shift_key(shift: str, shift_start: int | None) -> str:
    return f"{shift}@{shift_start}"


def _new_values() -> dict[str, int]:
    return dict.fromkeys(COMPONENT_FIELDS, 0)


def _nonzero(values: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in values.items() if v}


class _Bucket:
    """One bucket [start, end) of one equipment, with its components in integer units."""

    __slots__ = (
        "end",
        "parts",
        "pending",
        "reasons",
        "shift",
        "shift_end",
        "shift_start",
        "start",
        "stop_start",
        "values",
    )

    def __init__(
        self,
        start: int,
        end: int,
        shift: str | None,
        shift_start: int | None,
        shift_end: int | None,
    ) -> None:
        self.start = start
        self.end = end
        self.shift = shift
        self.shift_start = shift_start
        self.shift_end = shift_end
        self.values = _new_values()
        self.parts = 0  # counted by any counter: bounds every quantity of the bucket
        self.reasons: dict[str, int] = {}
        # Microseconds of the current, not yet judged stop, by (state, reason): the stop's
        # full length decides whether it is a micro-stop, so its time waits here until known.
        self.pending: dict[tuple[str, str], int] = {}
        # The current, not yet judged stop started here: it is counted here once judged.
        self.stop_start = False

    def dump(self) -> dict[str, Any]:
        # Compact: zero components and empty maps are left out (load restores them as zero),
        # so the stored state of a bucket grows with what happened in it, not with the model.
        out: dict[str, Any] = {
            "start": self.start,
            "end": self.end,
            "values": _nonzero(self.values),
        }
        if self.parts:
            out["parts"] = self.parts
        if self.shift is not None:
            out.update(shift=self.shift, shift_start=self.shift_start, shift_end=self.shift_end)
        if self.reasons:
            out["reasons"] = self.reasons
        if self.pending:
            out["pending"] = [[s, r, v] for (s, r), v in self.pending.items()]
        if self.stop_start:
            out["stop_start"] = True
        return out

    @classmethod
    def load(cls, data: dict[str, Any]) -> _Bucket:
        bucket = cls(
            int(data["start"]),
            int(data["end"]),
            data.get("shift"),
            data.get("shift_start"),
            data.get("shift_end"),
        )
        bucket.values.update({k: int(v) for k, v in data["values"].items()})
        bucket.reasons = {k: int(v) for k, v in data.get("reasons", {}).items()}
        bucket.parts = int(data.get("parts", 0))  # absent in checkpoints of earlier agents
        bucket.pending = {(s, r): int(v) for s, r, v in data.get("pending", [])}
        bucket.stop_start = bool(data.get("stop_start", False))
        return bucket

    def components(self) -> Components:
        return _components(self.values)

    def snapshot(self) -> BucketSnapshot:
        return BucketSnapshot(
            start=from_us(self.start),
            end=from_us(self.end),
            shift=self.shift,
            shift_start=None if self.shift_start is None else from_us(self.shift_start),
            components=self.components(),
        )


def _components(v: dict[str, int]) -> Components:
    values: dict[str, Any] = {
        name: v[name] / US if name in _SCALED else v[name] for name in COMPONENT_FIELDS
    }
    return Components(**values)


class EquipmentEngine:
    """OEE accounting of one piece of equipment.

    `count_events=False` (replay) skips the per-increment `count` and per-change `state`
    events, which only the live agent ships; the accounting is identical.
    """

    def __init__(
        self,
        spec: EquipmentSpec,
        calendar: ShiftCalendar,
        *,
        agent_id: str,
        site_id: str,
        bucket_seconds: int = 60,
        count_events: bool = True,
    ) -> None:
        if bucket_seconds <= 0 or 3600 % bucket_seconds:
            raise ValueError("bucket_seconds must divide an hour")
        self.spec = spec
        self.calendar = calendar
        self.agent_id = agent_id
        self.site_id = site_id
        self.bucket_seconds = bucket_seconds
        self.count_events = count_events
        self._bucket_us = bucket_seconds * US
        threshold = spec.micro_stop_threshold
        self._threshold_us = None if threshold is None else round(threshold * US)
        self._cycle_us: dict[str | None, int] = {}
        self.state = "unknown"
        self.state_since_us: int | None = None
        self.stop_judged = True
        # The current stop has been counted (or its bucket marked, until it is judged).
        self.stop_counted = False
        self.reason: str | None = None
        # The scrap reason in force (scrap_reason signal): scrap counted is attributed to it.
        self.scrap_reason: str | None = None
        self.product: str | None = None
        self.cursor_us: int | None = None
        self.counters: dict[str, int] = {}
        # signal -> (ts, raw values accepted at ts) of the latest accepted sample
        self.seen: dict[str, tuple[int, list[Any]]] = {}
        self.buckets: dict[int, _Bucket] = {}  # insertion order is time order
        self.shift_totals = _new_values()
        self.shift_key: str | None = None
        self._unmapped: str | None = None
        self._state_raw: object = None  # raw value behind self.state (a repeat changes nothing)
        self._stale: set[str] = set()
        self._refused = {"stale": 0, "duplicate": 0}  # since start: diagnostics, not state
        self._last_closed: BucketSnapshot | None = None
        self._effects = counter_effects(spec.counters)
        # counter -> the width its stored reading was taken at, where that is not the width
        # of its spec (the width changed since): the next reading is measured in it
        self._rebase: dict[str, int] = {}
        self._cur: _Bucket | None = None
        self._win: tuple[int, int, str | None, int | None, int | None] | None = None
        self._out: list[Event] = []
        # The open scan: samples sharing the timestamp _scan_ts, not applied yet.
        self._scan: list[tuple[str, object]] = []
        self._scan_ts: int | None = None
        self._scan_rank = 0  # the highest rank in the open scan, _UNSORTED when out of order

    @property
    def cursor(self) -> datetime | None:
        """The instant up to which time has been accounted."""
        return None if self.cursor_us is None else from_us(self.cursor_us)

    @property
    def state_since(self) -> datetime | None:
        return None if self.state_since_us is None else from_us(self.state_since_us)

    # -- read API (module docstring) ----------------------------------------------------

    def snapshot(self) -> EquipmentSnapshot:
        """A frozen copy of this equipment's state, shift and counters."""
        cursor = self.cursor_us
        open_bucket: _Bucket | None = None
        for bucket in self.buckets.values():  # time order: the latest, or the cursor's
            open_bucket = bucket
            if cursor is not None and bucket.start <= cursor < bucket.end:
                break
        return EquipmentSnapshot(
            equipment_id=self.spec.id,
            state=self.state,
            state_since=self.state_since,
            reason=self.reason,
            product=self.product,
            cursor=self.cursor,
            counters=MappingProxyType(dict(self.counters)),
            shift=self._shift_snapshot(self._running_shift_key()),
            closed_shift=self._shift_snapshot(self.shift_key),
            open_bucket=None if open_bucket is None else open_bucket.snapshot(),
            last_closed=self._last_closed,
            stop_pending=not self.stop_judged,
            refused=MappingProxyType(dict(self._refused)),
        )

    def _running_shift_key(self) -> str | None:
        # The running shift is the one of the latest bucket accounted in a shift; its closed
        # buckets are summed in shift_totals (under shift_key) as they close.
        latest: _Bucket | None = None
        for bucket in self.buckets.values():
            if bucket.shift is not None:
                latest = bucket
        if latest is None or latest.shift is None:
            return self.shift_key
        return _shift_key(latest.shift, latest.shift_start)

    def _shift_snapshot(self, key: str | None) -> ShiftSnapshot | None:
        if key is None:
            return None
        closed = self.shift_totals if key == self.shift_key else _new_values()
        live = dict(closed)
        for bucket in self.buckets.values():
            if bucket.shift is not None and _shift_key(bucket.shift, bucket.shift_start) == key:
                for name, value in bucket.values.items():
                    live[name] += value
        name, start = parse_shift_key(key)
        return ShiftSnapshot(name, start, _components(closed), _components(live))

    def sampled_at(self, signal: str) -> int | None:
        """The source time (microseconds) of the signal's latest sample taken, if any.

        A sample later than both this and `latest_us` is simply applied: callers that feed
        many samples ask `diagnose()` only when that cheap test fails.
        """
        seen = self.seen.get(signal)
        return None if seen is None else seen[0]

    def diagnose(self, sample: SampleLike) -> FeedDiagnostic | None:
        """What feed(sample) would do with it, when not simply applying it at its own time.

        Changes nothing; ask before feed(). See FeedDiagnostic.
        """
        signal = sample.signal
        ts = to_us(sample.ts)
        seen = self.seen.get(signal)
        if seen is not None:
            if ts < seen[0]:
                return FeedDiagnostic(
                    "stale", self.spec.id, signal, sample.ts, last=from_us(seen[0])
                )
            raw = sample.value if sample.quality == "good" else None
            if ts == seen[0] and raw in seen[1]:
                return FeedDiagnostic(
                    "duplicate", self.spec.id, signal, sample.ts, last=from_us(seen[0])
                )
        latest = self.latest_us
        if latest is not None and ts < latest:
            return FeedDiagnostic(
                "late", self.spec.id, signal, sample.ts, applied_at=from_us(latest)
            )
        return None

    # -- public interface -------------------------------------------------------------

    def start(self, at: datetime, *, announce: bool = False) -> list[Event]:
        """Begin accounting at `at` (state unknown until the first state sample).

        `announce`: also emit a state event `unknown` at `at`. The agent does so when it starts
        an equipment without saved state (first start, replaced outbox, discarded checkpoint):
        events of an earlier run may have reached the cloud, and the cloud's state timeline
        must not carry their last state across the loss into this run.
        """
        if self.cursor_us is None:
            t = to_us(at)
            self._start(t)
            if announce and self.count_events:
                self._state_event(self.state, t, raw=None, reason="started without saved state")
        return self._drain()

    def prime(self, sample: SampleLike) -> None:
        """Before accounting starts, learn state, reason, product and counter baselines.

        Replay feeds the samples before its window here, so the window starts with the
        machine's real state (and how long it has been in it) and counts only parts made
        inside the window.
        """
        if self.cursor_us is not None:
            raise RuntimeError("prime() is only possible before accounting starts")
        ts = to_us(sample.ts)
        raw = sample.value if sample.quality == "good" else None
        if not self._accept(sample.signal, ts, raw):
            return
        signal = sample.signal
        if signal == "state":
            new = self.map_state(raw)
            if new != self.state:
                self.state = new
                self.state_since_us = ts
                self.stop_judged = not (new in STOP_STATES and self._threshold_us is not None)
                self.stop_counted = False
        elif signal == "reason":
            if raw is not None:
                self.reason = self._map_reason(raw)
        elif signal == "scrap_reason":
            if raw is not None:
                self.scrap_reason = self._map_scrap_reason(raw)
        elif signal == "product":
            if raw is not None:
                self.product = self._map_product(raw)
        elif raw is not None and signal in self.spec.counters:
            counter = self.spec.counters[signal]
            with contextlib.suppress(TypeError, ValueError, OverflowError):  # feed() reports
                current = int(raw)  # type: ignore[call-overload]
                self.counters[signal] = counter_delta(counter, None, current).current

    def set_counter(self, signal: str, counter: CounterSpec) -> None:
        """Read `signal` as `counter` from now on (the PLC declared the counter's data type).

        A stored reading keeps the width it was taken at until the next reading, which is
        measured at that width (as it would have been) and stored at the new one.
        """
        old = self.spec.counters.get(signal)  # type: ignore[call-overload]
        if old is None or old == counter:
            return
        self.spec = replace(
            self.spec,
            counters={**self.spec.counters, signal: counter},  # type: ignore[dict-item]
        )
        if signal in self.counters:
            stored = self._rebase.pop(signal, old.width)
            if stored != counter.width:
                self._rebase[signal] = stored

    def feed(self, sample: SampleLike) -> list[Event]:
        """Take one sample (see the module docstring for scans and samples out of order).

        The sample joins the open scan when it has the scan's timestamp; otherwise the open
        scan is applied first, so the events of a scan come out with a later call.
        """
        signal = sample.signal
        if signal not in _SIGNAL_SET:
            raise ValueError(f"unknown signal {signal!r}")
        ts = to_us(sample.ts)
        value = sample.value
        raw = value if value is not None and sample.quality == "good" else None
        # This is the hot path (every poll of every signal): the common cases (a repeated
        # state, an unchanged or incremented counter) avoid any call that is not needed.
        seen = self.seen.get(signal)
        if seen is not None and ts <= seen[0]:
            if not self._accept(signal, ts, raw):  # stale or duplicate
                return self._drain()
        else:
            self._stale.discard(signal)
            self.seen[signal] = (ts, [raw])
        scan = self._scan
        if scan:
            if ts == self._scan_ts:
                # Another sample of the open scan (the common case: a poll's samples share
                # one timestamp); the order is only noted here, restored when it applies.
                rank = _RANK[signal]
                last = self._scan_rank
                if rank < last:
                    self._scan_rank = _UNSORTED
                elif rank > last:
                    self._scan_rank = rank
                scan.append((signal, raw))
                return []
            self._apply_scan(self._scan_ts)  # type: ignore[arg-type]
        scan.append((signal, raw))
        scan_ts = self._scan_ts
        if scan_ts is not None and ts < scan_ts:
            self._apply_scan(ts)  # late: applied alone, at the time already accounted
            self._scan_ts = None
        else:
            self._scan_ts = ts
            self._scan_rank = _RANK[signal]
        if self._out:
            return self._drain()
        return []

    @property
    def latest_us(self) -> int | None:
        """The latest instant accounted or sampled (the open scan's time, if later)."""
        cursor, scan = self.cursor_us, self._scan_ts
        if scan is None or not self._scan:
            return cursor
        return scan if cursor is None or scan > cursor else cursor

    def _apply_scan(self, ts: int) -> None:
        """Apply the samples of the open scan together at `ts`, in canonical order (_RANK)."""
        scan = self._scan
        if self._scan_rank == _UNSORTED:
            scan.sort(key=_rank_of)
        cursor = self.cursor_us
        if cursor is None:
            self._start(ts)
            cursor = ts
        if ts > cursor:
            self._accrue(ts)
            cursor = ts
        reason = self.reason
        for signal, raw in scan:
            if signal in _COUNTER_SET:
                if raw is not None:
                    self._on_counter(signal, raw, cursor)
            elif signal == "state":
                if raw is None or raw != self._state_raw:
                    self._state_raw = raw
                    self._on_state(raw, cursor)
            elif raw is not None:
                if signal == "reason":
                    self.reason = self._map_reason(raw)
                elif signal == "scrap_reason":
                    self.scrap_reason = self._map_scrap_reason(raw)
                else:
                    self._on_product(raw, cursor)
        if (
            self.reason != reason
            and self.state in STOP_STATES
            and self.state_since_us != cursor
            and self.count_events
        ):
            # The stop goes on with another reason: recorded as a change of the same state,
            # so the timeline splits where the Pareto's reason does.
            self._state_event(self.state, cursor, raw=self._state_number(self._state_raw))
        scan.clear()

    def _flush_scan(self, before: int | None = None) -> None:
        """Apply the open scan (only when it is older than `before`, if given)."""
        scan_ts = self._scan_ts
        if self._scan and scan_ts is not None and (before is None or scan_ts < before):
            self._apply_scan(scan_ts)

    def tick(self, now: datetime) -> list[Event]:
        """Account time up to `now` and close every finished bucket."""
        at = to_us(now)
        # A scan at `now` may still be incomplete (replay ticks at a sample's own time).
        self._flush_scan(before=at)
        if self.cursor_us is None:
            self._start(at)
        self._accrue(at)
        self._close_buckets(final=False)
        return self._drain()

    def finish(self, at: datetime, *, stop_end: datetime | None = None) -> list[Event]:
        """End of a replay window: close every bucket, the last one clipped at `at`.

        A stop still open is judged on its full length, ending at `stop_end` when the
        caller knows it (replay looks ahead in the file). When its end is not known, its
        length cannot be shown to be within the threshold, so it is not a micro-stop: any
        other choice would make the result depend on where the window was cut.
        """
        end = to_us(at)
        self._flush_scan()
        if self.cursor_us is None:
            self._start(end)
        self._accrue(end)
        if self.state in STOP_STATES and not self.stop_judged:
            if stop_end is None:
                self._judge_stop(end, open_ended=True)
            else:
                self._judge_stop(max(end, to_us(stop_end)))
        self._close_buckets(final=True)
        return self._drain()

    def mark_unknown(self, at: datetime, why: str) -> list[Event]:
        """From `at` on, the state is not known (communication lost, agent was down)."""
        t = to_us(at)
        self._flush_scan()
        if self.cursor_us is None:
            self._start(t)
        self._accrue(t)
        if self.state != "unknown":
            if self.cursor_us is None:  # set by _start above
                raise RuntimeError("the equipment has no cursor")
            self._change_state("unknown", max(t, self.cursor_us), raw=None, reason=why)
        return self._drain()

    def map_state(self, raw: object) -> str:
        """The state a raw PLC value stands for (None, bad quality or unmapped: unknown)."""
        if raw is None:
            return "unknown"
        return self.spec.state_map.get(self.spec.code(raw), "unknown")

    def checkpoint(self) -> dict[str, Any]:
        """The state as a JSON-able dict; compact: keys whose value is None, zero or empty
        are left out (restore() reads them as such)."""
        out = {
            "version": CHECKPOINT_VERSION,
            "state": self.state,
            "state_since": self.state_since_us,
            "stop_judged": self.stop_judged,
            "stop_counted": self.stop_counted or None,
            "reason": self.reason,
            "scrap_reason": self.scrap_reason,
            "product": self.product,
            "cursor": self.cursor_us,
            "counters": self.counters,
            "counter_widths": {
                k: self._rebase.get(k, self.spec.counters[k].width)
                for k in self.counters
                if k in self.spec.counters
            },
            "seen": {k: [ts, list(raws)] for k, (ts, raws) in self.seen.items()},
            "buckets": [b.dump() for b in self.buckets.values()],
            "shift_totals": _nonzero(self.shift_totals),
            "shift_key": self.shift_key,
            "unmapped": self._unmapped,
            # Taken but not applied yet (a scan whose time the clock has not passed): kept,
            # because `seen` already records these samples.
            "scan": [self._scan_ts, [list(item) for item in self._scan]] if self._scan else None,
        }
        return {k: v for k, v in out.items() if v is not None and v not in ({}, [])}

    def restore(self, data: dict[str, Any]) -> None:
        version = data.get("version")
        if version != CHECKPOINT_VERSION:
            raise ValueError(
                f"engine checkpoint version {version!r} is not {CHECKPOINT_VERSION}; "
                "it was written by an incompatible agent"
            )
        self.state = data["state"]
        self.state_since_us = data.get("state_since")
        self.stop_judged = bool(data["stop_judged"])
        # Absent in checkpoints of earlier agents, which counted no stops.
        self.stop_counted = bool(data.get("stop_counted", False))
        self.reason = data.get("reason")
        self.scrap_reason = data.get("scrap_reason")  # absent: none in force (or none kept)
        self.product = data.get("product")
        self.cursor_us = data.get("cursor")
        self.counters = {k: int(v) for k, v in data.get("counters", {}).items()}
        # Older checkpoints have no widths: their readings were taken at the configured ones.
        widths = data.get("counter_widths") or {}
        self._rebase = {
            k: int(w)
            for k, w in widths.items()
            if k in self.counters
            and k in self.spec.counters
            and int(w) != self.spec.counters[k].width
        }
        self.seen = {k: (int(ts), list(raws)) for k, (ts, raws) in data.get("seen", {}).items()}
        self.buckets = {}
        for raw_bucket in data.get("buckets", []):
            bucket = _Bucket.load(raw_bucket)
            # Under the key _bucket_at looks it up by: a bucket that began mid-bucket (where
            # accounting started) is keyed by its aligned start, else time accounted after
            # the restart would open a second, overlapping bucket.
            floor = bucket.start - bucket.start % self._bucket_us
            window = to_us(self.calendar.window_at(from_us(bucket.start)).start)
            self.buckets[max(floor, window)] = bucket
        self.shift_totals = _new_values()
        self.shift_totals.update({k: int(v) for k, v in data.get("shift_totals", {}).items()})
        self.shift_key = data.get("shift_key")
        self._unmapped = data.get("unmapped")
        scan = data.get("scan")  # absent in checkpoints of earlier agents
        self._scan_ts = None if scan is None else int(scan[0])
        self._scan = [] if scan is None else [(str(sig), raw) for sig, raw in scan[1]]
        if any(sig not in _SIGNAL_SET for sig, _ in self._scan):
            raise ValueError("the open scan names an unknown signal")
        self._scan_rank = _UNSORTED
        self._stale = set()
        self._state_raw = None
        self._cur = None
        self._win = None

    # -- sample order ---------------------------------------------------------------------

    def _accept(self, signal: str, ts: int, raw: object) -> bool:
        """False for a stale sample or an exact duplicate; records the accepted one."""
        seen = self.seen.get(signal)
        if seen is not None:
            if ts < seen[0]:
                self._refused["stale"] += 1
                if signal not in self._stale:
                    # Once per stale run: a source clock that jumped back would otherwise
                    # produce one event per sample.
                    self._stale.add(signal)
                    self._agent(
                        self.cursor_us if self.cursor_us is not None else ts,
                        "sample_stale",
                        f"{self.spec.id}: {signal} sample at {from_us(ts).isoformat()} is older "
                        f"than the last one ({from_us(seen[0]).isoformat()}); ignored",
                        {"signal": signal, "ts": from_us(ts).isoformat()},
                    )
                return False
            if ts == seen[0]:
                # All values already taken at this instant are remembered, not only the
                # last: a stream fed twice repeats every one of them.
                if raw in seen[1]:
                    self._refused["duplicate"] += 1
                    return False
                seen[1].append(raw)
                return True
        self._stale.discard(signal)
        self.seen[signal] = (ts, [raw])
        return True

    # -- time accounting ----------------------------------------------------------------

    def _start(self, at: int) -> None:
        self.cursor_us = at
        if self.state_since_us is None:
            self.state_since_us = at
        elif self.state in STOP_STATES and self.state_since_us < at:
            # A stop in progress when accounting starts (replay primed it) is counted where
            # its first second of planned busy time is: before `at` when it had one, so a
            # replay window counts exactly the stops whose first such second it holds.
            self.stop_counted = any(
                w.planned for w in self.calendar.windows(from_us(self.state_since_us), from_us(at))
            )

    def _bucket_at(self, t: int) -> _Bucket:
        """The bucket holding instant t (t >= the accounted time), created when first needed."""
        win = self._win
        if win is None or not (win[0] <= t < win[1]):
            w = self.calendar.window_at(from_us(t))
            win = (
                to_us(w.start),
                to_us(w.end),
                w.shift,
                None if w.shift_start is None else to_us(w.shift_start),
                None if w.shift_end is None else to_us(w.shift_end),
            )
            self._win = win
        floor = t - t % self._bucket_us
        key = max(floor, win[0])
        bucket = self.buckets.get(key)
        if bucket is None:
            # Starts at t, not at the aligned edge, when accounting begins mid-bucket.
            end = min(floor + self._bucket_us, win[1])
            bucket = _Bucket(max(key, t), end, win[2], win[3], win[4])
            self.buckets[key] = bucket
        self._cur = bucket
        return bucket

    def _accrue(self, until: int) -> None:
        t = self.cursor_us
        if t is None or until <= t:
            return
        bucket = self._cur
        while t < until:
            if bucket is None or not (bucket.start <= t < bucket.end):
                bucket = self._bucket_at(t)
            seg_end = bucket.end if bucket.end < until else until
            if seg_end <= t:  # only inconsistent calendar windows could cause this
                raise RuntimeError(f"{self.spec.id}: no progress accounting time at {t}")
            self._credit_time(bucket, seg_end - t)
            t = seg_end
        self.cursor_us = until
        threshold = self._threshold_us
        if (
            not self.stop_judged
            and threshold is not None
            and self.state_since_us is not None
            and until - self.state_since_us > threshold
        ):
            self._judge_stop(until)

    def _credit_time(self, bucket: _Bucket, us: int) -> None:
        v = bucket.values
        if bucket.shift is None:
            v["off_plan_s"] += us
            return
        state = self.state
        if state == "planned_stop":
            v["planned_down_s"] += us
            return
        v["planned_busy_s"] += us
        if state == "running":
            v["production_s"] += us
        elif state == "setup":
            v["setup_s"] += us
        elif state == "unknown":
            v["unknown_s"] += us
        else:
            if not self.stop_counted:
                self._count_stop(bucket)
            reason = self.reason or UNSPECIFIED
            if self.stop_judged:
                self._credit_downtime(bucket, state, reason, us, micro=False)
            else:
                key = (state, reason)
                bucket.pending[key] = bucket.pending.get(key, 0) + us

    def _count_stop(self, bucket: _Bucket) -> None:
        """Count the current stop in `bucket`, where it starts: a fault whose time is fault
        downtime is a failure (`fault_stops`); a stop still to be judged (micro-stop or
        not) marks the bucket, which stays open until it is judged (it holds pending time)."""
        self.stop_counted = True
        if not self.stop_judged:
            bucket.stop_start = True
        elif self.state == "fault":
            bucket.values["fault_stops"] += 1

    @staticmethod
    def _credit_downtime(bucket: _Bucket, state: str, reason: str, us: int, *, micro: bool) -> None:
        v = bucket.values
        v["downtime_s"] += us
        v["fault_s" if state == "fault" else "idle_s"] += us
        if micro:
            v["micro_stop_s"] += us
        bucket.reasons[reason] = bucket.reasons.get(reason, 0) + us

    def _judge_stop(self, end: int, *, open_ended: bool = False) -> None:
        """Move the pending time of the current stop to its class, on its full length."""
        if self.state_since_us is None:  # a stop has a start
            raise RuntimeError("the current state has no start")
        length = end - self.state_since_us
        threshold = self._threshold_us
        # Inclusive: a stop of exactly the threshold is a micro-stop.
        micro = threshold is not None and length <= threshold and not open_ended
        to_production = micro and self.spec.micro_stops == "performance"
        for bucket in self.buckets.values():
            if bucket.stop_start:
                bucket.stop_start = False
                if micro:
                    bucket.values["micro_stops"] += 1
                if self.state == "fault" and not to_production:
                    bucket.values["fault_stops"] += 1
            if not bucket.pending:
                continue
            for (state, reason), us in bucket.pending.items():
                if to_production:
                    bucket.values["production_s"] += us
                    bucket.values["micro_stop_s"] += us
                else:
                    self._credit_downtime(bucket, state, reason, us, micro=micro)
            bucket.pending.clear()
        self.stop_judged = True

    def _close_buckets(self, *, final: bool) -> None:
        cursor = self.cursor_us
        if cursor is None:  # buckets close only after the first sample
            raise RuntimeError("the equipment has no cursor")
        done: list[int] = []
        for key, bucket in self.buckets.items():
            if bucket.pending or (bucket.end > cursor and not final):
                break
            done.append(key)
        for key in done:
            bucket = self.buckets.pop(key)
            if bucket is self._cur:
                self._cur = None
            if final and bucket.end > cursor:
                bucket.end = max(cursor, bucket.start)
            self._emit_bucket(bucket)

    def _emit_bucket(self, bucket: _Bucket) -> None:
        v = bucket.values
        self._last_closed = bucket.snapshot()
        shift_start = None if bucket.shift_start is None else from_us(bucket.shift_start)
        end = from_us(bucket.end)
        self._out.append(
            OeeEvent(
                agent_id=self.agent_id,
                site_id=self.site_id,
                equipment_id=self.spec.id,
                ts=end,
                bucket_start=from_us(bucket.start),
                bucket_end=end,
                shift=bucket.shift,
                shift_start=shift_start,
                components=bucket.components(),
                downtime_by_reason={k: us / US for k, us in bucket.reasons.items()},
            )
        )
        if v["off_plan_produced"]:
            where = "a planned stop" if bucket.shift is not None else "a break or off shift"
            self._agent(
                bucket.end,
                "off_plan_production",
                f"{self.spec.id}: {v['off_plan_produced']} part(s) produced during {where} "
                f"({from_us(bucket.start).isoformat()} to {end.isoformat()}); "
                "not part of OEE",
                {
                    "produced": v["off_plan_produced"],
                    "bucket_start": from_us(bucket.start).isoformat(),
                    "bucket_end": end.isoformat(),
                    "shift": bucket.shift,
                },
            )
        if bucket.shift is None:
            return
        key = _shift_key(bucket.shift, bucket.shift_start)
        if key != self.shift_key:
            self.shift_totals = _new_values()
            self.shift_key = key
        totals = self.shift_totals
        for name in COMPONENT_FIELDS:
            totals[name] += v[name]
        if bucket.end == bucket.shift_end:
            self._check_shift(bucket, shift_start)

    def _check_shift(self, bucket: _Bucket, shift_start: datetime | None) -> None:
        totals = self.shift_totals
        excess = performance_excess(
            totals["ideal_produced_s"], totals["production_s"], totals["produced"], unit=US
        )
        if excess is None:
            return
        performance, suspected = excess.performance, excess.suspected_ideal_cycle_time_s
        self._agent(
            bucket.end,
            "performance_above_one",
            f"{self.spec.id}: performance {performance:.3f} > 1 in shift {bucket.shift}; "
            "the configured ideal cycle time is probably too long",
            {
                # A shift of microseconds with many parts can exceed what an event holds.
                "performance": performance if number_in_bounds(performance) else None,
                "shift": bucket.shift,
                "shift_start": None if shift_start is None else shift_start.isoformat(),
                "configured_ideal_cycle_time_s": self.spec.cycle_time(self.product),
                "suspected_ideal_cycle_time_s": suspected,
            },
        )

    # -- signals --------------------------------------------------------------------------

    def _map_reason(self, raw: object) -> str | None:
        code = self.spec.code(raw)
        if code in ("0", ""):
            return None  # PLCs write 0 for "no reason"
        mapped = self.spec.reason_map.get(code)
        if mapped is not None:
            return mapped
        # A PLC that writes its reasons as text needs no map; a number without one stays a
        # code, so the Pareto shows what it is.
        return code if isinstance(raw, str) else clean_text(f"code {code}")

    def _map_scrap_reason(self, raw: object) -> str | None:
        code = self.spec.code(raw)
        if code in ("0", ""):
            return None  # as for stop reasons: 0 is "no reason"
        mapped = self.spec.scrap_reason_map.get(code)
        if mapped is not None:
            return mapped
        return code if isinstance(raw, str) else clean_text(f"code {code}")

    def _map_product(self, raw: object) -> str | None:
        code = self.spec.code(raw)
        return self.spec.product_map.get(code, code or None)

    def _on_product(self, raw: object, at: int) -> None:
        product = self._map_product(raw)
        if product != self.product and product not in self.spec.products:
            self._agent(
                at,
                "unknown_product",
                f"{self.spec.id}: product {product!r} is not configured; "
                "the equipment's ideal cycle time applies",
                {"product": product},
            )
        self.product = product

    def _on_state(self, raw: object, at: int) -> None:
        new = self.map_state(raw)
        if raw is not None and new == "unknown":
            code = self.spec.code(raw)
            if code != self._unmapped:
                self._unmapped = code
                self._agent(
                    at,
                    "unmapped_state",
                    f"{self.spec.id}: state value {code} is not in the state map; "
                    "the state is unknown",
                    {"value": code},
                )
        else:
            self._unmapped = None
        if new != self.state:
            self._change_state(new, at, raw=self._state_number(raw), reason=None)

    @staticmethod
    def _state_number(raw: object) -> float | None:
        """The raw state value for the event, when it is a number the event can carry."""
        if isinstance(raw, int | float) and not isinstance(raw, bool) and number_in_bounds(raw):
            return raw
        return None

    def _change_state(self, new: str, at: int, *, raw: float | None, reason: str | None) -> None:
        previous = self.state
        if new == "unknown":
            self._state_raw = None  # after a loss, the same raw value means a change again
        if previous in STOP_STATES and not self.stop_judged:
            self._judge_stop(at)
        self.state = new
        self.state_since_us = at
        self.stop_judged = not (new in STOP_STATES and self._threshold_us is not None)
        self.stop_counted = False
        # A stop is counted with its state change when its bucket is open and planned (so
        # that counting costs no checkpoint write of its own), else where time first accrues
        # in planned busy time, which opens that bucket anyway (_credit_time).
        bucket = self._cur
        if (
            new in STOP_STATES
            and bucket is not None
            and bucket.start <= at < bucket.end
            and bucket.shift is not None
        ):
            self._count_stop(bucket)
        if self.count_events:
            self._state_event(previous, at, raw=raw, reason=reason)

    def _state_event(
        self, previous: str, at: int, *, raw: float | None, reason: str | None = None
    ) -> None:
        new = self.state
        self._out.append(
            StateEvent(
                agent_id=self.agent_id,
                site_id=self.site_id,
                equipment_id=self.spec.id,
                ts=from_us(at),
                state=new,  # type: ignore[arg-type]
                previous=previous,  # type: ignore[arg-type]
                # The PLC's reason register keeps its last value while running.
                reason=reason
                if reason is not None
                else (self.reason if new in STOP_STATES else None),
                raw=raw,
            )
        )

    def _cycle(self, product: str | None) -> int:
        cycle = self._cycle_us.get(product)
        if cycle is None:
            cycle = round(self.spec.cycle_time(product) * US)
            self._cycle_us[product] = cycle
        return cycle

    def _on_counter(self, signal: str, value: object, at: int) -> None:
        spec = self.spec.counters.get(signal)  # type: ignore[call-overload]
        if spec is None:
            return  # a counter this equipment does not use
        if type(value) is int:
            raw = value
        else:
            try:
                raw = int(value)  # type: ignore[call-overload]
            except (TypeError, ValueError, OverflowError):
                shown = clean_text(repr(value))
                self._agent(
                    at,
                    "counter_invalid",
                    f"{self.spec.id}: {signal} value {shown} is not an integer; ignored",
                    {"signal": signal, "value": shown},
                )
                return
        previous = self.counters.get(signal)
        if self._rebase and signal in self._rebase:
            width = self._rebase.pop(signal)
            d = self._counter_event(signal, replace(spec, width=width), previous, raw)
            self.counters[signal] = raw % (1 << spec.width)
        elif previous is not None:
            d = raw - previous
            if d == 0:
                return  # nothing counted since the last poll
            if d < 0 or raw >= 1 << spec.width or d > (spec.max_delta or MAX_COUNTER_DELTA):
                d = self._counter_event(signal, spec, previous, raw)
            else:
                self.counters[signal] = raw  # a plain increment, the common case
        else:
            d = self._counter_event(signal, spec, previous, raw)
        if d == 0:
            return
        bucket = self._cur
        if bucket is None or not (bucket.start <= at < bucket.end):
            bucket = self._bucket_at(at)
        parts = bucket.parts + d
        if parts > MAX_COUNTER_DELTA:
            # Many plausible jumps in one bucket add up to an implausible one; the bound
            # keeps every bucket and count event far inside the event model's bounds.
            self._report_counter(signal, "quarantined", previous, self.counters[signal], d)
            return
        bucket.parts = parts
        v = bucket.values
        produced, good, scrap, rework = self._effects[signal]
        produced *= d
        good *= d
        scrap *= d
        rework *= d
        # Planned busy time excludes breaks, off-shift time and planned stops: parts
        # observed there are reported apart and stay out of OEE.
        in_plan = bucket.shift is not None and self.state != "planned_stop"
        if not in_plan:
            v["off_plan_produced"] += produced
        else:
            cycle = self._cycle(self.product)
            v["produced"] += produced
            v["good"] += good
            v["scrap"] += scrap
            v["rework"] += rework
            v["ideal_produced_s"] += produced * cycle
            v["ideal_good_s"] += good * cycle
        if self.count_events:
            # The event carries exactly what the bucket received (oee.quantities).
            self._out.append(
                count_event(
                    agent_id=self.agent_id,
                    site_id=self.site_id,
                    equipment_id=self.spec.id,
                    ts=from_us(at),
                    product=self.product,
                    in_plan=in_plan,
                    produced=produced,
                    good=good,
                    scrap=scrap,
                    rework=rework,
                    scrap_reason=self.scrap_reason if scrap else None,
                )
            )

    def _counter_event(self, signal: str, spec: CounterSpec, previous: int | None, raw: int) -> int:
        """The general case of a counter reading (baseline, wrap, reset, quarantine)."""
        result = counter_delta(spec, previous, raw)
        self.counters[signal] = result.current
        if result.kind in ("reset", "quarantined", "wrap"):
            self._report_counter(signal, result.kind, result.previous, result.current, result.delta)
        return result.delta

    def _report_counter(
        self, signal: str, kind: str, previous: int | None, current: int, delta: int
    ) -> None:
        self._agent(
            self.cursor_us or 0,
            f"counter_{kind}",
            f"{self.spec.id}: {signal} {kind} {previous} -> {current}",
            {
                "signal": signal,
                "previous": None if previous is None else int_or_text(previous),
                "current": int_or_text(current),
                "delta": int_or_text(delta),
            },
        )

    def _agent(self, at: int, code: str, message: str, data: dict[str, Any]) -> None:
        self._out.append(
            AgentEvent(
                agent_id=self.agent_id,
                site_id=self.site_id,
                equipment_id=self.spec.id,
                ts=from_us(at),
                code=code,
                message=message,
                data=data,
            )
        )

    def _drain(self) -> list[Event]:
        if not self._out:
            return []
        out, self._out = self._out, []
        return out


class PlantEngine:
    """All equipment of one agent; routes samples and checkpoints them together."""

    def __init__(
        self,
        specs: list[EquipmentSpec],
        calendar: ShiftCalendar,
        *,
        agent_id: str,
        site_id: str,
        bucket_seconds: int = 60,
        count_events: bool = True,
    ) -> None:
        self.engines = {
            spec.id: EquipmentEngine(
                spec,
                calendar,
                agent_id=agent_id,
                site_id=site_id,
                bucket_seconds=bucket_seconds,
                count_events=count_events,
            )
            for spec in specs
        }

    def set_counter(self, equipment_id: str, signal: str, counter: CounterSpec) -> None:
        """See EquipmentEngine.set_counter."""
        self.engines[equipment_id].set_counter(signal, counter)

    def snapshots(self) -> dict[str, EquipmentSnapshot]:
        """Every equipment's snapshot by id (see the module docstring)."""
        return {eq: engine.snapshot() for eq, engine in self.engines.items()}

    def feed(self, sample: SampleLike) -> list[Event]:
        engine = self.engines.get(sample.equipment_id)
        if engine is None:
            raise KeyError(f"unknown equipment {sample.equipment_id!r}")
        return engine.feed(sample)

    def start(self, at: datetime) -> list[Event]:
        return [e for engine in self.engines.values() for e in engine.start(at)]

    def tick(self, now: datetime) -> list[Event]:
        return [e for engine in self.engines.values() for e in engine.tick(now)]

    def finish(self, at: datetime) -> list[Event]:
        return [e for engine in self.engines.values() for e in engine.finish(at)]

    def mark_unknown(self, at: datetime, why: str) -> list[Event]:
        return [e for engine in self.engines.values() for e in engine.mark_unknown(at, why)]

    def checkpoint(self) -> dict[str, Any]:
        return {eq: engine.checkpoint() for eq, engine in self.engines.items()}

    def restore(self, data: dict[str, Any]) -> dict[str, str]:
        """Restore each equipment's state; returns {equipment: problem} for those that could
        not be restored (they start afresh, so one bad entry never stops the agent)."""
        problems: dict[str, str] = {}
        for eq, state in data.items():
            engine = self.engines.get(eq)
            if engine is None:
                continue  # equipment no longer configured
            try:
                engine.restore(state)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self.engines[eq] = EquipmentEngine(
                    engine.spec,
                    engine.calendar,
                    agent_id=engine.agent_id,
                    site_id=engine.site_id,
                    bucket_seconds=engine.bucket_seconds,
                    count_events=engine.count_events,
                )
                problems[eq] = str(exc) or type(exc).__name__
        return problems
