"""OpenTelemetry tracing of the cloud side: API requests, database sessions and ingest batches.

Every request and batch has a real trace id for logs, problem details and audit rows. Spans
are recorded only when they can leave the process: with an OTLP endpoint configured (a share
`sample_ratio` of new traces), or when a caller's `traceparent` is marked sampled. Otherwise
a request gets its trace id and nothing more, which keeps a cached API answer cheap.

An ingest batch's span joins the trace the edge agent started: the envelope header's
`trace_id` (32 hex digits) becomes the span's trace id, and the same id is stored on the
batch, on each of its events and bound into every log line written while it is handled.
The agent makes no sampling decision, so a batch's trace is sampled as a new trace would be:
`sample_ratio` of them by trace id when spans are exported, none otherwise.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
)

from cloud_api.config import TracingSettings

_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_lock = threading.Lock()
_configured = False
_exporting = False  # new traces are sampled (an OTLP endpoint is configured)
_root: Sampler = ALWAYS_OFF  # which new traces are sampled

tracer = trace.get_tracer("cloud_api")


def configure(settings: TracingSettings) -> None:
    """Install the SDK tracer provider once per process; export over OTLP when configured."""
    global _configured, _exporting, _root
    with _lock:
        if _configured:
            return
        # Parent-based: a caller's sampling decision is followed; new traces are sampled only
        # when they are exported.
        root = TraceIdRatioBased(settings.sample_ratio) if settings.otlp_endpoint else ALWAYS_OFF
        provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(root),
        )
        if settings.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint))
            )
        trace.set_tracer_provider(provider)
        _configured = True
        _exporting = bool(settings.otlp_endpoint) and settings.sample_ratio > 0
        _root = root


def trace_id_of(span: Span) -> str | None:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def current_trace_id() -> str | None:
    return trace_id_of(trace.get_current_span())


@contextmanager
def request_span(method: str, path: str, headers: Mapping[str, str]) -> Iterator[tuple[Span, str]]:
    """A server span for one HTTP request, continuing a `traceparent` the caller sent.

    When the span could not be recorded (nothing is exported and the caller sent no trace
    context), only a trace id is made: the SDK's unsampled span would cost more than the rest
    of a cached answer and give nothing else.
    """
    if not _exporting and "traceparent" not in headers:
        trace_id = secrets.token_hex(16)
        with _logged(trace_id):
            yield INVALID_SPAN, trace_id
        return
    parent = propagate.extract(dict(headers))
    with tracer.start_as_current_span(
        f"{method} {path}",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": method, "url.path": path},
    ) as span:
        trace_id = trace_id_of(span) or secrets.token_hex(16)
        with _logged(trace_id):
            yield span, trace_id


class _logged:
    """The trace id bound into every log line written meanwhile, as structlog's
    `bound_contextvars` binds it, and the binding before it back afterwards. That one reads
    every context variable there is to save what it replaces (a tenth of the tracing's CPU
    per request); the token of the one variable set here restores it."""

    __slots__ = ("token", "trace_id")

    def __init__(self, trace_id: str) -> None:
        self.trace_id = trace_id
        self.token: Mapping[str, Any] = {}

    def __enter__(self) -> None:
        self.token = structlog.contextvars.bind_contextvars(trace_id=self.trace_id)

    def __exit__(self, *exc: object) -> None:
        structlog.contextvars.reset_contextvars(**self.token)


@contextmanager
def db_span(role: str) -> Iterator[Span]:
    """One span per database session (pool checkout), child of the current span."""
    current = trace.get_current_span()
    if not _exporting and not current.is_recording():
        yield current
        return
    with tracer.start_as_current_span(
        "db.session",
        kind=SpanKind.CLIENT,
        attributes={"db.system.name": "postgresql", "db.user": role},
    ) as span:
        yield span


@contextmanager
def batch_span(trace_id: str | None, attributes: Mapping[str, Any]) -> Iterator[Span]:
    """The span of one ingest batch, inside the trace the agent started (its header trace_id)."""
    token = None
    if trace_id and _TRACE_ID.fullmatch(trace_id) and int(trace_id, 16):
        number = int(trace_id, 16)
        # The agent made no sampling decision: the one for a new trace of this id. (Marked
        # sampled, every batch's span was recorded, exported or not, whatever sample_ratio.)
        sampled = _exporting and (
            _root.should_sample(None, number, "ingest.batch").decision == Decision.RECORD_AND_SAMPLE
        )
        remote = SpanContext(
            trace_id=number,
            span_id=int.from_bytes(secrets.token_bytes(8), "big") or 1,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
        )
        token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(remote)))
    try:
        with (
            tracer.start_as_current_span(
                "ingest.batch", kind=SpanKind.CONSUMER, attributes=dict(attributes)
            ) as span,
            structlog.contextvars.bound_contextvars(trace_id=trace_id),
        ):
            yield span
    finally:
        if token is not None:
            otel_context.detach(token)
