"""`edge-agent status`: the local /metrics of a running agent, printed as readable tables.

It reads the same endpoint Prometheus scrapes, so the table and the metrics never disagree.
The HTTP client and the metrics parser are imported by the functions that use them: the
running agent imports this module for a constant and needs neither.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from agent import readable


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
    from prometheus_client.parser import text_string_to_metric_families

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
    import httpx

    url = f"http://127.0.0.1:{port}/metrics"
    try:
        response = httpx.get(url, timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise AgentUnreachable(f"no agent answers on {url}: {exc}") from None
    return response.text


def table(title: str, header: list[str] | None, rows: list[list[str]]) -> str:
    """A bordered table; `header=None` for a two-column list of names and values."""
    columns = len(header) if header else max((len(r) for r in rows), default=2)
    widths = [len(h) for h in header] if header else [0] * columns
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def fmt(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    head = [fmt(header), line] if header else []
    return "\n".join([title, line, *head, *(fmt(r) for r in rows), line])


@dataclass
class Rates:
    """Per-second rates from two scrapes a moment apart (a counter's gauge from the agent
    needs a previous scrape of its own, which one `status` call does not give it)."""

    seconds: float
    per_second: dict[str, float]

    @classmethod
    def between(cls, before: Snapshot, after: Snapshot, seconds: float) -> Rates:
        out = {}
        for name, value in after.values.items():
            if name.endswith("_total") and name in before.values and seconds > 0:
                delta = value - before.values[name]
                # a reload in between restarts the runtime's counters: no rate then
                if delta >= 0:
                    out[name] = delta / seconds
        return cls(seconds, out)

    def get(self, name: str) -> float | None:
        return self.per_second.get(name)


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
        f"{readable.size(per_min)}/min, {readable.size(per_min * 1440)}/day at this rate, "
        f"{fsyncs / seconds * 60:.0f} fsyncs/min{amplification} "
        f"(since start, {readable.duration(seconds)})"
    )


# Above this many machines the equipment table lists only those not running (and a count
# per state); `status --all` lists every one.
SUMMARY_ABOVE = 20


@dataclass
class EquipmentRow:
    id: str
    state: str
    since_s: float | None
    shift: str | None
    ratios: dict[str, float]


def equipment_rows(snap: Snapshot) -> list[EquipmentRow]:
    """Every machine the agent reports, in natural order (press-2 before press-10)."""
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
    return [
        EquipmentRow(eq, states[eq], since.get(eq), shifts.get(eq), dict(ratios.get(eq, {})))
        for eq in readable.natural_sorted(states)
    ]


def _count_by_state(rows: list[EquipmentRow]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    order = sorted(counts, key=lambda state: (state != "running", -counts[state], state))
    return ", ".join(f"{counts[state]} {state}" for state in order)


def render(snap: Snapshot, rates: Rates | None = None, *, all_equipment: bool = False) -> str:
    info = snap.series.get("edge_agent_info", [])
    labels = info[0][0] if info else {}
    v = snap.value
    reloads = {
        lab["result"]: val for lab, val in snap.series.get("edge_agent_config_reloads_total", [])
    }
    alive = v("edge_agent_pipeline_alive") == 1
    rate = rates.get if rates is not None else (lambda name: None)
    sample_rate = rate("edge_agent_samples_total")
    if sample_rate is None:  # one scrape only: the agent's own gauge
        sample_rate = v("edge_agent_samples_per_second")
    agent_rows = [
        ["agent", f"{labels.get('agent', '?')} at site {labels.get('site', '?')}"],
        ["version", labels.get("version", "?")],
        ["pipeline", "alive" if alive else "NOT ALIVE (see /healthz)"],
        ["up for", readable.duration(v("edge_agent_uptime_seconds"))],
        [
            "configuration",
            f"generation {int(v('edge_agent_config_generation') or 1)}, "
            f"{int(reloads.get('applied', 0))} reload(s) applied, "
            f"{int(reloads.get('rejected', 0))} rejected",
        ],
        [
            "samples",
            f"{readable.rate(sample_rate)}, "
            f"{readable.count(v('edge_agent_samples_total', 0))} total, "
            f"{readable.count(v('edge_agent_samples_rejected_total', 0))} rejected",
        ],
    ]
    parts = [table("Agent", None, agent_rows)]

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
        for lab, val in sorted(
            snap.series.get("edge_agent_connection_up", []),
            key=lambda item: readable.natural_key(item[0]["connection"]),
        )
    ]
    parts.append(table("Connections", ["connection", "status", "read latency"], conn_rows))

    machines = equipment_rows(snap)
    shown = machines
    title = "Equipment (OEE of the running shift, closed buckets)"
    if len(machines) > SUMMARY_ABOVE and not all_equipment:
        shown = [m for m in machines if m.state != "running"]
        title = f"Equipment: {len(machines)} machines, {_count_by_state(machines)}; " + (
            f"the {len(shown)} not running (all: --all)"
            if shown
            else "all running (list them: --all)"
        )
    eq_rows = [
        [
            m.id,
            m.state,
            readable.duration(m.since_s),
            m.shift or "-",
            readable.percent(m.ratios.get("availability")),
            readable.percent(m.ratios.get("performance")),
            readable.percent(m.ratios.get("quality")),
            readable.percent(m.ratios.get("oee")),
        ]
        for m in shown
    ]
    header = ["equipment", "state", "since", "shift", "avail.", "perf.", "quality", "OEE"]
    parts.append(table(title, header, eq_rows) if eq_rows else title)

    quota = v("edge_agent_outbox_quota_bytes")
    used = v("edge_agent_outbox_bytes")
    fill = (
        f" ({used / quota * 100:.1f} % of {readable.size(quota)})"
        if used is not None and quota
        else ""
    )

    def with_rate(name: str) -> str:
        total = readable.count(v(name, 0))
        per_second = rate(name)
        return total if per_second is None else f"{total} ({readable.rate(per_second)})"

    sync_rows = [
        [
            "outbox",
            f"{readable.count(v('edge_agent_outbox_batches', 0))} batches, "
            f"{readable.count(v('edge_agent_outbox_events', 0))} events, "
            f"{readable.size(used)}{fill}",
        ],
        [
            "oldest unacked",
            readable.age(
                v("edge_agent_outbox_oldest_age_seconds")
                if v("edge_agent_outbox_batches")
                else None,
                none="none (all acked)",
            ),
        ],
        ["storage writes", _writes(snap)],
        ["broker", "connected" if v("edge_agent_broker_connected") == 1 else "DISCONNECTED"],
        ["published", with_rate("edge_agent_batches_published_total")],
        ["acked", with_rate("edge_agent_acks_total")],
        ["resent", with_rate("edge_agent_resends_total")],
        ["acks rejected", with_rate("edge_agent_acks_rejected_total")],
    ]
    parts.append(table("Outbox and uplink", None, sync_rows))
    return "\n\n".join(parts)


def as_json(snap: Snapshot, rates: Rates | None = None) -> dict[str, object]:
    """The same figures for a script: raw numbers (bytes, seconds), no formatting."""
    info = snap.series.get("edge_agent_info", [])
    labels = info[0][0] if info else {}
    v = snap.value
    return {
        "agent": labels.get("agent"),
        "site": labels.get("site"),
        "version": labels.get("version"),
        "alive": v("edge_agent_pipeline_alive") == 1,
        "uptime_s": v("edge_agent_uptime_seconds"),
        "samples_total": v("edge_agent_samples_total"),
        "samples_per_s": (
            rates.get("edge_agent_samples_total")
            if rates is not None
            else v("edge_agent_samples_per_second")
        ),
        "rate_window_s": rates.seconds if rates is not None else None,
        "connections": {
            lab["connection"]: {"up": val == 1}
            for lab, val in snap.series.get("edge_agent_connection_up", [])
        },
        "equipment": [
            {
                "id": m.id,
                "state": m.state,
                "state_seconds": m.since_s,
                "shift": m.shift,
                "ratios": m.ratios,
            }
            for m in equipment_rows(snap)
        ],
        "outbox": {
            "batches": v("edge_agent_outbox_batches"),
            "events": v("edge_agent_outbox_events"),
            "bytes": v("edge_agent_outbox_bytes"),
            "quota_bytes": v("edge_agent_outbox_quota_bytes"),
            "oldest_unacked_age_s": v("edge_agent_outbox_oldest_age_seconds"),
        },
        "broker_connected": v("edge_agent_broker_connected") == 1,
        "batches_published_total": v("edge_agent_batches_published_total"),
        "acks_total": v("edge_agent_acks_total"),
    }
