"""`edge-agent replay`: the OEE engine on recorded samples (JSON Lines), offline.

The same configuration file as `run`, the same engine (`oee.engine`), no connections and no
cloud. Each line of the samples file is one sample::

    {"ts": "2026-01-05T06:00:00Z", "equipment": "press-1", "signal": "state", "value": 1}

with an optional `"quality": "bad"`. Samples before `--from` only set the starting point
(state and since when, reason, product, counter baselines); samples at or after `--to` are
not accounted, but a stop still open at `--to` is judged on its full length, read ahead in
the file (a stop whose end is not in the file is not a micro-stop). Lines are applied
in file order, except that the samples of one equipment sharing a timestamp are one scan,
applied together in the engine's order (reason, state, counters, product).

Problems in the input never stop a replay: unparseable lines, unknown equipment or signals,
and samples out of order (older than an earlier sample: ignored if older than the last sample
of the same signal, else applied at the time already accounted) are reported on stderr as
`FILE:LINE: message` and listed under `warnings`. A bad configuration, an unreadable samples
file or a bad `--from`/`--to`/`--equipment` exits with 2 and a message.

JSON output (`--json`), one object:

    equipment        the id, or with several equipment and no --equipment: the list of ids
    from, to         the window, ISO 8601 UTC
    availability, performance, quality, oee
                     ratios from the pooled components (numbers, or null when undefined)
    components       additive components (oee.components.COMPONENT_FIELDS), summed over the
                     window (and over all equipment when several)
    kpis             the KPI catalogue (oee.kpis.KPI_NAMES: the names `GET /v1/kpis` uses)
                     from those components, with calendar_s = window length x equipment
    targets, against_targets
                     the YAML's targets in force (one equipment: equipment > line > site;
                     the whole site: the site's) and each KPI judged against its target by
                     the KPI's direction, as `/v1/kpis` answers them (oee.targets.judge)
    downtime_by_reason  seconds of downtime by reason, summed likewise
    buckets          per-bucket records in time order: {equipment, start, end, shift,
                     shift_start, components, downtime_by_reason}
    by_equipment     only with several equipment: {id: {availability, performance, quality,
                     oee, components, kpis, targets, against_targets, downtime_by_reason}}
    flags            what the engine reported (agent events: performance above 1, counter
                     wraps/resets/quarantines, production outside planned time, unmapped
                     states, ...): {equipment, ts, code, message, data}
    warnings         input problems: {line, message} (the first 1000; `warnings_total` counts)

Exit codes: 0 replayed (even with warnings), 2 unusable configuration or arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from agent.config import AgentConfig, ConfigError, load_config
from connectors.sample import Sample
from oee.components import Components, performance_excess, ratios
from oee.engine import SIGNALS, EquipmentEngine, FeedDiagnostic, PlantEngine, from_us, to_us
from oee.events import AgentEvent, Event, OeeEvent
from oee.kpis import kpis
from oee.targets import effective, judge

_SIGNAL_SET = frozenset(SIGNALS)
MAX_WARNINGS_KEPT = 1000
MAX_WARNINGS_PRINTED_PER_KIND = 20


class ReplayError(Exception):
    """The replay cannot run (bad arguments or unreadable input); exit code 2."""


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_instant(text: str, what: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReplayError(f"{what}: {text!r} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        raise ReplayError(
            f"{what}: {text!r} has no UTC offset; write e.g. 2026-01-05T06:00:00Z or +01:00"
        )
    return t.astimezone(UTC)


@dataclass
class _Tally:
    """What one equipment contributed to the window."""

    components: Components = field(default_factory=Components)
    reasons: dict[str, float] = field(default_factory=dict)

    def add(self, event: OeeEvent) -> None:
        self.components = self.components + event.components
        for reason, seconds in event.downtime_by_reason.items():
            self.reasons[reason] = self.reasons.get(reason, 0.0) + seconds


class ReplayRun:
    """Feeds samples to a PlantEngine for one window and collects what comes out.

    `edge-agent replay` and `bench.oee` both drive the engine through this class.
    """

    def __init__(
        self,
        config: AgentConfig,
        start: datetime,
        end: datetime,
        *,
        equipment: str | None = None,
        keep_buckets: bool = True,
        source: str = "samples",
        stderr: TextIO | None = None,
    ) -> None:
        if end <= start:
            raise ReplayError("--to must be later than --from")
        ids = [e.id for e in config.equipment]
        if equipment is not None and equipment not in ids:
            raise ReplayError(f"--equipment {equipment!r} is not in the configuration")
        specs = [s for s in config.oee_specs() if equipment is None or s.id == equipment]
        self.plant = PlantEngine(
            specs,
            config.calendar(),
            agent_id=config.agent.id,
            site_id=config.agent.site,
            bucket_seconds=config.agent.bucket_seconds,
            count_events=False,  # replay reports buckets, not per-part events
        )
        self.engines: dict[str, EquipmentEngine] = self.plant.engines
        self.known = set(ids)
        self.selected = [s.id for s in specs]
        # The YAML's targets (the cloud keeps the same layers, registry.targets).
        self.site_targets = effective([config.targets.site])
        self.targets = {
            e.id: effective(
                [
                    config.targets.site,
                    config.targets.lines.get(e.line) if e.line is not None else None,
                    e.targets,
                ]
            )
            for e in config.equipment
        }
        self.single = equipment is not None or len(ids) == 1
        self.start, self.end = start, end
        self.start_us, self.end_us = to_us(start), to_us(end)
        self.bucket_us = config.agent.bucket_seconds * 1_000_000
        self.keep_buckets = keep_buckets
        self.source = source
        self.stderr = stderr
        self.samples = 0
        self.buckets: list[OeeEvent] = []
        self.tally: dict[str, _Tally] = {eq: _Tally() for eq in self.selected}
        self.flags: list[AgentEvent] = []
        self.warnings: list[dict[str, Any]] = []
        self.warnings_total = 0
        self._printed: dict[str, int] = {}
        self._next_tick: dict[str, int] = {}
        # After --to: per open stop, the time its state changes (None while unknown).
        self._stop_end: dict[str, int | None] = {}
        self._state_at_end: dict[str, str] = {}  # with a stop open at --to: its state

    # -- input ----------------------------------------------------------------------------

    def warn(self, line: int, kind: str, message: str) -> None:
        self.warnings_total += 1
        if len(self.warnings) < MAX_WARNINGS_KEPT:
            self.warnings.append({"line": line, "message": message})
        if self.stderr is not None:
            printed = self._printed.get(kind, 0)
            self._printed[kind] = printed + 1
            if printed < MAX_WARNINGS_PRINTED_PER_KIND:
                print(f"{self.source}:{line}: {message}", file=self.stderr)

    def parse_line(self, text: str, line: int) -> Sample | None:
        """One JSON line to a Sample, or None with a warning."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            self.warn(line, "json", f"not valid JSON ({exc.msg}); line skipped")
            return None
        if not isinstance(obj, dict):
            self.warn(line, "shape", "expected a JSON object; line skipped")
            return None
        missing = [k for k in ("ts", "equipment", "signal", "value") if k not in obj]
        if missing:
            self.warn(line, "shape", f"missing {', '.join(missing)}; line skipped")
            return None
        extra = sorted(set(obj) - {"ts", "equipment", "signal", "value", "quality"})
        if extra:
            self.warn(line, "shape", f"unknown key(s) {', '.join(extra)} ignored")
        ts_text, equipment, signal, value = obj["ts"], obj["equipment"], obj["signal"], obj["value"]
        quality = obj.get("quality", "good")
        if not isinstance(ts_text, str):
            self.warn(line, "ts", "ts must be an ISO 8601 string; line skipped")
            return None
        try:
            ts = datetime.fromisoformat(ts_text)
        except ValueError:
            self.warn(line, "ts", f"ts {ts_text!r} is not an ISO 8601 time; line skipped")
            return None
        if ts.tzinfo is None:
            self.warn(line, "ts", f"ts {ts_text!r} has no UTC offset (add Z); line skipped")
            return None
        if not isinstance(equipment, str) or not isinstance(signal, str):
            self.warn(line, "shape", "equipment and signal must be strings; line skipped")
            return None
        if quality not in ("good", "bad"):
            self.warn(line, "shape", f"quality {quality!r} is not good or bad; line skipped")
            return None
        if value is not None and not isinstance(value, bool | int | float | str):
            self.warn(line, "shape", "value must be a number, string, boolean or null; skipped")
            return None
        return Sample(equipment, signal, value, ts, quality)

    # -- the engine -----------------------------------------------------------------------

    def feed(self, sample: Sample, line: int) -> None:
        """Apply one sample in file order (the hot path: the benchmark runs through here)."""
        eq = sample.equipment_id
        engine = self.engines.get(eq)
        if engine is None:
            if eq not in self.known:
                self.warn(line, "equipment", f"unknown equipment {eq!r}; sample ignored")
            return  # else: another equipment than --equipment
        signal = sample.signal
        if signal not in _SIGNAL_SET:
            self.warn(
                line,
                "signal",
                f"unknown signal {signal!r} (use {', '.join(SIGNALS)}); sample ignored",
            )
            return
        try:
            ts = to_us(sample.ts)
        except ValueError as exc:
            self.warn(line, "ts", f"{exc}; sample ignored")
            return
        self.samples += 1
        if ts >= self.end_us:
            self._after_window(engine, sample, ts)
            return
        cursor = engine.latest_us  # the open scan's time counts as taken
        if cursor is None and ts < self.start_us:
            engine.prime(sample)
            return
        if cursor is None:
            self._collect(engine.start(self.start))
            cursor = self.start_us
        if ts < cursor or (ts == cursor and ts == engine.sampled_at(signal)):
            # Cheap test first: samples of one poll share a timestamp; only a second sample
            # of the same signal at the same instant can be a duplicate. The engine says what
            # it does with the sample (its own rules).
            diagnostic = engine.diagnose(sample)
            if diagnostic is not None:
                self._report(diagnostic, line)
        events = engine.feed(sample)
        if events:
            self._collect(events)
        if ts >= self._next_tick.get(eq, 0):
            # Closing buckets as time advances keeps memory flat on long files; accounting
            # up to a sample's own time is what feed() already did.
            self._collect(engine.tick(sample.ts))
            self._next_tick[eq] = ts + self.bucket_us

    def _report(self, diagnostic: FeedDiagnostic, line: int) -> None:
        signal = diagnostic.signal
        when = iso(diagnostic.ts)
        if diagnostic.verdict == "stale":
            assert diagnostic.last is not None
            self.warn(
                line,
                "order",
                f"out of order: {signal} at {when} is older than the {signal} sample at "
                f"{iso(diagnostic.last)}; ignored",
            )
        elif diagnostic.verdict == "duplicate":
            self.warn(line, "duplicate", f"duplicate {signal} sample at {when}; ignored")
        else:
            assert diagnostic.applied_at is not None
            self.warn(
                line,
                "order",
                f"out of order: {signal} at {when} is earlier than samples already applied; "
                f"it takes effect at {iso(diagnostic.applied_at)}",
            )

    def _after_window(self, engine: EquipmentEngine, sample: Sample, ts: int) -> None:
        """Past --to: only look for the end of a stop that is open at --to."""
        eq = engine.spec.id
        if sample.signal != "state" or self._stop_end.get(eq) is not None:
            return  # not a state, or this equipment's question is answered
        if eq not in self._stop_end:
            if engine.cursor is None:
                self._collect(engine.start(self.start))
            self._collect(engine.tick(self.end))  # the state at --to is now final
            at_end = engine.snapshot()
            if not at_end.stop_pending:
                self._stop_end[eq] = ts  # nothing to judge: resolved
                return
            self._stop_end[eq] = None
            self._state_at_end[eq] = at_end.state
        raw = sample.value if sample.quality == "good" else None
        if engine.map_state(raw) != self._state_at_end[eq]:
            self._stop_end[eq] = ts

    def finish(self) -> None:
        for eq, engine in self.engines.items():
            if engine.cursor is None:
                self._collect(engine.start(self.start))
            stop_end_us = self._stop_end.get(eq)
            stop_end = None if stop_end_us is None else from_us(stop_end_us)
            self._collect(engine.finish(self.end, stop_end=stop_end))

    def _collect(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, OeeEvent):
                assert event.equipment_id is not None
                self.tally[event.equipment_id].add(event)
                if self.keep_buckets:
                    self.buckets.append(event)
            elif isinstance(event, AgentEvent):
                self.flags.append(event)

    # -- output ---------------------------------------------------------------------------

    def _equipment_result(self, eq: str, tally: _Tally, window_s: float) -> dict[str, Any]:
        values = kpis(tally.components, window_s)
        return {
            **ratios(tally.components).as_dict(),
            "components": tally.components.as_dict(),
            "kpis": values,
            "targets": self.targets[eq],
            "against_targets": judge(values, self.targets[eq]),
            "downtime_by_reason": tally.reasons,
        }

    def result(self) -> dict[str, Any]:
        pooled = Components.pool(t.components for t in self.tally.values())
        window_s = (self.end - self.start).total_seconds()
        reasons: dict[str, float] = {}
        for tally in self.tally.values():
            for reason, seconds in tally.reasons.items():
                reasons[reason] = reasons.get(reason, 0.0) + seconds
        values = kpis(pooled, window_s * len(self.tally))
        targets = self.targets[self.selected[0]] if self.single else self.site_targets
        out: dict[str, Any] = {
            "equipment": self.selected[0] if self.single else self.selected,
            "from": iso(self.start),
            "to": iso(self.end),
            **ratios(pooled).as_dict(),
            "components": pooled.as_dict(),
            "kpis": values,
            "targets": targets,
            "against_targets": judge(values, targets),
            "downtime_by_reason": reasons,
            "buckets": [
                {
                    "equipment": b.equipment_id,
                    "start": iso(b.bucket_start),
                    "end": iso(b.bucket_end),
                    "shift": b.shift,
                    "shift_start": None if b.shift_start is None else iso(b.shift_start),
                    "components": b.components.as_dict(),
                    "downtime_by_reason": b.downtime_by_reason,
                }
                for b in sorted(self.buckets, key=lambda b: (b.bucket_start, b.equipment_id))
            ],
        }
        if not self.single:
            out["by_equipment"] = {
                eq: self._equipment_result(eq, t, window_s) for eq, t in self.tally.items()
            }
        flags = [
            {
                "equipment": f.equipment_id,
                "ts": iso(f.ts),
                "code": f.code,
                "message": f.message,
                "data": f.data,
            }
            for f in self.flags
        ]
        for eq, tally in self.tally.items():
            c = tally.components
            excess = performance_excess(c.ideal_produced_s, c.production_s, c.produced)
            if excess is not None:
                flags.append(
                    {
                        "equipment": eq,
                        "ts": iso(self.end),
                        "code": "performance_above_one",
                        "message": f"{eq}: performance {excess.performance:.3f} > 1 over the "
                        "window; the configured ideal cycle time is probably too long",
                        "data": {
                            "performance": excess.performance,
                            "scope": "window",
                            "configured_ideal_cycle_time_s": self.engines[eq].spec.ideal_cycle_time,
                            "suspected_ideal_cycle_time_s": excess.suspected_ideal_cycle_time_s,
                        },
                    }
                )
        out["flags"] = flags
        out["warnings"] = self.warnings
        out["warnings_total"] = self.warnings_total
        return out


def read_samples(run: ReplayRun, lines: Iterable[str]) -> Iterator[tuple[int, Sample]]:
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        sample = run.parse_line(text, number)
        if sample is not None:
            yield number, sample


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:6.2f} %"


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def summary(result: dict[str, Any]) -> str:
    """A readable report of a replay result (rounded for display only)."""
    c = result["components"]
    k = result["kpis"]
    eq = result["equipment"]
    name = eq if isinstance(eq, str) else ", ".join(eq)
    lines = [
        f"{name}  {result['from']} .. {result['to']}",
        f"  Availability {_pct(result['availability'])}   production {c['production_s'] / 60:.1f}"
        f" min of planned busy {c['planned_busy_s'] / 60:.1f} min",
        f"  Performance  {_pct(result['performance'])}   ideal {c['ideal_produced_s'] / 60:.1f}"
        " min of production time",
        f"  Quality      {_pct(result['quality'])}   {c['good']} good of {c['produced']} produced"
        f" (scrap {c['scrap']}, rework {c['rework']})",
        f"  OEE          {_pct(result['oee'])}   TEEP {_pct(k['teep'])}",
        f"  failures {k['failures']} (MTBF {_minutes(k['mtbf_s'])}, MTTR {_minutes(k['mttr_s'])}),"
        f" micro-stops {k['micro_stops']}",
        "  time (min): "
        + ", ".join(
            f"{label} {c[key] / 60:.1f}"
            for label, key in (
                ("downtime", "downtime_s"),
                ("setup", "setup_s"),
                ("unknown", "unknown_s"),
                ("micro-stops", "micro_stop_s"),
                ("planned down", "planned_down_s"),
                ("off plan", "off_plan_s"),
            )
        ),
    ]
    if c["off_plan_produced"]:
        lines.append(f"  produced outside planned time (not in OEE): {c['off_plan_produced']}")
    if result["downtime_by_reason"]:
        ranked = sorted(result["downtime_by_reason"].items(), key=lambda kv: -kv[1])
        lines.append(
            "  downtime by reason (min): "
            + ", ".join(f"{reason} {seconds / 60:.1f}" for reason, seconds in ranked)
        )
    for eq_id, sub in result.get("by_equipment", {}).items():
        lines.append(
            f"  {eq_id}: A {_pct(sub['availability'])}  P {_pct(sub['performance'])}"
            f"  Q {_pct(sub['quality'])}  OEE {_pct(sub['oee'])}"
        )
    for flag in result["flags"]:
        lines.append(f"  ! {flag['ts']} {flag['code']}: {flag['message']}")
    if result["warnings_total"]:
        lines.append(f"  {result['warnings_total']} input warning(s), see stderr")
    return "\n".join(lines)


def run_replay(args: argparse.Namespace) -> int:
    """`edge-agent replay`; returns the exit code."""
    try:
        config = load_config(args.config, replay=True)
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    path = Path(args.samples)
    try:
        start = parse_instant(args.from_, "--from")
        end = parse_instant(args.to, "--to")
        run = ReplayRun(
            config, start, end, equipment=args.equipment, source=str(path), stderr=sys.stderr
        )
        with path.open(encoding="utf-8", errors="replace") as lines:
            for number, sample in read_samples(run, lines):
                run.feed(sample, number)
    except ReplayError as exc:
        print(f"edge-agent: replay: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edge-agent: replay: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    run.finish()
    result = run.result()
    if args.json:
        # dumps, not dump: only dumps uses the C encoder (a week of buckets is large).
        sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
    else:
        print(summary(result))
    return 0
