"""Benchmark: the agent's footprint, memory and CPU, with Modbus only.

The real `edge-agent run` process reads 20, 100 and 300 simulated Modbus presses (pymodbus
servers in a child process, 100 presses per server as one PLC per line; state, 32-bit part
total, 32-bit scrap, reason; polled at 1 Hz; bench/plant.py). For each size, with a cloud
that acknowledges (the machine's Mosquitto and `cloud-api ingest` into a fresh PostgreSQL
database): resident memory 60 s after start (/proc/PID/status VmRSS), its peak (VmHWM) at
the end of `--seconds`, and the CPU share of one core from 20 s after start to the end
(/proc/PID/stat utime + stime).

Then `--unreachable-seconds` with 100 presses and the broker port refusing connections, so
every batch waits in the outbox: resident memory every 5 s, the least-squares slope in MB
per minute after the first two minutes (the engine and the caches warm up), and the outbox's
size on disk, which is where the waiting data belongs; and the same slope over the second
half alone.

Before both, the import floor: the RSS each layer of the agent's imports adds in a fresh
interpreter (`import_floor_mb`); after the sizes, the kB each machine adds (`kb_per_machine`).

Part of the resident memory is pages of the shared libraries the agent maps (`rss_file_mb_end`),
and how many of those pages a start maps depends on what the page cache holds: the kernel
maps the cached pages around each page fault (fault-around), and the venv's files are all in
the cache right after pip wrote them. So by default (`--page-cache cold`) the agent's own
installed files (the venv and the project's packages) are evicted from the cache
(posix_fadvise DONTNEED) before each agent start and before the import floor, as on a box
after a reboot, and every run starts from the same state; `warm` leaves the cache as it is.
Shared system libraries (libpython, libc, OpenSSL) are left alone: other processes use them.

The agent runs from a virtual environment with the project's own dependencies only (no test
tools), as it is installed on an edge box: `var/bench-agent-venv`, created on first use and
byte-compiled as deploy/install-edge.sh does. `--venv current` runs the interpreter's own
`edge-agent` instead. It runs with the `Environment=` settings of the shipped unit,
systemd/edge-agent.service (PYTHONOPTIMIZE=2 among them); `--no-unit-env` leaves them out.

Run: `python -m bench.agent [--machines 20,100,300] [--seconds 90] [--unreachable-seconds
600] [--runs 1] [--venv bench|current] [--no-unit-env] [--page-cache warm|cold]`. Uses the
machine's Mosquitto and PostgreSQL (a fresh database per size, dropped afterwards). The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.plant import Plant, plc_count, start_agent, stop_process

AGENT, SITE = "edge-footprint-01", "plant-footprint"
ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "var" / "bench-agent-venv"
UNIT = ROOT / "systemd" / "edge-agent.service"
PACKAGES = ("agent", "buffer", "common", "connectors", "oee", "sync")
TARGETS = {"rss_mb_at_100": 50.0, "cpu_percent_at_100": 5.0, "unreachable_mb_per_min": 0.05}
CPU_FROM_S = 20.0
RSS_AT_S = 60.0
SLOPE_FROM_S = 120.0
TICK = os.sysconf("SC_CLK_TCK")


def agent_venv(choice: str) -> Path:
    """The folder holding `edge-agent`: the current interpreter's, or a venv with the
    project's runtime dependencies only (what an edge box installs)."""
    if choice == "current":
        return Path(sys.executable).parent
    bin_dir = VENV / "bin"
    stamp = VENV / ".installed"
    pyproject = ROOT / "pyproject.toml"
    if not stamp.exists() or stamp.stat().st_mtime < pyproject.stat().st_mtime:
        print(f"installing the agent into {VENV} (runtime dependencies only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run(
            [*pip, "--config-settings", "editable_mode=compat", "-e", str(ROOT)], check=True
        )
        stamp.touch()
    # As install-edge.sh does: .pyc files for plain and -OO runs (the unit's PYTHONOPTIMIZE).
    # Up-to-date files are skipped; the project's own packages are installed editable.
    python = str(bin_dir / "python")
    folders = [*(str(p) for p in (VENV / "lib").glob("python3*")), *PACKAGES]
    for flags in ([], ["-OO"]):
        subprocess.run([python, *flags, "-m", "compileall", "-q", *folders], check=True, cwd=ROOT)
    return bin_dir


def unit_environment(unit: Path = UNIT) -> dict[str, str]:
    """The `Environment=NAME=VALUE ...` settings of the agent's systemd unit."""
    env: dict[str, str] = {}
    for raw in unit.read_text(encoding="utf-8").splitlines():
        key, _, value = raw.strip().partition("=")
        if key == "Environment":
            for pair in value.split():
                name, _, setting = pair.partition("=")
                env[name] = setting.strip('"')
    return env


# What `edge-agent run` imports, in layers: each step's RSS growth is what that layer adds
# on top of the ones before (shared imports count where they first come). pydantic and
# PyYAML are not among them: the agent's configuration is parsed and validated in a child
# process (agent.configcheck).
IMPORT_LAYERS = (
    ("interpreter", ""),
    ("asyncio, ssl, sqlite3, json, logging", "import asyncio, ssl, sqlite3, json, logging"),
    ("structlog", "import structlog"),
    ("cryptography (HPKE, Ed25519, ML-KEM)", "import sync.keys"),
    ("zstandard, envelope", "import sync.envelope"),
    ("paho-mqtt", "import paho.mqtt.client"),
    ("pymodbus, pyserial", "import pymodbus.client"),
    (
        "the agent's configuration (dataclasses; pydantic validates them in a child)",
        "import agent.config",
    ),
    (
        "the rest of the agent",
        "import agent.cli, agent.service, agent.runtime, agent.health, "
        "agent.statelock, connectors.modbus.hub",
    ),
)

IMPORT_PROBE = """
import json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
out = []
for name, code in json.loads(sys.argv[1]):
    before = rss()
    exec(code)
    out.append([name, round(rss() - before if code else before, 1)])
print(json.dumps(out))
"""


def import_floor(bin_dir: Path, env: dict[str, str]) -> dict[str, float]:
    """RSS (MB) each layer of the agent's imports adds, in a fresh interpreter of its venv
    (with the agent's environment)."""
    done = subprocess.run(
        [str(bin_dir / "python"), "-c", IMPORT_PROBE, json.dumps(IMPORT_LAYERS)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, **env},
    )
    layers = {str(k): float(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1])}
    layers["total"] = round(sum(layers.values()), 1)
    return layers


def status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def evict_from_page_cache(folders: list[Path]) -> int:
    """Drop the cached pages of every file under `folders` (those no process maps); returns
    the number of files. Only clean pages go: nothing is written and no file changes."""
    count = 0
    for folder in folders:
        for path in folder.rglob("*"):
            if not path.is_file() or path.is_symlink():
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count


def agent_files(bin_dir: Path) -> list[Path]:
    """What the agent loads of its own: its venv's libraries and the project's packages."""
    return [*bin_dir.parent.glob("lib/python3*"), *(ROOT / p for p in PACKAGES)]


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var if var else 0.0


@dataclass
class AgentRun:
    """One agent process over the simulated plant; samples memory and CPU while it runs."""

    folder: Path
    bin_dir: Path
    machines: int
    acknowledging: bool
    env: dict[str, str]
    cold: bool = False
    rss: list[tuple[float, float]] = field(default_factory=list)

    def run(self, seconds: float, every: float) -> dict[str, Any]:
        plant = Plant.set_up(
            self.folder,
            agent=AGENT,
            site=SITE,
            machines=self.machines,
            acknowledging=self.acknowledging,
            db_prefix="bench_agent",
        )
        state, cloud = plant.state, plant.cloud
        log = self.folder / "agent.log"
        agent: subprocess.Popen[bytes] | None = None
        result: dict[str, Any] = {"machines": self.machines, "plcs": plc_count(self.machines)}
        try:
            if self.cold:
                result["files_evicted"] = evict_from_page_cache(agent_files(self.bin_dir))
            agent = start_agent(plant.config, log, self.bin_dir, self.env)
            started = time.monotonic()
            cpu_from: tuple[float, float] | None = None
            rss_at: float | None = None
            next_sample = started
            while (now := time.monotonic()) < started + seconds:
                if agent.poll() is not None:
                    raise RuntimeError(log.read_text()[-3000:])
                elapsed = now - started
                if cpu_from is None and elapsed >= CPU_FROM_S:
                    cpu_from = (now, cpu_seconds(agent.pid))
                if now >= next_sample:
                    self.rss.append((elapsed, status_kb(agent.pid)["VmRSS"] / 1024))
                    next_sample += every
                if rss_at is None and elapsed >= RSS_AT_S:
                    rss_at = status_kb(agent.pid)["VmRSS"] / 1024
                time.sleep(0.2)
            end = time.monotonic()
            cpu_end = cpu_seconds(agent.pid)
            mem = status_kb(agent.pid)
            result["loadavg"] = loadavg()
            result["rss_mb_at_60s"] = None if rss_at is None else round(rss_at, 1)
            result["rss_mb_end"] = round(mem["VmRSS"] / 1024, 1)
            result["peak_rss_mb"] = round(mem["VmHWM"] / 1024, 1)
            # Private (heap, Python objects) and file-backed (shared libraries' pages).
            result["rss_anon_mb_end"] = round(mem["RssAnon"] / 1024, 1)
            result["rss_file_mb_end"] = round(mem["RssFile"] / 1024, 1)
            if cpu_from is not None:
                share = (cpu_end - cpu_from[1]) / (end - cpu_from[0])
                result["cpu_percent_one_core"] = round(100 * share, 2)
            outbox = state / "outbox.db"
            on_disk = sum(p.stat().st_size for p in state.glob("outbox.db*") if p.is_file())
            result["outbox_mb_on_disk"] = round(on_disk / 1e6, 2) if outbox.exists() else 0.0
            if cloud is not None:
                result["batches_stored_in_cloud"] = cloud.stored_batches()
        finally:
            stop_process(agent)
            plant.close()
        return result


def sizes_run(
    bin_dir: Path, tmp: Path, machines: int, seconds: float, env: dict[str, str], cold: bool
) -> dict[str, Any]:
    folder = tmp / f"m{machines}-{secrets.token_hex(2)}"
    run = AgentRun(folder, bin_dir, machines, True, env, cold)
    return run.run(seconds, every=1.0)


def unreachable_run(
    bin_dir: Path, tmp: Path, seconds: float, env: dict[str, str], cold: bool
) -> dict[str, Any]:
    run = AgentRun(tmp / f"unreachable-{secrets.token_hex(2)}", bin_dir, 100, False, env, cold)
    result = run.run(seconds, every=5.0)
    window = [(t, v) for t, v in run.rss if t >= SLOPE_FROM_S]
    result["seconds"] = seconds
    result["rss_mb_at_slope_start"] = round(window[0][1], 1) if window else None
    # The second half alone: whether what grows early (caches filling) levels off.
    late = [(t, v) for t, v in run.rss if t >= seconds / 2]
    for key, points in (("rss_mb_per_min", window), ("rss_mb_per_min_second_half", late)):
        spans_a_minute = len(points) > 1 and points[-1][0] - points[0][0] >= 60
        result[key] = round(60 * slope(points), 4) if spans_a_minute else None
    result["rss_trace_mb"] = [[round(t), round(v, 2)] for t, v in run.rss[:: max(1, 12)]]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", default="20,100,300", help="sizes, comma-separated")
    parser.add_argument("--seconds", type=float, default=90.0, help="per size (at least 60)")
    parser.add_argument(
        "--unreachable-seconds",
        type=float,
        default=600.0,
        help="the run with the cloud unreachable (0: skip); the slope starts at 120 s",
    )
    parser.add_argument("--runs", type=int, default=1, help="repeat each measurement")
    parser.add_argument(
        "--venv", default="bench", help="'bench' (runtime dependencies only) or 'current'"
    )
    parser.add_argument(
        "--no-unit-env",
        action="store_true",
        help="run the agent without the Environment= settings of systemd/edge-agent.service",
    )
    parser.add_argument(
        "--page-cache",
        choices=("warm", "cold"),
        default="cold",
        help="cold: evict the agent's own files from the page cache before each start (as "
        "after a reboot); warm: leave the cache as it is",
    )
    args = parser.parse_args(argv)
    cold = args.page_cache == "cold"
    sizes = [int(m) for m in args.machines.split(",") if m.strip()]
    bin_dir = agent_venv(args.venv)
    env = {} if args.no_unit_env else unit_environment()
    out: dict[str, Any] = {"bench": "agent", "venv": str(bin_dir.parent), "sizes": []}
    out["agent_environment"] = env
    out["page_cache"] = args.page_cache
    if cold:
        evict_from_page_cache(agent_files(bin_dir))
    out["import_floor_mb"] = import_floor(bin_dir, env)
    print("imports (MB):", json.dumps(out["import_floor_mb"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        for machines in sizes:
            for _ in range(args.runs):
                seconds = max(args.seconds, RSS_AT_S + 5)
                r = sizes_run(bin_dir, Path(tmp), machines, seconds, env, cold)
                out["sizes"].append(r)
                print(
                    f"{machines:4d} machines: {r['rss_mb_at_60s']} MB at 60 s, "
                    f"peak {r['peak_rss_mb']} MB, {r.get('cpu_percent_one_core')} % of a core "
                    f"(loadavg {r['loadavg']})",
                    flush=True,
                )
        if args.unreachable_seconds > 0:
            out["unreachable"] = []
            for _ in range(args.runs):
                r = unreachable_run(bin_dir, Path(tmp), args.unreachable_seconds, env, cold)
                out["unreachable"].append(r)
                print(
                    f"cloud unreachable {args.unreachable_seconds:.0f} s: "
                    f"{r['rss_mb_per_min']} MB/min from {r['rss_mb_at_slope_start']} MB "
                    f"({r['rss_mb_per_min_second_half']} MB/min in the second half), "
                    f"outbox {r['outbox_mb_on_disk']} MB on disk (loadavg {r['loadavg']})",
                    flush=True,
                )
    per_size = [(r["machines"], r["rss_mb_at_60s"]) for r in out["sizes"] if r["rss_mb_at_60s"]]
    if len({m for m, _ in per_size}) > 1:
        # The least-squares slope of resident memory over machines, in kB a machine.
        out["kb_per_machine"] = round(1000 * slope(per_size), 1)
    out["targets"] = TARGETS
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
