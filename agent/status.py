"""`edge-agent status`: the local /metrics of a running agent, printed as readable tables.

It reads the same endpoint Prometheus scrapes, so the table and the metrics never disagree.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families


class AgentUnreachable(Exception):
    """No agent answers on the configured health port."""


@dataclass
class Snapshot:
    """The metrics of one scrape: plain values and labelled series."""

    values: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[tuple[dict[str, str], float]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def value(self, name: str, default: float | None = None) -> float | None:
        return self.values.get(name, default)


def parse_metrics(text: str) -> Snapshot:
    snap = Snapshot()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if sample.labels:
                snap.series[sample.name].append((dict(sample.labels), float(sample.value)))
            else:
                snap.values[sample.name] = float(sample.value)
    return snap


def fetch(port: int, timeout: float = 3.0) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        response = httpx.get(url, timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise AgentUnreachable(f"no agent answers on {url}: {exc}") from None
    return response.text


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [title, line, fmt(header), line, *(fmt(r) for r in rows), line]
    return "\n".join(out)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _writes(snap: Snapshot) -> str:
    """What the outbox writes to the flash, as a rate and the daily volume it implies."""
    seconds = snap.value("edge_agent_outbox_open_seconds")
    written = snap.value("edge_agent_outbox_written_bytes_total")
    if not seconds or written is None:
        return "-"
    fsyncs = snap.value("edge_agent_outbox_fsyncs_total", 0.0) or 0.0
    sealed = snap.value("edge_agent_outbox_sealed_bytes_total", 0.0) or 0.0
    per_min = written / seconds * 60
    amplification = f", {written / sealed:.1f} x the sealed events" if sealed else ""
    return (
        f"{_bytes(per_min)}/min, {_bytes(per_min * 1440)}/day at this rate, "
        f"{fsyncs / seconds * 60:.0f} fsyncs/min{amplification} (since start, {_age(seconds)})"
    )


def render(snap: Snapshot) -> str:
    info = snap.series.get("edge_agent_info", [])
    labels = info[0][0] if info else {}
    v = snap.value
    reloads = {
        lab["result"]: val for lab, val in snap.series.get("edge_agent_config_reloads_total", [])
    }
    alive = v("edge_agent_pipeline_alive") == 1
    agent_rows = [
        ["agent", f"{labels.get('agent', '?')} at site {labels.get('site', '?')}"],
        ["version", labels.get("version", "?")],
        ["pipeline", "alive" if alive else "NOT ALIVE (see /healthz)"],
        ["up for", _age(v("edge_agent_uptime_seconds"))],
        [
            "configuration",
            f"generation {int(v('edge_agent_config_generation') or 1)}, "
            f"{int(reloads.get('applied', 0))} reload(s) applied, "
            f"{int(reloads.get('rejected', 0))} rejected",
        ],
        [
            "samples",
            f"{v('edge_agent_samples_per_second', 0.0) or 0.0:.1f}/s, "
            f"{int(v('edge_agent_samples_total', 0) or 0)} total, "
            f"{int(v('edge_agent_samples_rejected_total', 0) or 0)} rejected",
        ],
    ]
    parts = [_table("Agent", ["", ""], agent_rows)]

    latency = {
        lab["connection"]: val
        for lab, val in snap.series.get("edge_agent_connection_read_latency_seconds", [])
    }
    conn_rows = [
        [
            lab["connection"],
            "up" if val == 1 else "DOWN",
            f"{latency[lab['connection']] * 1000:.1f} ms" if lab["connection"] in latency else "-",
        ]
        for lab, val in snap.series.get("edge_agent_connection_up", [])
    ]
    parts.append(_table("Connections", ["connection", "status", "read latency"], conn_rows))

    states = {
        lab["equipment"]: lab["state"]
        for lab, val in snap.series.get("edge_agent_equipment_state", [])
        if val == 1
    }
    since = {
        lab["equipment"]: val
        for lab, val in snap.series.get("edge_agent_equipment_state_seconds", [])
    }
    ratios: dict[str, dict[str, float]] = defaultdict(dict)
    shifts: dict[str, str] = {}
    for lab, val in snap.series.get("edge_agent_shift_oee_ratio", []):
        ratios[lab["equipment"]][lab["ratio"]] = val
        shifts[lab["equipment"]] = lab["shift"]
    eq_rows = []
    for equipment in sorted(states):
        r = ratios.get(equipment, {})
        eq_rows.append(
            [
                equipment,
                states[equipment],
                _age(since.get(equipment)),
                shifts.get(equipment, "-"),
                _pct(r.get("availability")),
                _pct(r.get("performance")),
                _pct(r.get("quality")),
                _pct(r.get("oee")),
            ]
        )
    parts.append(
        _table(
            "Equipment (OEE of the running shift, closed buckets)",
            ["equipment", "state", "since", "shift", "avail.", "perf.", "quality", "OEE"],
            eq_rows,
        )
    )

    quota = v("edge_agent_outbox_quota_bytes")
    used = v("edge_agent_outbox_bytes")
    fill = f" ({used / quota * 100:.1f} % of {_bytes(quota)})" if used is not None and quota else ""
    sync_rows = [
        [
            "outbox",
            f"{int(v('edge_agent_outbox_batches', 0) or 0)} batches, "
            f"{int(v('edge_agent_outbox_events', 0) or 0)} events, {_bytes(used)}{fill}",
        ],
        ["oldest unacked", _age(v("edge_agent_outbox_oldest_age_seconds"))],
        ["storage writes", _writes(snap)],
        ["broker", "connected" if v("edge_agent_broker_connected") == 1 else "DISCONNECTED"],
        ["published", str(int(v("edge_agent_batches_published_total", 0) or 0))],
        ["acked", str(int(v("edge_agent_acks_total", 0) or 0))],
        ["resent", str(int(v("edge_agent_resends_total", 0) or 0))],
        ["acks rejected", str(int(v("edge_agent_acks_rejected_total", 0) or 0))],
    ]
    parts.append(_table("Outbox and uplink", ["", ""], sync_rows))
    return "\n\n".join(parts)
