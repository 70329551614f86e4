"""The span of one ingestion API request (OpenTelemetry API only; ``ops.tracing`` installs
the SDK, without it every span is a no-op): a SERVER span named ``METHOD route``, child of
the client's W3C ``traceparent`` when it sends one, so the gateway's trace shows the hop
into gatewatch. Started and ended by hand rather than as a context manager: the app's
handler is not wrapped, and nothing under it makes spans of its own."""

from __future__ import annotations

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

tracer = trace.get_tracer("gatewatch.ingest_api")


def start_request_span(method: str, route: str, headers: dict[str, str], request_id: str) -> Span:
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return trace.INVALID_SPAN  # tracing off: not even the traceparent is parsed
    span = tracer.start_span(f"{method} {route}", context=propagate.extract(headers), kind=SpanKind.SERVER)
    if span.is_recording():
        span.set_attributes({"http.request.method": method, "http.route": route, "gatewatch.request_id": request_id})
    return span


def end_request_span(span: Span, status: int) -> None:
    if span.is_recording():
        span.set_attribute("http.response.status_code", status)
        if status >= 500:  # a server span's error is a 5xx; a 4xx is the client's (HTTP conventions)
            span.set_status(Status(StatusCode.ERROR))
    span.end()
