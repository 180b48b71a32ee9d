"""The cross-view invariant checker: every view of the cloud tells the same story, and the
PLC's where its ground truth is known.

Call `check_views` once the data is settled (the agents stopped, their outboxes drained). For
every equipment it checks, from the stored facts and through the HTTP API:

- every OEE bucket: its time classes add up to its length (OEE.md: every instant in exactly
  one class), downtime = fault + idle = the sum of its downtime by reason, good = produced -
  scrap - rework; the buckets tile the timeline without gap or overlap (gaps are allowed only
  where the caller says data was declared lost);
- the 1-minute and 1-hour rollups equal the buckets summed per minute and per hour, and the
  count events summed per bucket equal each bucket's quantities;
- the state timeline (`/v1/equipment/{id}/states`) cut at the bucket edges gives each
  bucket's time classes and its downtime by reason;
- `/v1/oee` (1m, 1h and shift intervals, by equipment and for the site), `/v1/kpis` (its
  components, calendar and every KPI of oee.kpis), `/v1/counts`,
  `/v1/quality` and `/v1/equipment/{id}/oee` report the buckets' sums; the Pareto by reason
  and by class, the sum of `/v1/downtime/events` (also by reason) and downtime seconds agree,
  and each listed stop is a stop of the timeline with its planned seconds (those in buckets of
  a shift) as `duration_s`;
- every fault interval carries the reason the PLC set (`plc_reason`): the truth's sequence of
  stops when given, else a reason allowed for that state, else any reason at all;
- stops that people classified: each stop's effective `reason` in `/states` and
  `/v1/downtime/events` is the newest live downtime annotation of its start in
  facts.annotations (read directly), else the PLC's; every live downtime annotation names a
  stop of the timeline; the timeline cut at the bucket edges by `plc_reason` gives each
  bucket's stored downtime by reason, and the Pareto by reason equals those stored seconds with
  each annotated stop's seconds in them moved from its PLC reason to its annotated one.

It returns what each view said per equipment (`Views`), for an exact comparison with a ground
truth (`compare_with_truth`) and a table to quote (`table`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from cloud_api.config import CloudSettings, DatabaseSettings
from cloud_api.db import make_pool
from oee.components import COMPONENT_FIELDS, QUANTITY_FIELDS, Components
from oee.engine import STOP_STATES, UNSPECIFIED
from oee.kpis import kpis
from tests.cloud_api.test_query_api import served

# Bucket components are microseconds / 1e6 summed in floating point.
TIME_TOL = 1e-4
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
# The time class of a bucket that a state of the timeline accrues to (in a shift).
STATE_CLASS = {
    "running": "production_s",
    "setup": "setup_s",
    "fault": "fault_s",
    "idle": "idle_s",
    "unknown": "unknown_s",
    "planned_stop": "planned_down_s",
}
TIMELINE_CLASSES = (*dict.fromkeys(STATE_CLASS.values()), "off_plan_s")


@dataclass(frozen=True)
class Truth:
    """What a PLC did, as far as its server knows: parts, scrap, and the stops it set.

    `stops`: every stop (fault or idle) in order, as (state, reason); `reasons`: the reasons
    each stop state may carry, when only that is known."""

    produced: int | None = None
    scrap: int | None = None
    rework: int = 0
    stops: Sequence[tuple[str, str | None]] | None = None
    reasons: Mapping[str, frozenset[str | None]] | None = None
    stop_seconds: Mapping[str, float] | None = None  # seconds by reason

    @property
    def good(self) -> int | None:
        if self.produced is None or self.scrap is None:
            return None
        return self.produced - self.scrap - self.rework


@dataclass
class Views:
    """What each view says about one equipment over its settled data."""

    site: str
    equipment: str
    # view -> (produced, scrap, good)
    quantities: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # view -> reason -> seconds of downtime
    downtime: dict[str, dict[str, float]] = field(default_factory=dict)
    # the stops of the state timeline, consecutive repeats merged: (state, reason)
    stops: list[tuple[str, str | None]] = field(default_factory=list)
    # the intervals of unknown state in /states (communication lost, agent down)
    unknown: list[tuple[datetime, datetime]] = field(default_factory=list)

    @property
    def unknown_s(self) -> float:
        return sum((b - a).total_seconds() for a, b in self.unknown)


class Mismatch(AssertionError):
    pass


@dataclass
class _Bucket:
    start: datetime
    end: datetime
    shift: str | None
    values: dict[str, float]
    reasons: dict[str, float]


@dataclass
class _Interval:
    state: str
    reason: str | None  # effective: the newest annotation's, else the PLC's
    start: datetime
    end: datetime
    plc_reason: str | None = None
    annotation_id: str | None = None
    # A stop's start as annotations name it: `start` unless the window cut the stop.
    stop_start: datetime | None = None


@contextmanager
def api_client(pg_url: str, keys_dir: Path) -> Iterator[httpx.Client]:
    """The cloud API served over HTTP for `pg_url`, with a token that sees every site."""
    settings = CloudSettings(database=DatabaseSettings(url=pg_url), keys_dir=keys_dir)
    pool: ConnectionPool = make_pool(
        DatabaseSettings(url=pg_url, pool_min=1, pool_max=4), name="views"
    )
    try:
        with served(settings, pool) as client:
            yield client
    finally:
        pool.close()


def _close(a: float, b: float, what: str, tol: float = TIME_TOL) -> None:
    if not math.isclose(a, b, abs_tol=tol):
        raise Mismatch(f"{what}: {a!r} != {b!r}")


def _same(got: Mapping[str, float], want: Mapping[str, float], what: str) -> None:
    for key in sorted(set(got) | set(want)):
        _close(float(got.get(key, 0.0)), float(want.get(key, 0.0)), f"{what} [{key}]")


def _sum(buckets: Sequence[_Bucket]) -> dict[str, float]:
    total = dict.fromkeys(COMPONENT_FIELDS, 0.0)
    for b in buckets:
        for k in COMPONENT_FIELDS:
            total[k] += b.values[k]
    return total


def _reasons(buckets: Sequence[_Bucket]) -> dict[str, float]:
    total: dict[str, float] = {}
    for b in buckets:
        for k, v in b.reasons.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _qty(values: Mapping[str, Any]) -> tuple[int, int, int]:
    return int(values["produced"]), int(values["scrap"]), int(values["good"])


def _floor(t: datetime, step: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((t - epoch) // step) * step


def _ceil(t: datetime, step: timedelta) -> datetime:
    f = _floor(t, step)
    return f if f == t else f + step


def _get(api: httpx.Client, path: str, **params: Any) -> Any:
    r = api.get(path, params={k: v.isoformat() if isinstance(v, datetime) else v
                              for k, v in params.items()})  # fmt: skip
    if r.status_code != 200:
        raise Mismatch(f"GET {path} {params}: {r.status_code} {r.text[:500]}")
    return r.json()


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value).astimezone(UTC)


# -- stored facts -----------------------------------------------------------------------------


def _load(
    conn: psycopg.Connection[Any], site: str, eq: str
) -> tuple[list[_Bucket], list[tuple[datetime, dict[str, Any]]]]:
    cols = ", ".join(COMPONENT_FIELDS)
    buckets = [
        _Bucket(
            r["bucket_start"],
            r["bucket_end"],
            r["shift"],
            {k: float(r[k]) for k in COMPONENT_FIELDS},
            {k: float(v) for k, v in (r["downtime_by_reason"] or {}).items()},
        )
        for r in conn.execute(
            f"SELECT bucket_start, bucket_end, shift, downtime_by_reason, {cols} "
            "FROM facts.oee_buckets WHERE site_id = %s AND equipment_id = %s "
            "ORDER BY bucket_start, bucket_end",
            (site, eq),
        )
    ]
    counts = [
        (r["ts"], r["body"])
        for r in conn.execute(
            "SELECT ts, body FROM facts.events WHERE site_id = %s AND equipment_id = %s "
            "AND kind = 'count' ORDER BY ts",
            (site, eq),
        )
    ]
    return buckets, counts


def _check_buckets(name: str, buckets: Sequence[_Bucket], allow_gaps: bool) -> list[list[_Bucket]]:
    """Per-bucket identities; returns the contiguous runs."""
    runs: list[list[_Bucket]] = []
    for b in buckets:
        v = b.values
        what = f"{name} bucket {b.start.isoformat()}"
        length = (b.end - b.start).total_seconds()
        if length <= 0:
            raise Mismatch(f"{what}: empty or reversed ({b.end.isoformat()})")
        _close(v["planned_busy_s"] + v["planned_down_s"] + v["off_plan_s"], length, what)
        busy = v["production_s"] + v["setup_s"] + v["downtime_s"] + v["unknown_s"]
        _close(busy, v["planned_busy_s"], f"{what}: classes of planned busy time")
        _close(v["fault_s"] + v["idle_s"], v["downtime_s"], f"{what}: fault + idle")
        _close(sum(b.reasons.values()), v["downtime_s"], f"{what}: downtime by reason")
        if v["good"] != v["produced"] - v["scrap"] - v["rework"]:
            raise Mismatch(f"{what}: good != produced - scrap - rework ({v})")
        if b.shift is None and v["planned_busy_s"] + v["planned_down_s"] > 0:
            raise Mismatch(f"{what}: planned time outside every shift")
        if runs and b.start < runs[-1][-1].end:
            raise Mismatch(f"{what}: overlaps the bucket ending {runs[-1][-1].end.isoformat()}")
        if runs and b.start == runs[-1][-1].end:
            runs[-1].append(b)
            continue
        if runs and not allow_gaps:
            raise Mismatch(
                f"{name}: no bucket covers {runs[-1][-1].end.isoformat()} to {b.start.isoformat()}"
                " (data lost?)"
            )
        runs.append([b])
    return runs


def _check_rollups(
    conn: psycopg.Connection[Any], name: str, site: str, eq: str, buckets: Sequence[_Bucket]
) -> dict[str, tuple[int, int, int]]:
    out = {}
    for table, step in (("oee_1m", MINUTE), ("oee_1h", HOUR)):
        want: dict[datetime, list[_Bucket]] = {}
        for b in buckets:
            want.setdefault(_floor(b.start, step), []).append(b)
        rows = {
            r["bucket"]: r
            for r in conn.execute(
                f"SELECT * FROM rollups.{table} WHERE site_id = %s AND equipment_id = %s",
                (site, eq),
            )
        }
        if set(rows) != set(want):
            raise Mismatch(
                f"{name}: rollups.{table} rows {sorted(rows)} != bucket {step}s {sorted(want)}"
            )
        for key, row in rows.items():
            _same(
                {k: float(row[k]) for k in COMPONENT_FIELDS},
                _sum(want[key]),
                f"{name}: rollups.{table} {key.isoformat()}",
            )
        totals = _sum([_Bucket(t, t, None, {k: float(r[k]) for k in COMPONENT_FIELDS}, {})
                       for t, r in rows.items()])  # fmt: skip
        out[f"rollups.{table}"] = _qty(totals)
    return out


def _check_counts(
    name: str, buckets: Sequence[_Bucket], counts: Sequence[Any], allow_gaps: bool
) -> None:
    """Count events summed per bucket = the bucket's quantities; every count event lies in a
    bucket or after the last one (the bucket still open when the agent stopped), or, where
    data was declared lost, in a gap (its bucket was in a lost batch)."""
    sums = [dict.fromkeys(QUANTITY_FIELDS, 0) for _ in buckets]
    i = 0
    for ts, body in counts:
        while i < len(buckets) and buckets[i].end <= ts:
            i += 1
        if i == len(buckets):
            break  # after the last closed bucket
        if ts < buckets[i].start:
            if allow_gaps:
                continue
            raise Mismatch(f"{name}: count event at {ts.isoformat()} in no bucket: {body}")
        s = sums[i]
        if body.get("in_plan", True):
            for k in ("produced", "scrap", "rework"):
                s[k] += int(body.get(k, 0))
        else:
            s["off_plan_produced"] += int(body.get("produced", 0))
    for b, s in zip(buckets, sums, strict=True):
        for k in ("produced", "scrap", "rework", "off_plan_produced"):
            if s[k] != b.values[k]:
                raise Mismatch(
                    f"{name} bucket {b.start.isoformat()}: {k} {b.values[k]:g} but count events "
                    f"in it sum to {s[k]}"
                )


# -- the timeline -----------------------------------------------------------------------------


def _timeline(api: httpx.Client, site: str, eq: str, lo: datetime, hi: datetime) -> list[_Interval]:
    body = _get(api, f"/v1/equipment/{eq}/states", site=site, **{"from": lo, "to": hi})
    rows = body["intervals"]
    if len(rows) >= 10_000:
        raise Mismatch(f"{eq}: more state intervals than one page holds; narrow the run")
    out = [
        _Interval(
            r["state"],
            r["reason"],
            _ts(r["start"]),
            _ts(r["end"]),
            r["plc_reason"],
            (r["annotation"] or {}).get("annotation_id"),
            None if r["stop_start"] is None else _ts(r["stop_start"]),
        )
        for r in rows
    ]
    for iv in out:
        # A stop begins where its interval does, or (cut by the window) before `lo`.
        began = iv.stop_start
        if iv.state not in STOP_STATES:
            ok = began is None
        else:
            ok = began == iv.start or (iv.start == lo and began is not None and began < lo)
        if not ok:
            raise Mismatch(f"{eq}: {iv.state} interval at {iv.start} has stop_start {began}")
    return out


def _check_timeline(
    name: str,
    buckets: Sequence[_Bucket],
    timeline: Sequence[_Interval],
    perf_micro: bool,
    fresh_start: datetime | None = None,
) -> None:
    """The timeline cut at the bucket edges gives each bucket's classes and reasons.

    `fresh_start`: after a declared loss the agent started afresh there (state unknown until
    its first sample); a state the timeline carries over the gap from before is not known."""
    j = 0
    for b in buckets:
        got = dict.fromkeys(TIMELINE_CLASSES, 0.0)
        reasons: dict[str, float] = {}
        covered = 0.0
        while j < len(timeline) and timeline[j].end <= b.start:
            j += 1
        k = j
        while k < len(timeline) and timeline[k].start < b.end:
            iv = timeline[k]
            state = iv.state
            if fresh_start is not None and iv.start < fresh_start:
                state = "unknown"
            seconds = (min(iv.end, b.end) - max(iv.start, b.start)).total_seconds()
            if seconds > 0:
                covered += seconds
                cls = "off_plan_s" if b.shift is None else STATE_CLASS[state]
                got[cls] += seconds
                if b.shift is not None and state in STOP_STATES:
                    # The buckets hold the engine's downtime by the PLC's reason.
                    key = iv.plc_reason or UNSPECIFIED
                    reasons[key] = reasons.get(key, 0.0) + seconds
            k += 1
        # Before the first state sample the state is unknown (and there is no state event).
        rest = (b.end - b.start).total_seconds() - covered
        got["off_plan_s" if b.shift is None else "unknown_s"] += rest
        what = f"{name} bucket {b.start.isoformat()} to {b.end.isoformat()} vs /states " + str(
            [(iv.state, iv.reason, iv.start.isoformat(), iv.end.isoformat())
             for iv in timeline[j:k]]
        )  # fmt: skip
        want = {c: b.values[c] for c in TIMELINE_CLASSES}
        if perf_micro:
            # Micro-stops went to production: only their sum is comparable.
            for d in (got, want):
                d["production_s"] += d.pop("fault_s") + d.pop("idle_s")
            _same(got, want, what)
            continue
        _same(got, want, what)
        _same(reasons, b.reasons, f"{what} (downtime by reason)")


def _stop_sequence(timeline: Sequence[_Interval]) -> list[tuple[str, str | None]]:
    """The stops in order; a stop cut by unknown time (communication lost) is one stop."""
    out: list[tuple[str, str | None]] = []
    merge = False
    for iv in timeline:
        if iv.state in STOP_STATES:
            key = (iv.state, iv.plc_reason)
            if not (merge and out and out[-1] == key):
                out.append(key)
            merge = True
        elif iv.state != "unknown":
            merge = False
    return out


# -- the API over one window ------------------------------------------------------------------


def _check_api_window(
    api: httpx.Client,
    name: str,
    site: str,
    eq: str,
    lo: datetime,
    hi: datetime,
    buckets: Sequence[_Bucket],
    timeline: Sequence[_Interval],
    perf_micro: bool,
    views: Views,
) -> None:
    want = _sum(buckets)
    window = {"from": lo, "to": hi, "site": site}
    scope = {"scope": "equipment", "id": eq, **window}
    for interval, part in (("1m", buckets), ("shift", [b for b in buckets if b.shift])):
        body = _get(api, "/v1/oee", interval=interval, **scope)
        _same(body["total"]["components"], _sum(part), f"{name}: /v1/oee interval={interval}")
        if interval == "1m":
            _add(views, "/v1/oee", _qty(body["total"]["components"]))
            ratios = body["total"]
            c = body["total"]["components"]
            if c["planned_busy_s"] > 0:
                _close(ratios["availability"], c["production_s"] / c["planned_busy_s"], name)
                _close(ratios["oee"], c["ideal_good_s"] / c["planned_busy_s"], name)
    _check_kpis(api, name, scope, want, (hi - lo).total_seconds())
    counts = _get(api, "/v1/counts", interval="1m", **scope)["total"]
    _same(counts, {k: want[k] for k in QUANTITY_FIELDS}, f"{name}: /v1/counts")
    _add(views, "/v1/counts", _qty(counts))
    quality = _get(api, "/v1/quality", **scope)["total"]
    _same(quality, {k: want[k] for k in ("produced", "good", "scrap", "rework")},
          f"{name}: /v1/quality")  # fmt: skip
    _add(views, "/v1/quality", _qty(quality))
    one = _get(api, f"/v1/equipment/{eq}/oee", **window)["components"]
    _same(one, want, f"{name}: /v1/equipment/{{id}}/oee")
    _add(views, "/v1/equipment/{id}/oee", _qty(one))

    pareto = _get(api, "/v1/downtime/pareto", by="reason", top=1000, **scope)
    by_reason = {item["reason"]: float(item["seconds"]) for item in pareto["items"]}
    effective = _effective_reasons(buckets, timeline)
    _same(by_reason, effective, f"{name}: Pareto by reason vs buckets (with annotations)")
    _close(float(pareto["total_s"]), want["downtime_s"], f"{name}: Pareto total vs downtime_s")
    by_class = _get(api, "/v1/downtime/pareto", by="class", top=1000, **scope)
    _same({i["class"]: float(i["seconds"]) for i in by_class["items"]},
          {c.removesuffix("_s"): want[c] for c in ("fault_s", "idle_s", "setup_s", "unknown_s")},
          f"{name}: Pareto by class")  # fmt: skip
    stops = _get(api, "/v1/downtime/events", limit=10_000, **scope)["stops"]
    from_events: dict[str, float] = {}
    for s in stops:
        key = s["reason"] or UNSPECIFIED
        from_events[key] = from_events.get(key, 0.0) + float(s["duration_s"])
    # A stop's downtime is its planned time: the seconds of it in buckets of a shift. A stop
    # with none (inside a break, off shift) is not listed.
    timeline_stops = [
        (iv, planned)
        for iv in timeline
        if iv.state in STOP_STATES and (planned := _planned_s(buckets, iv.start, iv.end)) > 0
    ]
    if len(stops) != len(timeline_stops):
        raise Mismatch(f"{name}: {len(stops)} /v1/downtime/events, {len(timeline_stops)} stops")
    for s, (iv, planned) in zip(stops, timeline_stops, strict=True):
        what = f"{name}: /v1/downtime/events {s} vs /states {iv}"
        if (
            (_ts(s["start"]), _ts(s["end"]), s["state"], s["reason"], s["plc_reason"])
            != (iv.start, iv.end, iv.state, iv.reason, iv.plc_reason)
            or (s["annotation"] or {}).get("annotation_id") != iv.annotation_id
            or _ts(s["stop_start"]) != iv.stop_start
        ):
            raise Mismatch(what)
        _close(float(s["duration_s"]), planned, f"{what}: planned seconds")
        _close(float(s["wall_s"]), (iv.end - iv.start).total_seconds(), f"{what}: wall_s")
    if not perf_micro:
        _close(sum(from_events.values()), want["downtime_s"], f"{name}: stops vs downtime_s")
        _same(from_events, by_reason, f"{name}: /v1/downtime/events by reason vs Pareto")
    _merge(views, "/v1/downtime/pareto", by_reason)
    _merge(views, "/v1/downtime/events", from_events)
    _merge(views, "facts.oee_buckets", _reasons(buckets))


def _effective_reasons(
    buckets: Sequence[_Bucket], timeline: Sequence[_Interval]
) -> dict[str, float]:
    """The buckets' downtime by reason with each annotated stop's seconds in a bucket of a
    shift moved from its PLC reason to its annotated one (at most what the bucket holds for
    the PLC reason: a micro-stop counted as production has no downtime to move)."""
    total: dict[str, float] = {}
    for b in buckets:
        reasons = dict(b.reasons)
        if b.shift is not None:
            for iv in timeline:
                if iv.annotation_id is None or iv.start >= b.end or iv.end <= b.start:
                    continue
                plc = iv.plc_reason or UNSPECIFIED
                assert iv.reason is not None
                seconds = (min(iv.end, b.end) - max(iv.start, b.start)).total_seconds()
                moved = min(seconds, reasons.get(plc, 0.0))
                reasons[plc] = reasons.get(plc, 0.0) - moved
                reasons[iv.reason] = reasons.get(iv.reason, 0.0) + moved
        for k, v in reasons.items():
            total[k] = total.get(k, 0.0) + v
    return {k: v for k, v in total.items() if v >= 5e-7}


def _live_annotations(conn: psycopg.Connection[Any], site: str, eq: str) -> dict[datetime, Any]:
    """The newest live downtime annotation of each annotated stop start: (id, reason)."""
    rows = conn.execute(
        "SELECT DISTINCT ON (ts) ts, annotation_id::text AS id, reason FROM facts.annotations "
        "WHERE site_id = %s AND equipment_id = %s AND kind = 'downtime' AND deleted_at IS NULL "
        "ORDER BY ts, created_at DESC, annotation_id DESC",
        (site, eq),
    ).fetchall()
    return {r["ts"]: (r["id"], r["reason"]) for r in rows}


def _check_annotations(
    name: str, timeline: Sequence[_Interval], live: Mapping[datetime, Any], lo: datetime
) -> None:
    """Each stop's effective reason is its newest live annotation's, else the PLC's."""
    for iv in timeline:
        if iv.state not in STOP_STATES:
            if iv.annotation_id is not None or iv.reason != iv.plc_reason:
                raise Mismatch(f"{name}: {iv} is no stop, yet has an annotated reason")
            continue
        if iv.start <= lo:
            continue  # clipped at the window's start: its own start is not in view
        want = live.get(iv.start)
        got = (iv.annotation_id, iv.reason) if iv.annotation_id is not None else None
        if want is not None and got != tuple(want):
            raise Mismatch(f"{name}: stop {iv} has {got}, its newest annotation is {want}")
        if want is None and (got is not None or iv.reason != iv.plc_reason):
            raise Mismatch(f"{name}: stop {iv} is not annotated, yet its reason changed")


def _planned_s(buckets: Sequence[_Bucket], start: datetime, end: datetime) -> float:
    """Seconds of [start, end) in buckets of a shift."""
    return sum(
        (min(end, b.end) - max(start, b.start)).total_seconds()
        for b in buckets
        if b.shift is not None and b.start < end and b.end > start
    )


def _check_kpis(
    api: httpx.Client, name: str, scope: Mapping[str, Any], want: Mapping[str, float], span: float
) -> None:
    """`/v1/kpis` sums the components `/v1/oee` sums, and its KPIs are oee.kpis of them."""
    body = _get(api, "/v1/kpis", interval="1m", **scope)["total"]
    _same(body["components"], want, f"{name}: /v1/kpis components vs buckets")
    _close(body["calendar_s"], span, f"{name}: /v1/kpis calendar_s vs window")
    expected = kpis(Components.from_mapping(body["components"]), span)
    for kpi, value in expected.items():
        if (value is None) != (body[kpi] is None):
            raise Mismatch(f"{name}: /v1/kpis {kpi} = {body[kpi]}, oee.kpis says {value}")
        if value is not None:
            _close(body[kpi], value, f"{name}: /v1/kpis {kpi}", tol=1e-9 * max(1.0, abs(value)))


def _add(views: Views, view: str, q: tuple[int, int, int]) -> None:
    old = views.quantities.get(view, (0, 0, 0))
    views.quantities[view] = (old[0] + q[0], old[1] + q[1], old[2] + q[2])


def _merge(views: Views, view: str, seconds: Mapping[str, float]) -> None:
    d = views.downtime.setdefault(view, {})
    for k, v in seconds.items():
        d[k] = d.get(k, 0.0) + v


def _run_windows(
    runs: Sequence[Sequence[_Bucket]], step: timedelta
) -> list[tuple[int, int, datetime, datetime]]:
    """(first, last+1 bucket index, from, to) per run. The API sums minute rollups, which
    cannot be cut inside: a window reaches out to the rollup edges around its run, or, where
    another run's data lies there, is trimmed to them."""
    out = []
    offset = 0
    for n, run in enumerate(runs):
        lo, hi = _floor(run[0].start, step), run[-1].end
        if n > 0 and lo < runs[n - 1][-1].end:
            lo = _ceil(run[0].start, step)
        if n + 1 < len(runs) and _ceil(hi, step) > runs[n + 1][0].start:
            hi = _floor(hi, step)
        first = next((i for i, b in enumerate(run) if b.start >= lo), len(run))
        last = next((i for i, b in enumerate(run) if b.end > hi), len(run))
        if first < last:
            out.append((offset + first, offset + last, lo, hi))
        offset += len(run)
    return out


# -- the whole check --------------------------------------------------------------------------


def check_views(
    api: httpx.Client,
    pg_url: str,
    *,
    truths: Mapping[str, Truth] | None = None,
    allow_gaps: bool = False,
) -> dict[str, Views]:
    """Check every invariant for every equipment of the database; see the module docstring.

    `allow_gaps`: buckets may be missing where the agent declared data lost (a replaced
    outbox); the views are then compared on each contiguous run of buckets."""
    truths = truths or {}
    out: dict[str, Views] = {}
    with psycopg.connect(pg_url, row_factory=dict_row) as conn:
        equipment = conn.execute(
            "SELECT site_id, equipment_id, config FROM registry.equipment ORDER BY 1, 2"
        ).fetchall()
        seconds = {
            int(r["s"])
            for r in conn.execute(
                "SELECT DISTINCT body->'data'->>'bucket_seconds' AS s FROM facts.events "
                "WHERE kind = 'agent' AND body->>'code' = 'config'"
            )
        }
        if not equipment:
            raise Mismatch("no equipment in the registry: nothing to check")
        # A rollup row holds whole buckets: windows are cut on edges of both.
        step = timedelta(seconds=math.lcm(60, *seconds))
        loaded = {
            (r["site_id"], r["equipment_id"]): _load(conn, r["site_id"], r["equipment_id"])
            for r in equipment
        }
        annotations = {
            (r["site_id"], r["equipment_id"]): _live_annotations(
                conn, r["site_id"], r["equipment_id"]
            )
            for r in equipment
        }
        rollups: dict[tuple[str, str], dict[str, tuple[int, int, int]]] = {}
        for (site, eq), (buckets, _) in loaded.items():
            rollups[site, eq] = _check_rollups(conn, f"{site}/{eq}", site, eq, buckets)
    sites: dict[str, list[_Bucket]] = {}
    for row in equipment:
        site, eq, config = row["site_id"], row["equipment_id"], row["config"] or {}
        name = f"{site}/{eq}"
        buckets, counts = loaded[site, eq]
        if not buckets:
            raise Mismatch(f"{name}: no OEE bucket stored")
        sites.setdefault(site, []).extend(buckets)
        perf_micro = (
            config.get("micro_stop_threshold_s") is not None
            and config.get("micro_stops", "performance") == "performance"
        )
        views = Views(site, eq)
        runs = _check_buckets(name, buckets, allow_gaps)
        _check_counts(name, buckets, counts, allow_gaps)
        views.quantities["facts.oee_buckets"] = _qty(_sum(buckets))
        views.quantities.update(rollups[site, eq])
        closed = [b for ts, b in counts if ts < buckets[-1].end and b.get("in_plan", True)]
        produced = sum(int(b.get("produced", 0)) for b in closed)
        scrap = sum(int(b.get("scrap", 0)) for b in closed)
        rework = sum(int(b.get("rework", 0)) for b in closed)
        views.quantities["facts.events (count)"] = (produced, scrap, produced - scrap - rework)
        timeline_all: list[_Interval] = []
        for first, last, lo, hi in _run_windows(runs, step):
            part = buckets[first:last]
            timeline = _timeline(api, site, eq, lo, hi)
            after_gap = part[0].start == next(r[0].start for r in runs if part[0] in r)
            fresh = part[0].start if after_gap and part[0] is not buckets[0] else None
            _check_timeline(name, part, timeline, perf_micro, fresh)
            _check_annotations(name, timeline, annotations[site, eq], lo)
            _check_api_window(api, name, site, eq, lo, hi, part, timeline, perf_micro, views)
            timeline_all += timeline
        views.unknown = [(iv.start, iv.end) for iv in timeline_all if iv.state == "unknown"]
        views.stops = _stop_sequence(timeline_all)
        starts = {iv.start for iv in timeline_all if iv.state in STOP_STATES}
        for ts in annotations[site, eq]:
            if ts not in starts:
                raise Mismatch(f"{name}: an annotation names no stop: {ts.isoformat()}")
        _check_reasons(name, timeline_all, views, truths.get(eq))
        out[eq] = views
    for site, buckets in sites.items():
        _check_site(api, site, buckets, [v for v in out.values() if v.site == site])
    return out


def _check_reasons(
    name: str, timeline: Sequence[_Interval], views: Views, truth: Truth | None
) -> None:
    if truth is not None and truth.stops is not None:
        if views.stops != list(truth.stops):
            raise Mismatch(f"{name}: stops in /states {views.stops} != the PLC's {truth.stops}")
        return
    for iv in timeline:
        if iv.state not in STOP_STATES:
            continue
        allowed = truth.reasons.get(iv.state) if truth and truth.reasons else None
        if allowed is not None and iv.plc_reason not in allowed:
            raise Mismatch(
                f"{name}: {iv.state} at {iv.start.isoformat()} has reason {iv.plc_reason!r}, "
                f"the PLC sets one of {sorted(map(str, allowed))}"
            )
        if allowed is None and iv.state == "fault" and iv.plc_reason is None:
            raise Mismatch(f"{name}: fault at {iv.start.isoformat()} carries no reason")


def _check_site(
    api: httpx.Client, site: str, buckets: Sequence[_Bucket], views: Sequence[Views]
) -> None:
    """Hour-aligned windows read the 1-hour rollups; the site's total over all its data is the
    sum of every bucket, and each equipment's group is its own."""
    lo = _floor(min(b.start for b in buckets), HOUR)
    hi = _ceil(max(b.end for b in buckets), HOUR)
    body = _get(api, "/v1/oee", scope="site", id=site, interval="1h", group_by="equipment",
                **{"from": lo, "to": hi})  # fmt: skip
    if "oee_1h" not in body["source"]:
        raise Mismatch(f"{site}: an hour-aligned window did not read rollups.oee_1h: {body}")
    _same(body["total"]["components"], _sum(buckets), f"{site}: /v1/oee site total (1h)")
    groups = {g["equipment"]: g["total"]["components"] for g in body["groups"]}
    for v in views:
        got = groups.get(v.equipment)
        if got is None:
            raise Mismatch(f"{site}: /v1/oee group_by=equipment lacks {v.equipment}")
        if _qty(got) != v.quantities["facts.oee_buckets"]:
            raise Mismatch(f"{site}/{v.equipment}: /v1/oee 1h group {_qty(got)} != buckets")
        v.quantities["/v1/oee (1h, site)"] = _qty(got)


def closed_until(pg_url: str) -> dict[str, datetime]:
    """The end of the last stored OEE bucket of each equipment: a test lets the agent close
    the bucket holding the last parts it counted before it stops it (a stopped agent keeps
    its open bucket for the next start), so that every count is in a closed bucket."""
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT equipment_id, max(bucket_end) FROM facts.oee_buckets GROUP BY 1"
        ).fetchall()
    return {str(r[0]): r[1] for r in rows}


def stored_quantities(pg_url: str) -> dict[str, tuple[int, int]]:
    """Produced and scrap of each equipment summed over its stored count events."""
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT equipment_id, COALESCE(sum((body->>'produced')::bigint), 0), "
            "COALESCE(sum((body->>'scrap')::bigint), 0) FROM facts.events "
            "WHERE kind = 'count' GROUP BY 1"
        ).fetchall()
    return {str(r[0]): (int(r[1]), int(r[2])) for r in rows}


async def wait_counted(
    pg_url: str,
    truths: Mapping[str, tuple[int, int]],
    after: datetime,
    limit_s: float = 120,
) -> None:
    """Until the cloud holds every part and scrap each PLC counted (`truths`: produced, scrap
    of a PLC that no longer changes) and each equipment has a closed bucket past `after` and
    past its last count.

    What a test waits for before it stops the agent, instead of a fixed sleep: on a loaded
    machine the agent may read the final counters and close the bucket later than usual, and a
    stopped agent keeps its open bucket for its next start."""
    deadline = time.monotonic() + limit_s

    def done() -> bool:
        stored = stored_quantities(pg_url)
        closed = closed_until(pg_url)
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute(
                "SELECT equipment_id, max(ts) FROM facts.events WHERE kind = 'count' GROUP BY 1"
            ).fetchall()
        last_count = {str(r[0]): r[1] for r in rows}
        return all(
            stored.get(m) == truth and closed.get(m, after) > max(after, last_count.get(m, after))
            for m, truth in truths.items()
        )

    while not await asyncio.to_thread(done):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the cloud did not get every counted part within {limit_s:.0f} s: stored "
                f"{stored_quantities(pg_url)}, PLC {dict(truths)}, closed until "
                f"{closed_until(pg_url)}, waiting past {after.isoformat()}"
            )
        await asyncio.sleep(0.3)


def dump_events(pg_url: str, path: Path) -> None:
    """State, count, agent and OEE events as JSON lines: what a failed check looked at, kept
    after the test database is gone."""
    with psycopg.connect(pg_url) as conn, path.open("w", encoding="utf-8") as out:
        for row in conn.execute(
            "SELECT equipment_id, ts, kind, body FROM facts.events "
            "WHERE kind IN ('state', 'count', 'agent', 'oee') ORDER BY equipment_id, ts"
        ):
            out.write(json.dumps([row[0], row[1].isoformat(), row[2], row[3]]) + "\n")


# -- ground truth -----------------------------------------------------------------------------


def compare_with_truth(
    views: Mapping[str, Views], truths: Mapping[str, Truth], *, tolerance_s: float = 0.0
) -> None:
    """Every view's produced, scrap and good equal the PLC's, exactly; every view of downtime
    has the PLC's reasons, each within `tolerance_s` seconds per stop of the PLC's duration
    (the agent sees a change at the source timestamp, or a poll later)."""
    problems = []
    for eq, truth in truths.items():
        v = views.get(eq)
        if v is None:
            problems.append(f"{eq}: no data at all")
            continue
        if truth.produced is not None:
            want = (truth.produced, truth.scrap, truth.good)
            for view, got in v.quantities.items():
                if got != want:
                    problems.append(f"{eq}: {view} says (produced, scrap, good) {got}, PLC {want}")
        if truth.stop_seconds is None:
            continue
        stops = len(truth.stops or ()) or 1
        for view, seconds in v.downtime.items():
            if set(seconds) != set(truth.stop_seconds):
                problems.append(
                    f"{eq}: {view} has downtime reasons {sorted(seconds)}, "
                    f"the PLC {sorted(truth.stop_seconds)}"
                )
                continue
            for reason, plc in truth.stop_seconds.items():
                if abs(seconds[reason] - plc) > tolerance_s * stops:
                    problems.append(
                        f"{eq}: {view} has {seconds[reason]:.3f} s of {reason!r}, PLC {plc:.3f} s"
                    )
    if problems:
        raise Mismatch("\n".join(problems))


def table(views: Mapping[str, Views], truths: Mapping[str, Truth]) -> str:
    """Ground truth against each view, per equipment, as plain text."""
    lines = []
    for eq, v in sorted(views.items()):
        t = truths.get(eq)
        lines.append(f"== {v.site}/{eq}")
        lines.append(f"  {'view':<28} {'produced':>9} {'scrap':>6} {'good':>9}")
        if t is not None and t.produced is not None:
            lines.append(f"  {'PLC ground truth':<28} {t.produced:>9} {t.scrap:>6} {t.good:>9}")
        for view, (p, s, g) in v.quantities.items():
            lines.append(f"  {view:<28} {p:>9} {s:>6} {g:>9}")
        reasons = sorted({r for d in v.downtime.values() for r in d}
                         | set((t.stop_seconds or {}) if t else {}))  # fmt: skip
        lines.append(
            f"  {'downtime seconds by reason':<28} " + "  ".join(f"{r:>12}" for r in reasons)
        )
        if t is not None and t.stop_seconds is not None:
            lines.append(f"  {'PLC ground truth':<28} " + "  ".join(
                f"{t.stop_seconds.get(r, 0.0):>12.3f}" for r in reasons))  # fmt: skip
        for view, d in v.downtime.items():
            lines.append(f"  {view:<28} " + "  ".join(f"{d.get(r, 0.0):>12.3f}" for r in reasons))
        if t is not None and t.stops is not None:
            lines.append(f"  stops set by the PLC:  {list(t.stops)}")
        lines.append(f"  stops in /states:      {v.stops}")
        lines.append(f"  unknown seconds in /states: {v.unknown_s:.3f}")
    return "\n".join(lines)


def report(name: str, views: Mapping[str, Views], truths: Mapping[str, Truth]) -> str:
    """The table, printed (pytest -s shows it) and, with CONFORMANCE_REPORT=DIR, written as
    DIR/<name>.txt and DIR/<name>.json."""
    text = table(views, truths)
    print(f"\n--- {name}: ground truth vs each view ---\n{text}")
    folder = os.environ.get("CONFORMANCE_REPORT")
    if folder:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
        data = {
            eq: {
                "truth": None if eq not in truths else {
                    "produced": truths[eq].produced, "scrap": truths[eq].scrap,
                    "good": truths[eq].good, "stops": truths[eq].stops,
                    "stop_seconds": truths[eq].stop_seconds,
                },
                "quantities": v.quantities,
                "downtime": v.downtime,
                "stops": v.stops,
                "unknown_s": v.unknown_s,
            }
            for eq, v in views.items()
        }  # fmt: skip
        (out / f"{name}.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    return text
