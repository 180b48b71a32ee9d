"""The Prometheus text format (0.0.4) of the agent's `/metrics`, written without a library.

The agent exports gauges and counters read from the pipeline at each scrape; nothing is
registered or kept between scrapes. prometheus-client would do the same in about 1 MB more
resident memory (its module tree pulls in http.server, wsgiref and urllib.request), which an
edge box pays for the whole life of the process. The output is byte for byte what
prometheus-client's `generate_latest` writes for the same families (checked by
tests/agent/test_exposition.py): `# HELP` and `# TYPE` lines, a counter's samples named
`NAME_total`, labels sorted by name, values as Go prints them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricFamily:
    """One metric: a name, its help text, its type and its samples (label values, value)."""

    __slots__ = ("documentation", "labels", "name", "samples", "type")

    def __init__(
        self,
        kind: Literal["gauge", "counter"],
        name: str,
        documentation: str,
        *,
        value: float | None = None,
        labels: Sequence[str] = (),
    ) -> None:
        if kind == "counter" and name.endswith("_total"):
            name = name[: -len("_total")]
        self.type = kind
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self.samples: list[tuple[tuple[str, ...], float]] = []
        if value is not None:
            if self.labels:
                raise ValueError("a metric with labels takes its values by add_metric")
            self.samples.append(((), float(value)))

    def add_metric(self, values: Sequence[str], value: float) -> None:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.labels)} label values expected")
        self.samples.append((tuple(values), float(value)))


def gauge(
    name: str, documentation: str, *, value: float | None = None, labels: Sequence[str] = ()
) -> MetricFamily:
    return MetricFamily("gauge", name, documentation, value=value, labels=labels)


def counter(
    name: str, documentation: str, *, value: float | None = None, labels: Sequence[str] = ()
) -> MetricFamily:
    return MetricFamily("counter", name, documentation, value=value, labels=labels)


def go_float(value: float) -> str:
    """A float as Prometheus' Go code prints it (as prometheus-client's floatToGoString)."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render(families: Iterable[MetricFamily]) -> bytes:
    out: list[str] = []
    for family in families:
        name = f"{family.name}_total" if family.type == "counter" else family.name
        help_text = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {family.type}\n")
        order = sorted(range(len(family.labels)), key=family.labels.__getitem__)
        for values, value in family.samples:
            if values:
                pairs = ",".join(f'{family.labels[i]}="{_label_value(values[i])}"' for i in order)
                out.append(f"{name}{{{pairs}}} {go_float(value)}\n")
            else:
                out.append(f"{name} {go_float(value)}\n")
    return "".join(out).encode("utf-8")
