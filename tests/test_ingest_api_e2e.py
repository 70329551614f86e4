"""An OpenAI client instrumented for OpenTelemetry (OpenInference's openai instrumentation;
opentelemetry-instrumentation-openai-v2 2.3b0 does not run with wrapt 2 and 2.4b0 needs an
unpublished opentelemetry-util-genai) calls a local stub of the provider API; its OTLP/HTTP exporter sends the spans to
`gatewatch serve`; the unchanged ingest dataflow takes them from Kafka into ClickHouse."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from bytewax.testing import run_main

from dataflows.ingest import build_flow
from ops.settings import load_settings
from sinks.clickhouse import ClickHouse
from tests.test_ingest_api import Server

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

USAGE = {"prompt_tokens": 1200, "completion_tokens": 80, "total_tokens": 1280,
         "prompt_tokens_details": {"cached_tokens": 1024}, "completion_tokens_details": {"reasoning_tokens": 30}}


class ProviderStub(BaseHTTPRequestHandler):
    """POST /v1/chat/completions answered as OpenAI does, usage with cached tokens."""

    def do_POST(self):  # noqa: N802 - http.server's naming
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body = json.dumps({
            "id": "chatcmpl-stub-1", "object": "chat.completion", "created": 1_700_000_000,
            "model": f"{request['model']}-2024-07-18", "system_fingerprint": "fp_stub",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Paris."}}],
            "usage": USAGE}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def provider():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ProviderStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_instrumented_openai_client_to_clickhouse_each_token_once_org_from_key_retry_deduplicated(
        kafka_bootstrap, topic_factory, tmp_path, provider):
    from openai import OpenAI
    from openinference.instrumentation.openai import OpenAIInstrumentor
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    events_topic, dlq_topic = topic_factory(partitions=2, prefix="api-e2e"), topic_factory(prefix="api-e2e-dlq")
    api = Server(tmp_path, {"GATEWATCH_KAFKA__BOOTSTRAP": kafka_bootstrap, "GATEWATCH_KAFKA__EVENTS_TOPIC": events_topic})
    try:
        key = api.create_key("acme", "us")
        memory = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
        instrumentor = OpenAIInstrumentor()
        instrumentor.instrument(tracer_provider=tracer_provider)
        try:
            client = OpenAI(base_url=provider, api_key="sk-stub", max_retries=0)
            for _ in range(2):
                answer = client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Capital of France?"}])
                assert answer.choices[0].message.content == "Paris."
        finally:
            instrumentor.uninstrument()
        tracer_provider.shutdown()
        spans = list(memory.get_finished_spans())
        assert len(spans) == 2
        exporter = OTLPSpanExporter(endpoint=f"{api.url}/v1/traces", headers={"Authorization": f"Bearer {key}"})
        assert exporter.export(spans).name == "SUCCESS"
        assert exporter.export(spans[:1]).name == "SUCCESS"  # a retried export of the first span
        exporter.shutdown()
    finally:
        api.stop()  # closing flushes the producer: everything accepted is in Kafka now

    settings = load_settings(environ={}, use_service_state=False, overrides={
        "kafka": {"bootstrap": kafka_bootstrap, "events_topic": events_topic, "dlq_topic": dlq_topic, "tail": False},
        "sinks": ["parquet", "clickhouse", "dlq"],
        "parquet": {"root": str(tmp_path / "raw")},
        "clickhouse": {"url": f"chdb://{tmp_path / 'chdb'}", "database": "api_e2e"},
    })
    run_main(build_flow(settings))
    clickhouse = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    rows = clickhouse.rows(
        "SELECT event_id, org_id, region, provider, model, model_version, input_tokens, cache_read_tokens, "
        "cache_write_tokens, output_tokens, reasoning_tokens, trace_id, span_id FROM api_e2e.events FINAL "
        "ORDER BY event_id")
    want_ids = sorted(f"otel-{s.context.trace_id:032x}-{s.context.span_id:016x}" for s in spans)
    assert [row[0] for row in rows] == want_ids  # three exports, two spans, two rows
    for event_id, org, region, provider_name, model, version, uncached, cache_read, cache_write, output, \
            reasoning, trace_id, span_id in rows:
        assert (org, region, provider_name, model, version) == ("acme", "us", "openai", "gpt-4o-mini",
                                                                "gpt-4o-mini-2024-07-18")
        # Every prompt token exactly once (the span's prompt count includes the 1024
        # cached ones), reasoning tokens inside output, never added.
        assert (uncached, cache_read, cache_write, output, reasoning) == (176, 1024, 0, 80, 30)
        # The stored row joins the client's own trace.
        assert event_id == f"otel-{trace_id}-{span_id}"
    (prompt, response), = set(clickhouse.rows("SELECT prompt, response FROM api_e2e.events FINAL"))
    assert "Capital of France?" in prompt and "Paris." in response
