"""The OEE engine: samples in, state/count/oee/agent events out, with the clock passed in.

Time is accounted piecewise: the state holds from one state sample to the next, every
stretch is cut at shift/break edges and at UTC bucket edges, and each piece is credited to
exactly one time class of one bucket. Counter increments are credited to the bucket and
product active when they were observed. The whole state is a JSON-able checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from oee.calendar import ShiftCalendar, Window
from oee.components import COMPONENT_FIELDS, QUANTITY_FIELDS, Components
from oee.config import EquipmentSpec
from oee.counters import counter_delta
from oee.events import AgentEvent, CountEvent, Event, OeeEvent, StateEvent

STOP_STATES = ("fault", "idle")
COUNTER_SIGNALS = ("total_count", "good_count", "scrap_count", "rework_count")
SIGNALS = ("state", "reason", "product", *COUNTER_SIGNALS)
UNSPECIFIED = "unspecified"


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


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _parse(t: str | None) -> datetime | None:
    return None if t is None else datetime.fromisoformat(t)


@dataclass
class _Bucket:
    start: datetime
    end: datetime
    shift: str | None
    shift_start: datetime | None
    shift_end: datetime | None
    values: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COMPONENT_FIELDS, 0.0))
    reasons: dict[str, float] = field(default_factory=dict)
    # Seconds of the current, not yet judged stop, by (state, reason): the stop's full length
    # decides whether it is a micro-stop, so its time waits here until it is known.
    pending: dict[tuple[str, str], float] = field(default_factory=dict)

    def dump(self) -> dict[str, Any]:
        return {
            "start": _iso(self.start),
            "end": _iso(self.end),
            "shift": self.shift,
            "shift_start": _iso(self.shift_start),
            "shift_end": _iso(self.shift_end),
            "values": self.values,
            "reasons": self.reasons,
            "pending": [[s, r, v] for (s, r), v in self.pending.items()],
        }

    @classmethod
    def load(cls, data: dict[str, Any]) -> _Bucket:
        start, end = _parse(data["start"]), _parse(data["end"])
        assert start is not None and end is not None
        bucket = cls(
            start,
            end,
            data["shift"],
            _parse(data["shift_start"]),
            _parse(data["shift_end"]),
        )
        bucket.values.update({k: float(v) for k, v in data["values"].items()})
        bucket.reasons = {k: float(v) for k, v in data["reasons"].items()}
        bucket.pending = {(s, r): float(v) for s, r, v in data["pending"]}
        return bucket

    def components(self) -> Components:
        return Components.model_validate(
            {
                name: round(self.values[name])
                if name in QUANTITY_FIELDS
                else round(self.values[name], 6)
                for name in COMPONENT_FIELDS
            }
        )


class EquipmentEngine:
    """OEE accounting of one piece of equipment."""

    def __init__(
        self,
        spec: EquipmentSpec,
        calendar: ShiftCalendar,
        *,
        agent_id: str,
        site_id: str,
        bucket_seconds: int = 60,
    ) -> None:
        if bucket_seconds <= 0 or 3600 % bucket_seconds:
            raise ValueError("bucket_seconds must divide an hour")
        self.spec = spec
        self.calendar = calendar
        self.agent_id = agent_id
        self.site_id = site_id
        self.bucket_seconds = bucket_seconds
        self.state = "unknown"
        self.state_since: datetime | None = None
        self.stop_judged = True
        self.reason: str | None = None
        self.product: str | None = None
        self.cursor: datetime | None = None
        self.counters: dict[str, int] = {}
        self.buckets: dict[datetime, _Bucket] = {}
        self.shift_totals: dict[str, float] = dict.fromkeys(COMPONENT_FIELDS, 0.0)
        self.shift_key: str | None = None
        self._window: Window | None = None
        self._out: list[Event] = []

    # -- public interface -------------------------------------------------------------

    def start(self, at: datetime) -> list[Event]:
        """Begin accounting at `at` (state unknown until the first state sample)."""
        if self.cursor is None:
            self.cursor = at
            self.state_since = at
        return self._drain()

    def feed(self, sample: SampleLike) -> list[Event]:
        """Apply one sample; a sample older than the accounted time takes effect now."""
        ts = sample.ts.astimezone(UTC)
        if self.cursor is None:
            self.start(ts)
        assert self.cursor is not None
        self._accrue(ts)
        at = max(ts, self.cursor)
        good = sample.quality == "good" and sample.value is not None
        signal = sample.signal
        if signal == "state":
            self._on_state(sample.value if good else None, at)
        elif signal == "reason":
            if good:
                code = self.spec.code(sample.value)
                self.reason = (
                    None if code in ("0", "") else self.spec.reason_map.get(code, f"code {code}")
                )
        elif signal == "product":
            if good:
                code = self.spec.code(sample.value)
                product = self.spec.product_map.get(code, code if code else None)
                if product is not None and product not in self.spec.products:
                    self._agent(
                        at,
                        "unknown_product",
                        f"product code {code} is not configured; "
                        "the default ideal cycle time applies",
                        {"code": code},
                    )
                self.product = product
        elif signal in COUNTER_SIGNALS:
            if good:
                self._on_counter(signal, sample.value, at)
        else:
            raise ValueError(f"unknown signal {signal!r}")
        return self._drain()

    def tick(self, now: datetime) -> list[Event]:
        """Account time up to `now` and close every finished bucket."""
        now = now.astimezone(UTC)
        if self.cursor is None:
            self.start(now)
        self._accrue(now)
        self._close_buckets(final=False)
        return self._drain()

    def finish(self, at: datetime) -> list[Event]:
        """End of a replay window: judge an open stop on its length so far, close all."""
        self._accrue(at.astimezone(UTC))
        if self.state in STOP_STATES and not self.stop_judged:
            self._judge_stop(at)
        self._close_buckets(final=True)
        return self._drain()

    def mark_unknown(self, at: datetime, why: str) -> list[Event]:
        """From `at` on, the state is not known (communication lost, agent was down)."""
        at = at.astimezone(UTC)
        if self.cursor is None:
            self.start(at)
        self._accrue(at)
        if self.state != "unknown":
            self._change_state("unknown", max(at, self.cursor or at), raw=None, reason=why)
        return self._drain()

    def checkpoint(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "state_since": _iso(self.state_since),
            "stop_judged": self.stop_judged,
            "reason": self.reason,
            "product": self.product,
            "cursor": _iso(self.cursor),
            "counters": self.counters,
            "buckets": [b.dump() for b in self.buckets.values()],
            "shift_totals": self.shift_totals,
            "shift_key": self.shift_key,
        }

    def restore(self, data: dict[str, Any]) -> None:
        self.state = data["state"]
        self.state_since = _parse(data["state_since"])
        self.stop_judged = bool(data["stop_judged"])
        self.reason = data["reason"]
        self.product = data["product"]
        self.cursor = _parse(data["cursor"])
        self.counters = {k: int(v) for k, v in data["counters"].items()}
        self.buckets = {}
        for raw in data["buckets"]:
            bucket = _Bucket.load(raw)
            self.buckets[bucket.start] = bucket
        self.shift_totals = {k: float(v) for k, v in data["shift_totals"].items()}
        self.shift_key = data["shift_key"]
        self._window = None

    # -- time accounting ----------------------------------------------------------------

    def _window_at(self, t: datetime) -> Window:
        w = self._window
        if w is None or not (w.start <= t < w.end):
            w = self.calendar.window_at(t)
            self._window = w
        return w

    def _bucket_at(self, t: datetime) -> _Bucket:
        w = self._window_at(t)
        epoch = int(t.timestamp())
        floor = datetime.fromtimestamp(epoch - epoch % self.bucket_seconds, UTC)
        start = max(floor, w.start)
        bucket = self.buckets.get(start)
        if bucket is None:
            end = min(floor + timedelta(seconds=self.bucket_seconds), w.end)
            bucket = _Bucket(start, end, w.shift, w.shift_start, w.shift_end)
            self.buckets[start] = bucket
        return bucket

    def _accrue(self, until: datetime) -> None:
        if self.cursor is None or until <= self.cursor:
            return
        t = self.cursor
        while t < until:
            bucket = self._bucket_at(t)
            seg_end = min(bucket.end, until)
            self._credit_time(bucket, (seg_end - t).total_seconds())
            t = seg_end
        self.cursor = until
        if (
            self.state in STOP_STATES
            and not self.stop_judged
            and self.state_since is not None
            and self.spec.micro_stop_threshold is not None
            and (until - self.state_since).total_seconds() > self.spec.micro_stop_threshold
        ):
            self._judge_stop(until)

    def _credit_time(self, bucket: _Bucket, seconds: float) -> None:
        v = bucket.values
        if bucket.shift is None:
            v["off_plan_s"] += seconds
            return
        state = self.state
        if state == "planned_stop":
            v["planned_down_s"] += seconds
            return
        v["planned_busy_s"] += seconds
        if state == "running":
            v["production_s"] += seconds
        elif state == "setup":
            v["setup_s"] += seconds
        elif state == "unknown":
            v["unknown_s"] += seconds
        else:
            reason = self.reason or UNSPECIFIED
            if self.stop_judged:
                self._credit_downtime(bucket, state, reason, seconds, micro=False)
            else:
                key = (state, reason)
                bucket.pending[key] = bucket.pending.get(key, 0.0) + seconds

    @staticmethod
    def _credit_downtime(
        bucket: _Bucket, state: str, reason: str, seconds: float, *, micro: bool
    ) -> None:
        v = bucket.values
        v["downtime_s"] += seconds
        v["fault_s" if state == "fault" else "idle_s"] += seconds
        if micro:
            v["micro_stop_s"] += seconds
        bucket.reasons[reason] = bucket.reasons.get(reason, 0.0) + seconds

    def _judge_stop(self, end: datetime) -> None:
        """Move the pending seconds of the current stop to their class, on its full length."""
        assert self.state_since is not None
        length = (end - self.state_since).total_seconds()
        threshold = self.spec.micro_stop_threshold
        micro = threshold is not None and length <= threshold
        for bucket in self.buckets.values():
            for (state, reason), seconds in bucket.pending.items():
                if micro and self.spec.micro_stops == "performance":
                    bucket.values["production_s"] += seconds
                    bucket.values["micro_stop_s"] += seconds
                else:
                    self._credit_downtime(bucket, state, reason, seconds, micro=micro)
            bucket.pending.clear()
        self.stop_judged = True

    def _close_buckets(self, *, final: bool) -> None:
        assert self.cursor is not None
        for start in sorted(self.buckets):
            bucket = self.buckets[start]
            if bucket.pending or (bucket.end > self.cursor and not final):
                break
            del self.buckets[start]
            self._emit_bucket(bucket)

    def _emit_bucket(self, bucket: _Bucket) -> None:
        components = bucket.components()
        self._out.append(
            OeeEvent(
                agent_id=self.agent_id,
                site_id=self.site_id,
                equipment_id=self.spec.id,
                ts=bucket.end,
                bucket_start=bucket.start,
                bucket_end=bucket.end,
                shift=bucket.shift,
                shift_start=bucket.shift_start,
                components=components,
                downtime_by_reason={k: round(v, 6) for k, v in bucket.reasons.items()},
            )
        )
        if bucket.shift is None:
            return
        key = f"{bucket.shift}@{_iso(bucket.shift_start)}"
        if key != self.shift_key:
            self.shift_totals = dict.fromkeys(COMPONENT_FIELDS, 0.0)
            self.shift_key = key
        for name in COMPONENT_FIELDS:
            self.shift_totals[name] += bucket.values[name]
        if bucket.end == bucket.shift_end:
            self._check_shift(bucket)

    def _check_shift(self, bucket: _Bucket) -> None:
        totals = self.shift_totals
        production = totals["production_s"]
        if production <= 0:
            return
        performance = totals["ideal_produced_s"] / production
        if performance > 1.0:
            produced = totals["produced"]
            suspected = production / produced if produced else None
            self._agent(
                bucket.end,
                "performance_above_one",
                f"{self.spec.id}: performance {performance:.3f} > 1 in shift {bucket.shift}; "
                "the configured ideal cycle time is probably too long",
                {
                    "performance": performance,
                    "shift": bucket.shift,
                    "shift_start": _iso(bucket.shift_start),
                    "configured_ideal_cycle_time_s": self.spec.cycle_time(self.product),
                    "suspected_ideal_cycle_time_s": suspected,
                },
            )

    # -- signals --------------------------------------------------------------------------

    def _on_state(self, value: object, at: datetime) -> None:
        if value is None:
            new, raw = "unknown", None
        else:
            code = self.spec.code(value)
            mapped = self.spec.state_map.get(code)
            if mapped is None:
                self._agent(
                    at,
                    "unmapped_state",
                    f"{self.spec.id}: state value {code} is not "
                    "in the state map; the state is unknown",
                    {"value": code},
                )
                new = "unknown"
            else:
                new = mapped
            raw = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if new != self.state:
            self._change_state(new, at, raw=raw, reason=None)

    def _change_state(
        self, new: str, at: datetime, *, raw: float | None, reason: str | None
    ) -> None:
        previous = self.state
        if previous in STOP_STATES and not self.stop_judged:
            self._judge_stop(at)
        self.state = new
        self.state_since = at
        self.stop_judged = not (new in STOP_STATES and self.spec.micro_stop_threshold is not None)
        self._out.append(
            StateEvent(
                agent_id=self.agent_id,
                site_id=self.site_id,
                equipment_id=self.spec.id,
                ts=at,
                state=new,  # type: ignore[arg-type]
                previous=previous,  # type: ignore[arg-type]
                reason=reason if reason is not None else self.reason,
                raw=raw,
            )
        )

    def _on_counter(self, signal: str, value: object, at: datetime) -> None:
        spec = self.spec.counters.get(signal)  # type: ignore[call-overload]
        if spec is None:
            return
        try:
            raw = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            self._agent(
                at,
                "counter_invalid",
                f"{self.spec.id}: {signal} value {value!r} is not an integer; ignored",
                {"signal": signal, "value": repr(value)},
            )
            return
        result = counter_delta(spec, self.counters.get(signal), raw)
        self.counters[signal] = result.current
        if result.kind in ("reset", "quarantined", "wrap"):
            self._agent(
                at,
                f"counter_{result.kind}",
                f"{self.spec.id}: {signal} {result.kind} {result.previous} -> {result.current}",
                {
                    "signal": signal,
                    "previous": result.previous,
                    "current": result.current,
                    "delta": result.delta,
                },
            )
        d = result.delta
        if d == 0:
            return
        bucket = self._bucket_at(at)
        v = bucket.values
        cycle = self.spec.cycle_time(self.product)
        in_plan = bucket.shift is not None
        counts = {"produced": 0, "good": 0, "scrap": 0, "rework": 0}
        if signal == "total_count":
            counts["produced"] = d
            if in_plan:
                v["produced"] += d
                v["ideal_produced_s"] += d * cycle
                if "good_count" in self.spec.counters:
                    v["scrap"] += d  # until the good counter says otherwise
                else:
                    v["good"] += d
                    v["ideal_good_s"] += d * cycle
            else:
                v["off_plan_produced"] += d
        elif signal == "good_count":
            counts["good"] = d
            if in_plan:
                v["good"] += d
                v["scrap"] -= d
                v["ideal_good_s"] += d * cycle
        else:
            name = "scrap" if signal == "scrap_count" else "rework"
            counts[name] = d
            if in_plan:
                v[name] += d
                v["good"] -= d
                v["ideal_good_s"] -= d * cycle
        self._out.append(
            CountEvent(
                agent_id=self.agent_id,
                site_id=self.site_id,
                equipment_id=self.spec.id,
                ts=at,
                product=self.product,
                in_plan=in_plan,
                produced=counts["produced"],
                good=counts["good"],
                scrap=counts["scrap"],
                rework=counts["rework"],
            )
        )

    def _agent(self, at: datetime, code: str, message: str, data: dict[str, Any]) -> None:
        self._out.append(
            AgentEvent(
                agent_id=self.agent_id,
                site_id=self.site_id,
                equipment_id=self.spec.id,
                ts=at,
                code=code,
                message=message,
                data=data,
            )
        )

    def _drain(self) -> list[Event]:
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
    ) -> None:
        self.engines = {
            spec.id: EquipmentEngine(
                spec, calendar, agent_id=agent_id, site_id=site_id, bucket_seconds=bucket_seconds
            )
            for spec in specs
        }

    def feed(self, sample: SampleLike) -> list[Event]:
        engine = self.engines.get(sample.equipment_id)
        if engine is None:
            raise KeyError(f"unknown equipment {sample.equipment_id!r}")
        return engine.feed(sample)

    def tick(self, now: datetime) -> list[Event]:
        return [e for engine in self.engines.values() for e in engine.tick(now)]

    def mark_unknown(self, at: datetime, why: str) -> list[Event]:
        return [e for engine in self.engines.values() for e in engine.mark_unknown(at, why)]

    def checkpoint(self) -> dict[str, Any]:
        return {eq: engine.checkpoint() for eq, engine in self.engines.items()}

    def restore(self, data: dict[str, Any]) -> None:
        for eq, state in data.items():
            if eq in self.engines:
                self.engines[eq].restore(state)
