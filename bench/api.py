"""Benchmark of the query API over one year of 1-minute data for 20 machines on 2 sites.

Load: 10,512,000 OEE buckets (one per machine and minute of 2025) go through the ingest's
database path in large transactions: COPY into the ingest's staging table, then the same
statements ingest runs (facts.oee_buckets ON CONFLICT, 1-minute and 1-hour rollup upserts,
data versions). The database `bench_api` is kept and reused when complete (`--fresh` drops
it).

Measure (uvicorn on a free local port, `--workers` processes):
- latency, sequential, result cache bypassed (`Cache-Control: no-cache`): one machine's OEE
  over the year by month; one site's OEE over 30 days by day and machine;
- throughput: 32 concurrent keep-alive clients (wrk) asking 7-day OEE for random machines
  and random closed weeks, once bypassing the result cache and once using it;
- concurrency: 1,000 simultaneous keep-alive clients for `--hold` seconds, once bypassing the
  result cache and once using it.
Each load run also reports where the CPU went: milliseconds of CPU per answered request in
the API's worker processes and in the database's backends, and the share of a core wrk used
(the generator is not the bottleneck while that stays well below one core). `targets` sums
up the figures against the ones the product answers to.

wrk is installed with apt-get when it is missing and we are root on Debian/Ubuntu (as
`make test` installs its tools); otherwise the benchmark says what to install.

wrk runs one thread (it drives far more than these rates from one core). With two, on a
2-core machine where two API workers already use most of both cores, wrk's own threads got
too little CPU now and then, and the answers they read late counted as slow: p99 of the
1,000-client run varied from 0.3 to 5 s between identical runs, against 0.3-0.4 s with one.

Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from cloud_api.access.auth import TokenKeyring, generate_token_key, issue_token
from cloud_api.config import SecuritySettings
from cloud_api.db import migrate
from cloud_api.ingest import derived
from cloud_api.ingest.worker import BUCKET_COLS, STORE_BUCKETS
from oee.events import AgentEvent

ADMIN = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
DB = "bench_api"
YEAR_START = datetime(2025, 1, 1, tzinfo=UTC)
YEAR_END = datetime(2026, 1, 1, tzinfo=UTC)
SITES = {"site-a": "Europe/Berlin", "site-b": "America/Chicago"}
MACHINES_PER_SITE = 10
REASONS = ("no material", "tool change", "jam", "operator")
TZ = "Europe/Berlin"


def machines() -> list[tuple[str, str, str]]:
    """(site, line, equipment) of the 20 machines."""
    return [
        (site, f"{site}-line-{i % 2 + 1}", f"{site}-m{i:02d}")
        for site in SITES
        for i in range(MACHINES_PER_SITE)
    ]


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(f"{ADMIN}/postgres", autocommit=True)


def prepare(fresh: bool) -> str:
    url = f"{ADMIN}/{DB}"
    with _admin() as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB,)).fetchone()
        if exists and fresh:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(DB)))
            exists = None
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB)))
    migrate(url)
    return url


def register(url: str) -> None:
    with psycopg.connect(url) as conn, conn.transaction():
        for site, tz in SITES.items():
            agent = f"agent-{site}"
            conn.execute(
                "INSERT INTO registry.sites(site_id, timezone) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING",
                (site, tz),
            )
            conn.execute(
                "INSERT INTO registry.agents(agent_id, site_id) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING",
                (agent, site),
            )
            equipment = [
                {"id": eq, "line": line, "reasons": {str(c): r for c, r in enumerate(REASONS, 1)}}
                for s, line, eq in machines()
                if s == site
            ]
            config = AgentEvent(
                agent_id=agent,
                site_id=site,
                ts=YEAR_START,
                code=derived.CONFIG_CODE,
                message="configuration",
                data={"timezone": tz, "shifts": [], "equipment": equipment},
            )
            derived.record_batch(conn, [config], has_buckets=False)


def _month_rows(site: str, equipment: str, start: datetime, end: datetime, rng: random.Random):  # type: ignore[no-untyped-def]
    t = start
    minute = timedelta(minutes=1)
    while t < end:
        shift_start = t.replace(hour=t.hour - t.hour % 8, minute=0)
        shift = ("night", "early", "late")[t.hour // 8]
        down = rng.random() < 0.12
        setup = not down and rng.random() < 0.03
        production = 0.0 if down or setup else 60.0
        produced = rng.randint(50, 60) if production else 0
        scrap = rng.randint(0, 2) if produced else 0
        fault = 60.0 if down and rng.random() < 0.5 else 0.0
        idle = 60.0 if down and not fault else 0.0
        reasons = json.dumps({rng.choice(REASONS): 60.0}) if down else "{}"
        yield (
            site, equipment, t, t + minute, uuid.UUID(bytes=os.urandom(16)), shift, shift_start,
            60.0, production, 60.0 if setup else 0.0, fault + idle, fault, idle, 0.0, 0.0, 0.0,
            0.0, produced - scrap, scrap, 0, 0, produced * 1.0, (produced - scrap) * 1.0,
            produced, 1 if fault else 0, 0, reasons,
        )  # fmt: skip
        t += minute


# Column order of BUCKET_COLS as the generator yields it.
_GEN_COLS = (
    "site_id", "equipment_id", "bucket_start", "bucket_end", "event_id", "shift", "shift_start",
    "planned_busy_s", "production_s", "setup_s", "downtime_s", "fault_s", "idle_s",
    "micro_stop_s", "unknown_s", "planned_down_s", "off_plan_s", "good", "scrap", "rework",
    "off_plan_produced", "ideal_produced_s", "ideal_good_s", "produced", "fault_stops",
    "micro_stops", "downtime_by_reason",
)  # fmt: skip


def load(url: str) -> dict[str, Any]:
    """Load the missing months; returns load figures."""
    assert set(_GEN_COLS) == set(BUCKET_COLS)
    rng = random.Random(6)
    loaded = 0
    started = time.perf_counter()
    months = []
    m = YEAR_START
    while m < YEAR_END:
        nxt = m.replace(year=m.year + 1, month=1) if m.month == 12 else m.replace(month=m.month + 1)
        months.append((m, nxt))
        m = nxt
    with psycopg.connect(url) as conn:
        for lo, hi in months:
            for site in SITES:
                done = conn.execute(
                    "SELECT count(*) FROM rollups.oee_1m WHERE site_id = %s AND bucket >= %s "
                    "AND bucket < %s",
                    (site, lo, hi),
                ).fetchone()
                expected = MACHINES_PER_SITE * int((hi - lo).total_seconds() // 60)
                if done and done[0] == expected:
                    continue
                if done and done[0]:
                    raise SystemExit(f"{site} {lo:%Y-%m} is partly loaded: rerun with --fresh")
                t0 = time.perf_counter()
                conn.execute("SELECT ops.ensure_month_partitions(%s)", (lo + timedelta(days=14),))
                conn.commit()
                with conn.transaction():
                    conn.execute(
                        "CREATE TEMP TABLE IF NOT EXISTS _new_buckets (LIKE facts.oee_buckets) "
                        "ON COMMIT DELETE ROWS"
                    )
                    with conn.cursor().copy(
                        sql.SQL("COPY _new_buckets ({}) FROM STDIN").format(
                            sql.SQL(", ").join(map(sql.Identifier, _GEN_COLS))
                        )
                    ) as copy:
                        for s, _line, eq in machines():
                            if s == site:
                                for row in _month_rows(site, eq, lo, hi, rng):
                                    copy.write_row(row)
                    conn.execute(STORE_BUCKETS)
                    derived.record_batch(conn, [], has_buckets=True)
                loaded += expected
                print(
                    f"loaded {site} {lo:%Y-%m}: {expected} buckets in "
                    f"{time.perf_counter() - t0:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    with psycopg.connect(url, autocommit=True) as conn:
        if loaded:
            conn.execute("ANALYZE")
        # Pages dirtied by the checks above (hint bits) are written now, not by a checkpoint
        # in the middle of the measurements.
        conn.execute("CHECKPOINT")
        total = conn.execute("SELECT count(*) FROM rollups.oee_1m").fetchone()
    elapsed = time.perf_counter() - started
    return {
        "buckets_loaded_now": loaded,
        "load_s": round(elapsed, 1),
        "load_buckets_per_s": round(loaded / elapsed) if loaded else None,
        "rollup_1m_rows": total[0] if total else 0,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bearer_tokens(keys_dir: Path, n: int) -> list[str]:
    """`n` service tokens seeing every site. Each request carries one of them at random, so
    no principal leaves its rate-limit tier (100,000 an hour, bursts of 1,000) and the
    figures measure the query path, not the rate limiter; `ok_rps` counts 2xx answers only."""
    generate_token_key(keys_dir)
    ring = TokenKeyring.load(keys_dir)
    return [
        issue_token(ring, SecuritySettings(), subject=f"bench-client-{i}", role="service",
                    sites=["*"], ttl=timedelta(hours=2))[0]
        for i in range(n)
    ]  # fmt: skip


def serve(url: str, workers: int, keys_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "CLOUD_DATABASE_URL": url, "CLOUD_KEYS_DIR": str(keys_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud_api.cli", "serve", "--host", "127.0.0.1", "--port",
         str(port), "--workers", str(workers), "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            # Every worker listening (each on its own socket), else the first load run's
            # connections all go to the workers that started first.
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200 and (
                listening_sockets(port) >= workers
            ):
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the API did not become ready")


def listening_sockets(port: int) -> int:
    out = subprocess.run(
        ["ss", "-tlnH", f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    return len(out.splitlines())


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def sequential(base: str, n: int, token: str) -> dict[str, Any]:
    rng = random.Random(1)
    eqs = [eq for _s, _l, eq in machines()]
    out: dict[str, Any] = {}
    queries = {
        "machine_year_by_month": lambda: {
            "scope": "equipment", "id": rng.choice(eqs), "from": "2025-01-01T00:00:00+01:00",
            "to": "2026-01-01T00:00:00+01:00", "interval": "1mo", "tz": TZ,
        },
        "site_30d_by_day_and_machine": lambda: {
            "scope": "site", "id": rng.choice(list(SITES)),
            "from": (d := datetime(2025, 3, 1) + timedelta(days=rng.randrange(300)))
            .strftime("%Y-%m-%dT00:00:00+01:00"),
            "to": (d + timedelta(days=30)).strftime("%Y-%m-%dT00:00:00+01:00"),
            "interval": "1d", "tz": TZ, "group_by": "equipment",
        },
    }  # fmt: skip
    headers = {"Cache-Control": "no-cache", "Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers) as client:
        for name, make in queries.items():
            for _ in range(5):  # warm the connection and the database's caches
                client.get("/v1/oee", params=make()).raise_for_status()
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                r = client.get("/v1/oee", params=make())
                times.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                assert r.headers["server-timing"].count('cache;desc="miss"') == 1
            out[name] = {
                "requests": n,
                "p50_ms": round(statistics.median(times), 2),
                "p99_ms": round(pct(times, 99), 2),
                "max_ms": round(max(times), 2),
                "buckets": len(r.json()["groups"][0]["buckets"]),
            }
    return out


WRK_SCRIPT = """
math.randomseed(os.time())
local eqs = {%(eqs)s}
local tokens = {%(tokens)s}
local nocache = %(nocache)s
local fixed = %(fixed)s
request = function()
  if fixed then
    return wrk.format("GET", fixed)
  end
  local eq = eqs[math.random(#eqs)]
  local day = math.random(0, 357)
  local from = os.date("!%%Y-%%m-%%dT00:00:00Z", 1735689600 + day * 86400)
  local to = os.date("!%%Y-%%m-%%dT00:00:00Z", 1735689600 + (day + 7) * 86400)
  local path = "/v1/oee?scope=equipment&id=" .. eq .. "&from=" .. from .. "&to=" .. to ..
    "&interval=1d"
  local headers = {["Authorization"] = "Bearer " .. tokens[math.random(#tokens)]}
  if nocache then
    headers["Cache-Control"] = "no-cache"
  end
  return wrk.format("GET", path, headers)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "duration_s": %%.3f, "rps": %%.1f, "p50_ms": %%.2f, "p99_ms": %%.2f, ' ..
    '"max_ms": %%.2f, "errors": {"connect": %%d, "read": %%d, "write": %%d, "status": %%d, ' ..
    '"timeout": %%d}}\\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def ensure_wrk() -> str:
    """The path of wrk, installed with apt-get when missing (root on Debian/Ubuntu)."""
    found = shutil.which("wrk")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk (apt-get) for the load runs", file=sys.stderr, flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
            subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL)
        found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is needed for the load runs: install it (apt-get install wrk)")
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds of the processes (those gone count as none)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """CPU seconds of the API's workers and of the benchmark database's backends over a run."""

    def __init__(self, url: str, server: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.server = server.pid

    def api_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.server)], check=False, capture_output=True, text=True
        ).stdout
        return [self.server, *map(int, out.split())]

    def db_pids(self) -> list[int]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            ).fetchall()
        return [r[0] for r in rows]

    def sample(self) -> dict[int, float]:
        """CPU seconds by process id of the workers and backends there are now."""
        return {pid: cpu_seconds([pid]) for pid in (*self.api_pids(), *self.db_pids())}

    def per_request(self, before: dict[int, float], answered: int) -> dict[str, float | None]:
        """CPU per answered request since `before`; backends the pool opened meanwhile count
        from their start."""
        if not answered:
            return {"api_cpu_ms_per_request": None, "db_cpu_ms_per_request": None}
        api, db = self.api_pids(), self.db_pids()

        def used(pids: list[int]) -> float:
            return sum(cpu_seconds([pid]) - before.get(pid, 0.0) for pid in pids)

        return {
            "api_cpu_ms_per_request": round(used(api) * 1000 / answered, 3),
            "db_cpu_ms_per_request": round(used(db) * 1000 / answered, 3),
        }


def wrk(
    base: str,
    connections: int,
    seconds: int,
    tokens: list[str],
    *,
    nocache: bool,
    fixed_path: str | None = None,
    cpu: CpuWatch | None = None,
) -> dict[str, Any]:
    program = ensure_wrk()
    eqs = ", ".join(f'"{eq}"' for _s, _l, eq in machines())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(
            WRK_SCRIPT
            % {
                "eqs": eqs,
                "tokens": ", ".join(f'"{t}"' for t in tokens),
                "nocache": "true" if nocache else "false",
                "fixed": f'"{fixed_path}"' if fixed_path else "nil",
            }
        )
        script = f.name
    before = cpu.sample() if cpu is not None else None
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        out = subprocess.run(
            [program, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s",
             script, base],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    finally:
        Path(script).unlink()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    answered = result["requests"] - result["errors"]["status"]
    # Answers other than 2xx (a rate limit, say) are cheap and would flatter the rate.
    result["ok_rps"] = round(answered / result["duration_s"], 1)
    # wrk is the only child that ran meanwhile: its CPU share of one core.
    used = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    result["generator_cpu_share"] = round(used / result["duration_s"], 3)
    if cpu is not None and before is not None:
        result.update(cpu.per_request(before, answered))
    result["connections"] = connections
    result["result_cache"] = "n/a" if fixed_path else "bypassed" if nocache else "used"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__)
    parser.add_argument("--fresh", action="store_true", help="drop and reload the data")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per query")
    parser.add_argument("--seconds", type=int, default=30, help="throughput run length")
    parser.add_argument("--hold", type=int, default=60, help="concurrency run length")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    url = prepare(args.fresh)
    register(url)
    figures: dict[str, Any] = {"bench": "api", "run": secrets.token_hex(4)}
    figures["data"] = {
        "machines": len(machines()),
        "sites": len(SITES),
        "from": YEAR_START.isoformat(),
        "to": YEAR_END.isoformat(),
        **load(url),
    }
    keys_dir = Path(tempfile.mkdtemp(prefix="bench-api-keys-"))
    tokens = bearer_tokens(keys_dir, 1000)
    proc, base = serve(url, args.workers, keys_dir)
    try:
        # What the same server and load generator reach on a route that does no work: the
        # ceiling of this machine for the figures below.
        figures["ceiling_healthz_32_clients"] = wrk(
            base, 32, 10, tokens[:1], nocache=False, fixed_path="/healthz"
        )
        figures["latency_sequential_uncached"] = sequential(base, args.requests, tokens[0])
        cpu = CpuWatch(url, proc)
        figures["throughput_32_clients_7d"] = {
            "uncached": wrk(base, 32, args.seconds, tokens, nocache=True, cpu=cpu),
            "cached": wrk(base, 32, args.seconds, tokens, nocache=False, cpu=cpu),
        }
        figures["concurrency_1000_clients"] = {
            "uncached": wrk(base, 1000, args.hold, tokens, nocache=True, cpu=cpu),
            "cached": wrk(base, 1000, args.hold, tokens, nocache=False, cpu=cpu),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(keys_dir, ignore_errors=True)
    figures["machine"] = {
        "cpus": os.cpu_count(),
        "api_workers": args.workers,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }
    figures["targets"] = verdicts(figures)
    print(json.dumps(figures))


def verdicts(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each figure the product answers to, its target and whether it was met."""
    uncached = figures["throughput_32_clients_7d"]["uncached"]
    many = figures["concurrency_1000_clients"]["uncached"]
    latency = figures["latency_sequential_uncached"]
    errors = sum(many["errors"].values())
    rows = {
        "uncached_32_clients_ok_rps": (uncached["ok_rps"], ">= 1000", uncached["ok_rps"] >= 1000),
        "uncached_32_clients_p99_ms": (uncached["p99_ms"], "< 100", uncached["p99_ms"] < 100),
        "machine_year_by_month_p99_ms": (
            latency["machine_year_by_month"]["p99_ms"], "< 20",
            latency["machine_year_by_month"]["p99_ms"] < 20,
        ),
        "site_30d_by_day_and_machine_p99_ms": (
            latency["site_30d_by_day_and_machine"]["p99_ms"], "< 40",
            latency["site_30d_by_day_and_machine"]["p99_ms"] < 40,
        ),
        "uncached_1000_clients_errors": (errors, "0", errors == 0),
        "uncached_1000_clients_p99_ms": (many["p99_ms"], "< 1000", many["p99_ms"] < 1000),
    }  # fmt: skip
    return {k: {"value": v, "target": t, "met": m} for k, (v, t, m) in rows.items()}


if __name__ == "__main__":
    main()
