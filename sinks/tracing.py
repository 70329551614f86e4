"""The pipeline's own OpenTelemetry spans: one per batch of a stage worth seeing (decode and
validate, redact, each sink's write), each linked to the gateway traces of the events in it,
so a trace viewer leads from a user's request to the pipeline batch that stored it.

Like ``sinks.metrics``, this is the library side only: it uses the OpenTelemetry API, which
is a no-op until ``ops.tracing`` installs the SDK's TracerProvider (when
``tracing.otlp_endpoint`` is set). With tracing off a batch costs one ``isinstance`` check
(``tracing_on``); with it on, links are collected for sampled spans only (added after the
span starts, so the sampler decides without them).

A batch span has no parent: the events in it came from many requests of many traces, which
is what span links are for (OpenTelemetry's messaging conventions do the same for batch
consumers).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, SpanKind, TraceFlags

MAX_LINKS = int(os.environ.get("OTEL_SPAN_LINK_COUNT_LIMIT", 128))
"""Links per batch span: the SDK's limit (128 unless OTEL_SPAN_LINK_COUNT_LIMIT says
otherwise); collecting more would be work the SDK throws away. Each link costs a few µs of
CPU (``gatewatch bench tracing``): lower it, or tracing.sample_ratio, to pay less."""
OK = "ok"

tracer = trace.get_tracer("gatewatch.pipeline")


def event_contexts(events: Iterable[Any], limit: int = MAX_LINKS) -> list[SpanContext]:
    """The distinct gateway span contexts (``trace_id``/``span_id``) of the first events that
    carry one, at most ``limit``; items that are not events are passed over."""
    contexts: list[SpanContext] = []
    seen: set[tuple[str, str]] = set()
    for event in events:
        if not isinstance(event, dict):
            continue
        trace_id, span_id = event.get("trace_id"), event.get("span_id")
        if not trace_id or not span_id or (trace_id, span_id) in seen:
            continue
        try:
            context = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                                  trace_flags=TraceFlags(TraceFlags.SAMPLED))
        except (TypeError, ValueError):
            continue
        if context.is_valid:
            seen.add((trace_id, span_id))
            contexts.append(context)
            if len(contexts) >= limit:
                break
    return contexts


def link_events(span: Span, events: Iterable[Any]) -> None:
    for context in event_contexts(events):
        span.add_link(context)


def tracing_on() -> bool:
    """Whether a TracerProvider is installed (the API's proxy stands in until one is): the
    links of a batch are only collected then."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


TRACE_COLUMNS = ("trace_id", "span_id")


def rows_of(items: list) -> list:
    """The rows of what a sink is handed: (key, rows) batches, lists of rows, single rows, and
    in any of these blocks of rows in an Arrow table (sinks.parquet.EventBlock: only the
    trace columns are read out, for the links)."""
    rows: list = []
    for item in items:
        table = getattr(item, "table", None)
        if table is not None:
            present = [name for name in TRACE_COLUMNS if name in table.column_names]
            rows.extend(table.select(present).to_pylist() if present else [None] * table.num_rows)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], list):
            rows.extend(rows_of(item[1]))
        elif isinstance(item, list):
            rows.extend(rows_of(item))
        else:
            rows.append(item)
    return rows


class TracedStep:
    """A batch step returning ``(route, item)`` pairs (``decode_batch``, ``redact_batch``),
    run inside one span per batch: its size, how many items went on and how many to the
    DLQ, and links to the events that went on."""

    def __init__(self, stage: str, step: Callable[[list], list[tuple[str, Any]]]):
        self.stage = stage
        self.step = step

    def __call__(self, items: list) -> list[tuple[str, Any]]:
        if not tracing_on():
            return self.step(items)
        with tracer.start_as_current_span(f"gatewatch {self.stage}") as span:
            routed = self.step(items)
            if span.is_recording():
                passed = [item for route, item in routed if route == OK]
                span.set_attributes({"gatewatch.stage": self.stage, "gatewatch.batch.size": len(items),
                                     "gatewatch.batch.passed": len(passed),
                                     "gatewatch.batch.dlq": len(routed) - len(passed),
                                     "thread.id": threading.get_native_id()})
                link_events(span, passed)
            return routed


@contextlib.contextmanager
def write_span(store: str, worker_index: int, items: list) -> Iterator[Span | None]:
    """The span of one sink write: the store, the rows and batches written, links to the
    events written. An exception inside ends it with an error status (and goes on)."""
    if not tracing_on():
        yield None
        return
    with tracer.start_as_current_span(f"gatewatch write {store}", kind=SpanKind.CLIENT) as span:
        if span.is_recording():
            rows = rows_of(items)
            span.set_attributes({"gatewatch.sink": store, "gatewatch.worker": worker_index,
                                 "gatewatch.batch.size": len(rows), "gatewatch.batch.batches": len(items)})
            link_events(span, rows)
        yield span
