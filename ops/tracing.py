"""Installs the OpenTelemetry SDK in a gatewatch process when ``tracing.otlp_endpoint`` is
set: a TracerProvider with this process as its resource, a parent-based ratio sampler and a
BatchSpanProcessor exporting OTLP/HTTP protobuf. The library code (``sinks.tracing``,
``connectors.ingest_api.tracing``) only uses the API, as with the metrics hook; without
this nothing is imported from the SDK and every span is a no-op.

Called by ``ops.launch`` (flow processes) and ``ops.api`` (each serve worker, after the
server forked it: the export thread belongs to the process that sends).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)
TRACES_PATH = "/v1/traces"


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a base endpoint, as OTEL_EXPORTER_OTLP_ENDPOINT is read."""
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint.rstrip("/") + TRACES_PATH


def install_tracing(tracing, component: str):
    """The installed TracerProvider, or None when tracing is off (nothing imported).
    ``tracing`` is ``ops.settings.TracingSettings``; ``component`` names this process's job
    (``flow-ingest``, ``serve``) in the resource."""
    if not tracing.otlp_endpoint:
        return None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    process = os.environ.get("BYTEWAX_PROCESS_ID", "0")
    resource = Resource.create({  # OTEL_RESOURCE_ATTRIBUTES adds to these
        "service.name": tracing.service_name, "service.namespace": "gatewatch",
        "service.instance.id": f"{socket.gethostname()}/{component}/{process}/{os.getpid()}",
        "gatewatch.component": component})
    url = traces_url(tracing.otlp_endpoint)
    exporter = OTLPSpanExporter(endpoint=url, timeout=tracing.export_timeout_s,
                                headers={name: value.get_secret_value() for name, value in tracing.headers.items()})
    # shutdown_on_exit (the default) flushes the last batch when the process ends.
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(tracing.sample_ratio)))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing: spans of %s go to %s (sample ratio %g)", component, url, tracing.sample_ratio)
    return provider
