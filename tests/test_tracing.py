"""The pipeline's own OpenTelemetry spans (issue 16), received by a real OTLP/HTTP receiver
(tests/otlp_receiver.py): the ingest flow's batches (decode, redact, each sink's write) as
spans linked to the gateway traces of their events, `serve`'s requests as server spans
under the client's traceparent; with tracing off, no SDK and nothing sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from confluent_kafka import Producer

from connectors.producer import EventProducer
from ops.launch import flow_command
from ops.settings import TracingSettings
from ops.tracing import traces_url
from schemas.registry import LocalRegistry
from sinks.tracing import MAX_LINKS, event_contexts, rows_of
from tests.otlp_receiver import OtlpReceiver
from tests.processes import REPO
from tests.test_ingest_api import Server

SERVER_KIND, CLIENT_KIND = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
ERROR = 2  # Status.StatusCode.STATUS_CODE_ERROR
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # the BatchSpanProcessor's export interval (ms)


@pytest.fixture
def receiver():
    started = OtlpReceiver().start()
    yield started
    started.stop()


def _event(i: int, traced: bool) -> dict:
    event = {"event_id": f"tr-{i}", "request_id": f"req-{i}", "event_time": int(time.time() * 1000),
             "user_id": f"u-{i % 3}", "org_id": "acme", "region": "eu", "provider": "openai",
             "model": "gpt-4o-mini", "latency_ms": 40, "input_tokens": 100, "output_tokens": 20,
             "prompt": f"call me at +1 415 555 01{i:02d}"}
    if traced:
        event.update(trace_id=f"{0xabc0000 + i:032x}", span_id=f"{0x5000 + i:016x}")
    return event


# -- pure parts ---------------------------------------------------------------------------

def test_links_are_distinct_valid_and_bounded():
    events = [_event(i, traced=True) for i in range(MAX_LINKS + 50)]
    events += [events[0], _event(999, traced=False), {"trace_id": "0" * 32, "span_id": "1" * 16},
               {"trace_id": "not hex", "span_id": "x"}, "not an event"]
    contexts = event_contexts(events[:3] + events[-5:])
    assert [(f"{c.trace_id:032x}", f"{c.span_id:016x}") for c in contexts] == [
        (e["trace_id"], e["span_id"]) for e in events[:3]]
    assert len(event_contexts(events)) == MAX_LINKS
    assert all(c.is_remote and c.trace_flags.sampled for c in contexts)


def test_rows_of_every_shape_a_sink_is_handed():
    assert rows_of([("eu", [1, 2]), ("us", [3])]) == [1, 2, 3]
    assert rows_of([[1, 2], [3]]) == [1, 2, 3]
    assert rows_of([{"a": 1}, {"b": 2}]) == [{"a": 1}, {"b": 2}]


def test_settings_and_the_traces_url():
    assert TracingSettings().otlp_endpoint == ""
    assert traces_url(TracingSettings(otlp_endpoint="http://jaeger:4318/").otlp_endpoint) == \
        "http://jaeger:4318/v1/traces"
    assert traces_url("https://tempo.example/otlp/v1/traces") == "https://tempo.example/otlp/v1/traces"
    with pytest.raises(ValueError, match="http"):
        TracingSettings(otlp_endpoint="jaeger:4318")


def test_policy_decision_logs_carry_the_gateways_trace_id_when_the_event_has_one():
    from dataflows.ingest import trace_id

    traced, untraced = _event(1, traced=True), _event(2, traced=False)
    assert trace_id(traced) == traced["trace_id"]
    derived = trace_id(untraced)
    assert len(derived) == 32 and derived == trace_id(dict(untraced)) and derived != trace_id(_event(3, traced=False))


# -- the real flow --------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.e2e
def test_flow_batches_are_spans_linked_to_their_events_traces(kafka_bootstrap, flow_topics_env, tmp_path,
                                                              receiver):
    topics = flow_topics_env(1)
    events = [_event(i, traced=i % 4 != 3) for i in range(40)]
    with EventProducer(kafka_bootstrap, topics["GATEWATCH_KAFKA__EVENTS_TOPIC"], LocalRegistry(),
                       tmp_path / "spool") as producer:
        for event in events:
            producer.send(event)
    garbage = Producer({"bootstrap.servers": kafka_bootstrap})
    for n in range(3):
        garbage.produce(topics["GATEWATCH_KAFKA__EVENTS_TOPIC"], f"not an event {n}".encode())
    assert garbage.flush(10) == 0
    env = {**os.environ, **topics, **FAST_EXPORT, "GATEWATCH_SINKS": "parquet,clickhouse,dlq",
           "GATEWATCH_PARQUET__ROOT": str(tmp_path / "raw"), "GATEWATCH_PARQUET__MAX_AGE_S": "1",
           "GATEWATCH_CLICKHOUSE__URL": f"chdb://{tmp_path / 'chdb'}", "GATEWATCH_CLICKHOUSE__DATABASE": "traced",
           "GATEWATCH_DLQ__SPOOL_PATH": str(tmp_path / "dlq-spool.jsonl"),
           "GATEWATCH_TRACING__OTLP_ENDPOINT": receiver.endpoint,
           "GATEWATCH_TRACING__SERVICE_NAME": "gatewatch-under-test"}
    with open(tmp_path / "flow.log", "wb") as log:
        finished = subprocess.run(flow_command("ingest"), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=300)
    assert finished.returncode == 0, (tmp_path / "flow.log").read_text()[-3000:]

    traced = {(e["trace_id"], e["span_id"]) for e in events if "trace_id" in e}
    decode, redact = receiver.named("gatewatch decode"), receiver.named("gatewatch redact")
    assert sum(s.attributes["gatewatch.batch.size"] for s in decode) == len(events) + 3
    assert sum(s.attributes["gatewatch.batch.dlq"] for s in decode) == 3
    assert sum(s.attributes["gatewatch.batch.passed"] for s in redact) == len(events)
    for stage in (decode, redact):
        assert {link for span in stage for link in span.links} == traced
    for store in ("parquet", "clickhouse", "dlq"):
        writes = receiver.named(f"gatewatch write {store}")
        assert writes and all(s.kind == CLIENT_KIND and s.attributes["gatewatch.sink"] == store for s in writes)
        rows = sum(s.attributes["gatewatch.batch.size"] for s in writes)
        assert rows == (3 if store == "dlq" else len(events)), store
        if store != "dlq":
            assert {link for span in writes for link in span.links} == traced, store
    every = decode + redact
    assert all(not s.parent_span_id for s in every)  # batch spans are roots: links, not parents
    assert {s.resource["service.name"] for s in receiver.spans} == {"gatewatch-under-test"}
    assert {s.resource["gatewatch.component"] for s in receiver.spans} == {"flow-ingest"}


@pytest.mark.integration
def test_tracing_off_installs_no_sdk_in_a_flow_process(receiver, flow_topics_env):
    """The flow process's own start-up (ops.launch.from_environment) without an endpoint: the
    API's proxy provider stays, the SDK's tracing and exporter modules are never imported
    (redis-py imports the SDK's metrics package for its own observability, so not that)."""
    probe = ("import sys; from ops.launch import from_environment; from opentelemetry import trace; "
             "from_environment('ingest'); print(type(trace.get_tracer_provider()).__name__, "
             "'opentelemetry.sdk.trace' in sys.modules, "
             "'opentelemetry.exporter.otlp.proto.http.trace_exporter' in sys.modules)")
    env = {name: value for name, value in os.environ.items() if not name.startswith("GATEWATCH_TRACING")}
    env.update(flow_topics_env(1), OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, **FAST_EXPORT)
    result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["ProxyTracerProvider", "False", "False"]
    assert receiver.requests == 0


# -- serve --------------------------------------------------------------------------------

def _serve(tmp_path_factory, kafka_bootstrap, topic_factory, endpoint: str, **env: str) -> Server:
    env = {"GATEWATCH_KAFKA__BOOTSTRAP": kafka_bootstrap, "GATEWATCH_KAFKA__EVENTS_TOPIC": topic_factory(prefix="trc"),
           "GATEWATCH_KAFKA__DLQ_TOPIC": topic_factory(prefix="trc-dlq"), **FAST_EXPORT, **env}
    env["GATEWATCH_TRACING__OTLP_ENDPOINT"] = endpoint
    return Server(tmp_path_factory.mktemp("serve-tracing"), env)


@pytest.mark.integration
def test_serve_requests_are_server_spans_under_the_clients_traceparent(tmp_path_factory, kafka_bootstrap,
                                                                       topic_factory, receiver):
    server = _serve(tmp_path_factory, kafka_bootstrap, topic_factory, receiver.endpoint)
    try:
        headers = {"Authorization": f"Bearer {server.create_key('acme')}"}
        parent_trace, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        traced = httpx.post(f"{server.url}/v1/events", json=[_event(1, traced=False)],
                            headers={**headers, "traceparent": f"00-{parent_trace}-{parent_span}-01",
                                     "X-Request-Id": "traced-1"})
        untraced = httpx.post(f"{server.url}/v1/events", json=[_event(2, traced=False)], headers=headers)
        refused = httpx.post(f"{server.url}/v1/events", json=[], headers={"X-Request-Id": "no-key"})
        assert (traced.status_code, untraced.status_code, refused.status_code) == (200, 200, 401)
        receiver.wait_for(lambda: len(receiver.named("POST /v1/events")) >= 3)
    finally:
        server.stop()
    spans = {s.attributes["gatewatch.request_id"]: s for s in receiver.named("POST /v1/events")}
    child = spans["traced-1"]
    assert (child.trace_id, child.parent_span_id, child.kind) == (parent_trace, parent_span, SERVER_KIND)
    assert child.attributes["http.response.status_code"] == 200
    assert child.attributes["http.route"] == "/v1/events"
    root = spans[untraced.headers["x-request-id"]]
    assert not root.parent_span_id and root.trace_id != parent_trace
    assert spans["no-key"].attributes["http.response.status_code"] == 401
    assert spans["no-key"].status_code != ERROR  # a 4xx is the client's error, not the server's
    assert {s.resource["gatewatch.component"] for s in receiver.spans} == {"serve"}


@pytest.mark.integration
def test_serve_without_an_endpoint_sends_nothing(tmp_path_factory, kafka_bootstrap, topic_factory, receiver):
    # Had any SDK been installed, the standard variable would send its spans to the receiver.
    server = _serve(tmp_path_factory, kafka_bootstrap, topic_factory, "",
                    OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
    try:
        headers = {"Authorization": f"Bearer {server.create_key('acme')}",
                   "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
        for i in range(5):
            assert httpx.post(f"{server.url}/v1/events", json=[_event(i, traced=False)],
                              headers=headers).status_code == 200
        time.sleep(1)  # ten export intervals, had an SDK been installed
    finally:
        server.stop()
    assert (receiver.requests, receiver.spans) == (0, [])


def test_bench_tracing_reports_the_cost_per_event_off_and_on():
    """A process of its own: the bench installs the SDK, which must not leak into this one."""
    result = subprocess.run([sys.executable, "-m", "ops.cli", "bench", "tracing", "--events", "2000", "--repeat", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["spans_per_pass"] == 8  # 2 batches x (decode, redact, parquet, clickhouse)
    assert {"cpu_us_per_event_off", "cpu_us_per_event_on", "cpu_us_per_event_added"} <= set(report)
