"""Benchmark: one week of 1 Hz samples for 50 machines through the replay path of the engine.

Every second each machine is polled once and yields three samples (state, total_count,
scrap_count), as a 1 Hz Modbus poll does: 50 x 604,800 x 3 = 90.7 million samples. The
samples are generated in memory, an hour at a time, and fed through `agent.replay.ReplayRun`
(the code path of `edge-agent replay` after JSON parsing). Machines are independent, so
the fleet is split over worker processes (one per CPU by default). Besides wall-clock time,
each worker reports its CPU time in total and inside the replay path alone (excluding sample
generation): on a shared machine the CPU figures are the ones that do not depend on load.

Run: `python -m bench.oee [--machines 50] [--days 7] [--workers N]`. The last line of the
output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.config import AgentConfig, parse_config
from agent.replay import ReplayRun
from connectors.sample import Sample
from oee.components import Components, ratios

START = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday
SHIFTS = """
shifts:
  - {name: early, start: "06:00", end: "14:00", days: [mon, tue, wed, thu, fri],
     breaks: [{start: "09:00", end: "09:15"}, {start: "11:30", end: "12:00"}]}
  - {name: late, start: "14:00", end: "22:00", days: [mon, tue, wed, thu, fri],
     breaks: [{start: "18:00", end: "18:30"}]}
  - {name: night, start: "22:00", end: "06:00", days: [sun, mon, tue, wed, thu]}
"""


def fleet_config(machines: int) -> AgentConfig:
    lines = ["agent: {id: bench, site: bench-plant, timezone: Europe/Berlin}", SHIFTS, "equipment:"]
    for m in range(machines):
        lines.append(
            f"  - {{id: m{m:03d}, ideal_cycle_time: 800ms, micro_stop_threshold: 2m,\n"
            "     signals: {state: {map: {0: idle, 1: running, 2: fault, 3: setup}},\n"
            "               total_count: {type: uint16}, scrap_count: {type: uint16},\n"
            "               reason: {map: {1: no material, 2: jam}}}}"
        )
    return parse_config("\n".join(lines), "<bench>")


def _timeline(seed: int, seconds: int) -> list[tuple[int, int]]:
    """(second, state code) change points: mostly running, some micro-stops and faults."""
    rng = random.Random(seed)
    changes: list[tuple[int, int]] = []
    t = 0
    while t < seconds:
        changes.append((t, 1))
        t += rng.randint(300, 5400)
        kind = rng.random()
        state = 2 if kind < 0.5 else (0 if kind < 0.85 else 3)
        changes.append((t, state))
        t += rng.randint(20, 900)
    return changes


def run_group(machines: list[int], total_machines: int, seconds: int) -> dict[str, Any]:
    """Generate and replay the samples of some machines; times only the replay path."""
    config = fleet_config(total_machines)
    ids = [f"m{m:03d}" for m in machines]
    run = ReplayRun(config, START, START + timedelta(seconds=seconds), keep_buckets=False)
    for eq in list(run.engines):
        if eq not in ids:
            del run.engines[eq]  # this worker replays only its share of the fleet
            del run.tally[eq]
    timelines = {eq: _timeline(m, seconds) for eq, m in zip(ids, machines, strict=True)}
    cursor = dict.fromkeys(ids, 0)
    state = dict.fromkeys(ids, 1)
    total = dict.fromkeys(ids, 0)
    scrap = dict.fromkeys(ids, 0)
    engine_s = 0.0
    engine_cpu = 0.0
    cpu_began = time.process_time()
    count = 0
    line = 0
    feed = run.feed
    hour = 3600
    for chunk_start in range(0, seconds, hour):
        chunk: list[Sample] = []
        append = chunk.append
        for s in range(chunk_start, min(chunk_start + hour, seconds)):
            ts = START + timedelta(seconds=s)
            for eq in ids:
                points = timelines[eq]
                i = cursor[eq]
                while i < len(points) and points[i][0] <= s:
                    state[eq] = points[i][1]
                    i += 1
                cursor[eq] = i
                if state[eq] == 1:
                    total[eq] = (total[eq] + 1) & 0xFFFF
                    if s % 97 == 0:
                        scrap[eq] = (scrap[eq] + 1) & 0xFFFF
                append(Sample(eq, "state", state[eq], ts))
                append(Sample(eq, "total_count", total[eq], ts))
                append(Sample(eq, "scrap_count", scrap[eq], ts))
        began, began_cpu = time.perf_counter(), time.process_time()
        for sample in chunk:
            line += 1
            feed(sample, line)
        engine_s += time.perf_counter() - began
        engine_cpu += time.process_time() - began_cpu
        count += len(chunk)
    began, began_cpu = time.perf_counter(), time.process_time()
    run.finish()
    engine_s += time.perf_counter() - began
    engine_cpu += time.process_time() - began_cpu
    pooled = Components.pool(t.components for t in run.tally.values())
    return {
        "samples": count,
        "engine_seconds": engine_s,
        "engine_cpu_seconds": engine_cpu,
        "cpu_seconds": time.process_time() - cpu_began,
        "components": pooled.as_dict(),
        "warnings": run.warnings_total,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.oee", description=__doc__)
    parser.add_argument("--machines", type=int, default=50)
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    seconds = int(args.days * 86_400)
    workers = max(1, min(args.workers, args.machines))
    groups = [list(range(args.machines))[w::workers] for w in range(workers)]
    began = time.perf_counter()
    if workers == 1:
        results = [run_group(groups[0], args.machines, seconds)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(run_group, g, args.machines, seconds) for g in groups]
            results = [f.result() for f in futures]
    wall = time.perf_counter() - began
    samples = sum(r["samples"] for r in results)
    engine_cpu = sum(r["engine_cpu_seconds"] for r in results)
    cpu = sum(r["cpu_seconds"] for r in results)
    pooled = Components.pool(Components(**r["components"]) for r in results)
    r = ratios(pooled)
    report = {
        "bench": "oee",
        "machines": args.machines,
        "days": args.days,
        "workers": workers,
        "samples": samples,
        "seconds": round(wall, 3),
        "samples_per_second": round(samples / wall),
        "cpu_seconds": round(cpu, 3),
        "engine_cpu_seconds": round(engine_cpu, 3),
        "engine_samples_per_cpu_second": round(samples / engine_cpu),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "warnings": sum(r["warnings"] for r in results),
        "oee": r.oee,
        "availability": r.availability,
        "performance": r.performance,
        "quality": r.quality,
    }
    print(json.dumps(report), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
