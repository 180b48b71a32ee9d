"""The agent's own Prometheus text writer writes what prometheus-client writes.

The same families (gauges and counters, with and without labels, label values and help texts
that need escaping, values Go prints in its own way) go through agent.exposition.render and
through prometheus-client's generate_latest; the bytes must be equal, and prometheus-client's
parser must read back every sample."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.exposition import MetricFamily, counter, gauge, go_float, render

VALUES = (0.0, 1.0, -2.5, 3, 12345678.0, 1e21, 1.5e-7, math.inf, -math.inf, 2**53 + 0.0)
TRICKY = ("back\\slash", "new\nline", 'quote"d', "ünïcödé", "")


def families() -> list[tuple[MetricFamily, Metric]]:
    out: list[tuple[MetricFamily, Metric]] = []
    for i, value in enumerate(VALUES):
        out.append(
            (
                gauge(f"edge_gauge_{i}", "A gauge", value=value),
                GaugeMetricFamily(f"edge_gauge_{i}", "A gauge", value=value),
            )
        )
    out.append(
        (
            counter("edge_things", "Things\\counted\nin two lines", value=42),
            CounterMetricFamily("edge_things", "Things\\counted\nin two lines", value=42),
        )
    )
    out.append(
        (
            counter("edge_named_total", "Name given with its suffix", value=7.5),
            CounterMetricFamily("edge_named_total", "Name given with its suffix", value=7.5),
        )
    )
    ours = gauge("edge_labelled", "Labels out of order", labels=["zeta", "alpha", "mid"])
    theirs = GaugeMetricFamily(
        "edge_labelled", "Labels out of order", labels=["zeta", "alpha", "mid"]
    )
    for n, text in enumerate(TRICKY):
        ours.add_metric([text, f"a{n}", "m"], float(n))
        theirs.add_metric([text, f"a{n}", "m"], float(n))
    out.append((ours, theirs))
    ours_c = counter("edge_requests", "Requests", labels=["connection"])
    theirs_c = CounterMetricFamily("edge_requests", "Requests", labels=["connection"])
    for n, name in enumerate(("plc-1", "plc-2")):
        ours_c.add_metric([name], n * 1000.0)
        theirs_c.add_metric([name], n * 1000.0)
    out.append((ours_c, theirs_c))
    out.append(
        (
            gauge("edge_empty", "No samples", labels=["x"]),
            GaugeMetricFamily("edge_empty", "No samples", labels=["x"]),
        )
    )
    return out


class _Collector:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


def test_render_writes_what_prometheus_client_writes() -> None:
    pairs = families()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector([theirs for _, theirs in pairs]))  # type: ignore[arg-type]
    expected = generate_latest(registry)
    assert render(ours for ours, _ in pairs) == expected


def test_prometheus_client_reads_every_sample_back() -> None:
    pairs = families()
    text = render(ours for ours, _ in pairs).decode("utf-8")
    read = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    written = {
        (
            f"{ours.name}_total" if ours.type == "counter" else ours.name,
            tuple(sorted(zip(ours.labels, values, strict=True))),
        ): value
        for ours, _ in pairs
        for values, value in ours.samples
    }
    assert read.keys() == written.keys()
    for key, value in written.items():
        assert read[key] == value or (math.isnan(value) and math.isnan(read[key]))


def test_go_float_matches_prometheus_client_for_nan() -> None:
    assert go_float(math.nan) == "NaN"
    assert render([gauge("edge_nan", "Not a number", value=math.nan)]).endswith(b"edge_nan NaN\n")


def test_a_metric_with_labels_takes_no_bare_value_and_counts_its_label_values() -> None:
    family = gauge("edge_x", "x", labels=["a", "b"])
    with pytest.raises(ValueError, match="2 label values expected"):
        family.add_metric(["only one"], 1.0)
    assert family.samples == []
