"""An ingest batch's span joins the agent's trace (its header's trace id) and is sampled as a
new trace of that id would be: `tracing.sample_ratio` of them when spans are exported, none
when nothing is (the agent makes no sampling decision of its own)."""

from __future__ import annotations

import random

import pytest
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from cloud_api import tracing
from cloud_api.config import TracingSettings


@pytest.fixture(autouse=True)
def _sdk_provider() -> None:
    # The SDK's provider, as `cloud-api ingest` and the API install it; no OTLP endpoint.
    tracing.configure(TracingSettings())


def test_a_batch_span_has_the_agents_trace_id_and_records_nothing_unexported() -> None:
    assert not tracing._exporting
    rng = random.Random(1)
    for _ in range(50):
        trace_id = format(rng.getrandbits(128) | 1, "032x")
        with tracing.batch_span(trace_id, {"agent": "edge-1", "seq": 1}) as span:
            assert tracing.trace_id_of(span) == trace_id
            assert not span.is_recording()


def test_batch_spans_are_recorded_for_the_sample_ratio_of_trace_ids_when_exported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ratio = TraceIdRatioBased(0.25)
    # As configure() sets them with an OTLP endpoint and sample_ratio 0.25.
    monkeypatch.setattr(tracing, "_exporting", True)
    monkeypatch.setattr(tracing, "_root", ratio)
    rng = random.Random(2)
    recorded = 0
    for _ in range(400):
        trace_id = format(rng.getrandbits(128) | 1, "032x")
        with tracing.batch_span(trace_id, {"agent": "edge-1", "seq": 1}) as span:
            assert tracing.trace_id_of(span) == trace_id
            # TraceIdRatioBased samples by the trace id's low 64 bits, below its bound.
            assert span.is_recording() == (int(trace_id, 16) & (2**64 - 1) < ratio.bound)
            recorded += span.is_recording()
    assert 50 < recorded < 150
