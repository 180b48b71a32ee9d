"""Benchmark: what a flush costs the agent while the cloud is unreachable and batches wait.

At every flush the agent's writer checks the outbox's fill ratio and `append` checks the
capacity before storing; the health endpoint and the status report read `stats()`. Each of
these needs the stored bytes. This bench fills an outbox (the agent's settings: WAL,
`synchronous=FULL`, `exclusive`) with waiting batches of `--batch-bytes` each and, at each
backlog size of `--backlogs`, measures the CPU and wall time of one flush as the writer does
it (fill ratio, then an append of one batch) and of `stats()`, against the baseline in the
same run and the same file: one `SUM(bytes)` over the batches, which is what each of the
outbox's three reads cost before it kept its totals in memory (two of them per flush).

Run: `python -m bench.outbox_backlog [--backlogs 0,10000,100000] [--batch-bytes 2000]`.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from buffer.outbox import NewBatch, Outbox

ROUNDS = 20


def _timed(call: Any, rounds: int = ROUNDS) -> tuple[float, float]:
    """(CPU ms, wall ms) per call, averaged over `rounds`."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        call()
    return (
        (time.process_time() - cpu) * 1000 / rounds,
        (time.perf_counter() - wall) * 1000 / rounds,
    )


def _flush(box: Outbox, sealer: Any) -> None:
    """What the writer does at a flush: the fill check, then the append (with its own)."""
    box.fill_ratio()
    box.append([NewBatch(10, sealer)], None)


def _sum_bytes(box: Outbox) -> None:
    box._conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM batches").fetchone()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backlogs", default="0,10000,100000", help="waiting batches")
    parser.add_argument("--batch-bytes", type=int, default=2000, help="bytes of a sealed batch")
    parser.add_argument("--dir", help="folder on the disk to measure (default: a temp folder)")
    args = parser.parse_args(argv)
    backlogs = sorted(int(b) for b in args.backlogs.split(","))
    blob = os.urandom(args.batch_bytes)

    def sealer(epoch: str, seq: int) -> tuple[bytes, str]:
        return blob, f"{epoch}-{seq}"

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "outbox.db"
        box = Outbox(path, max_bytes=64 * 1024**3, exclusive=True)
        stored = 0
        for backlog in backlogs:
            while stored < backlog:
                n = min(500, backlog - stored)
                box.append([NewBatch(10, sealer)] * n, None)
                stored += n
            # Reopened so the file's pages are read as the agent would after a restart (the
            # OS caches them; SQLite's own cache is small).
            box.close()
            box = Outbox(path, max_bytes=64 * 1024**3, exclusive=True)

            flush_cpu, flush_wall = _timed(lambda b=box: _flush(b, sealer))
            stored += ROUNDS
            stats_cpu, _ = _timed(box.stats)
            # The baseline reads the same file through the same connection.
            scan_cpu, scan_wall = _timed(lambda b=box: _sum_bytes(b))
            results.append(
                {
                    "backlog_batches": backlog,
                    "file_mb": round(path.stat().st_size / 1e6, 1),
                    "flush_cpu_ms": round(flush_cpu, 3),
                    "flush_wall_ms": round(flush_wall, 3),
                    "stats_cpu_ms": round(stats_cpu, 3),
                    "baseline_sum_cpu_ms": round(scan_cpu, 3),
                    "baseline_sum_wall_ms": round(scan_wall, 3),
                }
            )
            r = results[-1]
            print(
                f"{backlog:>8} batches ({r['file_mb']} MB): flush {flush_cpu:.3f} ms CPU "
                f"({flush_wall:.2f} ms wall), stats {stats_cpu:.3f} ms; one SUM over the "
                f"batches {scan_cpu:.3f} ms CPU"
            )
        box.close()
    largest = results[-1]
    print(
        json.dumps(
            {
                "bench": "outbox_backlog",
                "batch_bytes": args.batch_bytes,
                "loadavg": Path("/proc/loadavg").read_text().split()[:3],
                "results": results,
                # What a flush used to add per fill check, in CPU, at the largest backlog: two
                # sums per flush, over what one flush costs now.
                "ratio_baseline_two_sums_to_flush": round(
                    2 * largest["baseline_sum_cpu_ms"] / max(largest["flush_cpu_ms"], 1e-6), 1
                ),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
