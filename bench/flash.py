"""Benchmark: what the agent writes to its storage, against what happens on the line.

The real `edge-agent run` process reads 100 simulated Modbus presses (one pymodbus server in
a child process, units 1..100: state, 32-bit part total, 32-bit scrap, reason; polled at
1 Hz; a part every 2-5 s per running press) in three modes, each for `--seconds`:
- `unreachable`: the broker port refuses connections, batches pile up in the outbox;
- `acknowledging`: the machine's Mosquitto and a `cloud-api ingest` process storing into a
  fresh PostgreSQL database, so batches are acked and deleted;
- `idle`: every press stopped (idle, nothing counted), cloud unreachable.

For each mode, after a warm-up (45 s: longer than the presses' 30 s micro-stop threshold,
so the stops that began when the agent started are judged, and committed, before the
window): bytes written per minute by the agent process
(/proc/PID/io write_bytes, which counts the 4 KiB pages it dirtied in the page cache, i.e.
what the kernel must write to the device), fsyncs per minute (strace -f -c on the process
when strace can attach; the agent's own counter otherwise), sealed event bytes per minute
(the envelopes the outbox stored) and their ratio, the write amplification. The floor,
measured in the same run: a plain sqlite3 table (WAL, synchronous=FULL, nothing else)
committing batches of the same sizes once a second in a child process, its write_bytes
(each second's batches as the agent's /metrics counted them: how many, and their bytes
shared equally among them; the running agent holds its outbox exclusively, so the file
cannot be read beside it).

Run: `python -m bench.flash [--seconds 180] [--warmup 45] [--modes unreachable,acknowledging,idle]`.
Uses the machine's Mosquitto and PostgreSQL for `acknowledging` (a fresh database, dropped
afterwards). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.plant import Plant, metrics, start_agent, stop_process

MACHINES = 100
AGENT, SITE = "edge-flash-01", "plant-flash"
TARGETS = {
    "running_bytes_per_min": 1_000_000,
    "idle_bytes_per_min": 50_000,
    "write_amplification": 10,
    "times_floor": 3,
}


def _floor(path: str, schedule: list[list[int]], out: Any) -> None:
    """The floor (child process): the same batch sizes committed once a second, nothing else."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE batches (seq INTEGER PRIMARY KEY, envelope BLOB NOT NULL)")
    before = _write_bytes(os.getpid())
    started = time.monotonic()
    for i, sizes in enumerate(schedule):
        if sizes:
            conn.execute("BEGIN")
            for size in sizes:
                conn.execute("INSERT INTO batches(envelope) VALUES (?)", (os.urandom(size),))
            conn.execute("COMMIT")
        delay = started + i + 1 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    conn.close()
    out.send(_write_bytes(os.getpid()) - before)


def _write_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/io").read_text()
    match = re.search(r"^write_bytes: (\d+)$", text, re.M)
    assert match is not None, text
    return int(match.group(1))


class BatchWatch:
    """The batches the agent stores, second by second, for the floor: read from its /metrics
    (batches stored and their sealed bytes), since the running agent holds its outbox
    exclusively. A second with n batches of b bytes in all gives the floor n batches of
    about b / n bytes each."""

    def __init__(self, health_port: int) -> None:
        self.health_port = health_port
        self.per_second: list[list[int]] = []
        self._last: tuple[float, float] | None = None

    def _read(self) -> tuple[float, float] | None:
        m = metrics(self.health_port)
        batches = m.get("edge_agent_outbox_batches_stored_total")
        sealed = m.get("edge_agent_outbox_sealed_bytes_total")
        return None if batches is None or sealed is None else (batches, sealed)

    def start(self) -> None:
        self._last = self._read()
        self.per_second = []

    def second(self) -> None:
        now = self._read()
        sizes: list[int] = []
        if now is not None and self._last is not None:
            n, total = int(now[0] - self._last[0]), int(now[1] - self._last[1])
            if n > 0:
                sizes = [total // n + (1 if i < total % n else 0) for i in range(n)]
        if now is not None:
            self._last = now
        self.per_second.append(sizes)


def _strace(pid: int) -> subprocess.Popen[str] | None:
    if shutil.which("strace") is None:
        return None
    proc = subprocess.Popen(
        ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync", "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    if proc.poll() is not None:
        return None  # no ptrace here (a container without CAP_SYS_PTRACE)
    return proc


def _strace_count(proc: subprocess.Popen[str]) -> int | None:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    total = 0
    found = False
    for line in err.splitlines():
        parts = line.split()
        if parts and parts[-1] in ("fsync", "fdatasync"):
            total += int(parts[3])
            found = True
    return total if found else (0 if "total" in err else None)


def run_mode(mode: str, seconds: float, warmup: float, folder: Path) -> dict[str, Any]:
    plant = Plant.set_up(
        folder,
        agent=AGENT,
        site=SITE,
        machines=MACHINES,
        acknowledging=mode == "acknowledging",
        db_prefix="bench_flash",
        idle=mode == "idle",
    )
    health_port, cloud = plant.health_port, plant.cloud
    agent: subprocess.Popen[bytes] | None = None
    watch = BatchWatch(health_port)
    try:
        agent = start_agent(plant.config, folder / "agent.log")
        end_warmup = time.monotonic() + warmup
        while time.monotonic() < end_warmup:
            time.sleep(0.1)
        if agent.poll() is not None:
            raise RuntimeError((folder / "agent.log").read_text()[-3000:])
        tracer = _strace(agent.pid)
        m0 = metrics(health_port)
        b0 = _write_bytes(agent.pid)
        watch.start()
        t0 = time.monotonic()
        next_second = t0 + 1
        while (now := time.monotonic()) < t0 + seconds:
            if now >= next_second:
                watch.second()
                next_second += 1
            time.sleep(0.05)
        b1 = _write_bytes(agent.pid)
        m1 = metrics(health_port)
        elapsed = time.monotonic() - t0
        fsyncs_strace = _strace_count(tracer) if tracer is not None else None
        stored = cloud.stored_batches() if cloud is not None else None
    finally:
        stop_process(agent)
        plant.close()
    per_min = 60.0 / elapsed
    sealed_metric = m1.get("edge_agent_outbox_sealed_bytes_total")
    if sealed_metric is not None and "edge_agent_outbox_sealed_bytes_total" in m0:
        sealed = sealed_metric - m0["edge_agent_outbox_sealed_bytes_total"]
        sealed_source = "agent counter"
    else:
        sealed = float(sum(sum(sizes) for sizes in watch.per_second))
        sealed_source = "per-second metrics"
    fsync_metric = m1.get("edge_agent_outbox_fsyncs_total")
    fsyncs_agent = None
    if fsync_metric is not None and "edge_agent_outbox_fsyncs_total" in m0:
        fsyncs_agent = fsync_metric - m0["edge_agent_outbox_fsyncs_total"]
    written = b1 - b0
    floor_path = folder / "floor.db"
    parent, child = multiprocessing.get_context("spawn").Pipe()
    floor_proc = multiprocessing.get_context("spawn").Process(
        target=_floor, args=(str(floor_path), watch.per_second, child)
    )
    floor_proc.start()
    floor_bytes = parent.recv()
    floor_proc.join(30)
    floor_elapsed = max(1, len(watch.per_second))
    result: dict[str, Any] = {
        "mode": mode,
        "seconds": round(elapsed, 1),
        "bytes_per_min": round(written * per_min),
        "fsyncs_per_min": None if fsyncs_strace is None else round(fsyncs_strace * per_min, 1),
        "fsyncs_per_min_agent_counter": None
        if fsyncs_agent is None
        else round(fsyncs_agent * per_min, 1),
        "sealed_bytes_per_min": round(sealed * per_min),
        "sealed_source": sealed_source,
        "write_amplification": round(written / sealed, 2) if sealed else None,
        "floor_bytes_per_min": round(floor_bytes * 60.0 / floor_elapsed),
        "times_floor": round((written * per_min) / (floor_bytes * 60.0 / floor_elapsed), 2)
        if floor_bytes
        else None,
        "outbox_bytes_written_per_min_agent_counter": None
        if "edge_agent_outbox_written_bytes_total" not in m1
        else round(
            (
                m1["edge_agent_outbox_written_bytes_total"]
                - m0.get("edge_agent_outbox_written_bytes_total", 0.0)
            )
            * per_min
        ),
    }
    if stored is not None:
        result["batches_stored_in_cloud"] = stored
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0, help="measured, per mode")
    parser.add_argument("--warmup", type=float, default=45.0, help="before measuring, per mode")
    parser.add_argument("--modes", default="unreachable,acknowledging,idle")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-flash-") as tmp:
        for mode in modes:
            result = run_mode(mode, args.seconds, args.warmup, Path(tmp) / mode)
            results.append(result)
            print(
                f"{mode:>13}: {result['bytes_per_min'] / 1000:8.1f} kB/min written, "
                f"{result['fsyncs_per_min']} fsyncs/min, "
                f"{result['sealed_bytes_per_min'] / 1000:6.1f} kB/min sealed, "
                f"amplification {result['write_amplification']}, "
                f"floor {result['floor_bytes_per_min'] / 1000:.1f} kB/min "
                f"(x{result['times_floor']})",
                flush=True,
            )
    print(
        json.dumps({"bench": "flash", "machines": MACHINES, "modes": results, "targets": TARGETS})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
