"""`gatewatch serve` against the real broker: the OpenTelemetry SDK's OTLP/HTTP exporter
(protobuf, gzip) and OTLP/JSON bodies, JSON events, API keys, and honest HTTP, checked by
reading the Kafka topic back."""

from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode

from tests.processes import REPO, run_cli
from tests.test_producer import consume, decoded

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m ops.cli serve` in a child process, its JSON logs in a file."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / f"serve-{self.port}.log"
        self.env = {**os.environ, "GATEWATCH_API__KEYS_PATH": str(root / "keys.sqlite"),
                    "GATEWATCH_API__SPOOL_DIR": str(root / "spool"), **env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "serve", "--port", str(self.port)],
                                         cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited: {self.log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"serve did not answer within 60 s: {self.log_path.read_text()[-3000:]}")

    def create_key(self, org: str, region: str | None = None) -> str:
        result = run_cli("api-keys", "create", "--org", org, *(["--region", region] if region else []),
                         env=self.env, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def logs(self) -> list[dict]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def api(kafka_bootstrap, topic_factory, tmp_path_factory):
    topic, dlq_topic = topic_factory(prefix="api"), topic_factory(prefix="api-dlq")
    server = Server(tmp_path_factory.mktemp("api"), {
        "GATEWATCH_KAFKA__BOOTSTRAP": kafka_bootstrap, "GATEWATCH_KAFKA__EVENTS_TOPIC": topic,
        "GATEWATCH_KAFKA__DLQ_TOPIC": dlq_topic,
        "GATEWATCH_API__KEY_CACHE_S": "0.5", "GATEWATCH_API__MAX_BODY_BYTES": str(256 * 1024),
        "GATEWATCH_API__MAX_DECOMPRESSED_BYTES": str(1024 * 1024)})
    server.topic, server.dlq_topic = topic, dlq_topic
    server.key = server.create_key("acme", "eu")
    yield server
    server.stop()


def _by_id(bootstrap: str, topic: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for event in decoded(consume(bootstrap, topic)):
        found.setdefault(event["event_id"], []).append(event)
    return found


def _wait_for(bootstrap: str, topic: str, event_ids: set[str], timeout: float = 30,
              copies: int = 1) -> dict[str, list[dict]]:
    """The topic's events by id, once each of ``event_ids`` is there ``copies`` times."""
    deadline = time.monotonic() + timeout
    while True:
        found = _by_id(bootstrap, topic)
        if all(len(found.get(event_id, ())) >= copies for event_id in event_ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def _record_spans(service: str = "gateway") -> list:
    """Spans made by the real OpenTelemetry SDK, as an instrumented gateway would."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("POST /chat"):  # the gateway's own HTTP span: not GenAI
        with tracer.start_as_current_span("chat gpt-4o-mini") as span:
            span.set_attributes({
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
                "gen_ai.usage.input_tokens": 2000, "gen_ai.usage.output_tokens": 300,
                "gen_ai.usage.cache_read.input_tokens": 1536, "gen_ai.usage.cache_creation.input_tokens": 64,
                "gen_ai.usage.reasoning.output_tokens": 256,
                "user.id": "u-7", "gen_ai.conversation.id": "c-1", "org_id": "evil-corp",
                "gen_ai.input.messages": json.dumps([{"role": "user", "parts": [
                    {"type": "text", "content": "My email is ana@example.com"}]}]),
            })
            time.sleep(0.02)
        with tracer.start_as_current_span("chat claude") as span:
            span.set_attributes({"gen_ai.operation.name": "chat", "gen_ai.system": "anthropic",
                                 "gen_ai.request.model": "claude-sonnet-4", "error.type": "overloaded",
                                 "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 0})
            span.set_status(Status(StatusCode.ERROR))
    provider.shutdown()
    return list(memory.get_finished_spans())


def _event_id(span) -> str:
    context = span.get_span_context()
    return f"otel-{context.trace_id:032x}-{context.span_id:016x}"


def test_sdk_exporter_protobuf_gzip_each_token_kind_once_org_from_key_retry_is_a_duplicate(api, kafka_bootstrap):
    spans = _record_spans()
    exporter = OTLPSpanExporter(endpoint=f"{api.url}/v1/traces", headers={"Authorization": f"Bearer {api.key}"},
                                compression=Compression.Gzip, timeout=10)
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    assert exporter.export(spans) == SpanExportResult.SUCCESS  # the exporter's retry of the same batch
    exporter.shutdown()
    chat, claude = (span for span in spans if span.name.startswith("chat"))
    found = _wait_for(kafka_bootstrap, api.topic, {_event_id(chat), _event_id(claude)}, copies=2)
    # The HTTP span is dropped; each GenAI span arrives once per export with the same
    # event_id, so the flow's dedupe keeps one.
    assert set(found) >= {_event_id(chat), _event_id(claude)}
    assert not [e for e in found if e.startswith("otel-") and e not in (_event_id(chat), _event_id(claude))]
    copies = found[_event_id(chat)]
    assert len(copies) == 2 and copies[0] == copies[1]
    event = copies[0]
    assert (event["input_tokens"], event["cache_read_tokens"], event["cache_write_tokens"],
            event["output_tokens"]) == (400, 1536, 64, 300)
    # Reasoning is shown apart, inside output (never added), and the span's ids link the event to the trace.
    assert event["reasoning_tokens"] == 256 and event["schema_version"] == 2
    context = chat.get_span_context()
    assert (event["trace_id"], event["span_id"]) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert event["input_tokens"] + event["cache_read_tokens"] + event["cache_write_tokens"] == 2000
    assert (event["org_id"], event["region"], event["user_id"]) == ("acme", "eu", "u-7")
    assert (event["model"], event["model_version"], event["conversation_id"]) == (
        "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "c-1")
    assert event["latency_ms"] >= 20 and event["prompt"] == "user: My email is ana@example.com"
    failed = found[_event_id(claude)][0]
    assert (failed["provider"], failed["status_code"], failed["error_code"]) == ("anthropic", 500, "overloaded")


def _otlp_json(spans) -> dict:
    """The OTLP/JSON encoding (hex ids, camelCase) of spans, as JS/Go exporters send it."""
    document = json_format.MessageToDict(encode_spans(spans))
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return document


def test_otlp_json_with_one_bad_span_is_a_partial_success(api, kafka_bootstrap):
    spans = _record_spans()
    document = _otlp_json(spans)
    bad = document["resourceSpans"][0]["scopeSpans"][0]["spans"][1]
    assert bad["name"] == "chat claude"
    bad["attributes"] = [a for a in bad["attributes"] if a["key"] != "gen_ai.request.model"]
    response = httpx.post(f"{api.url}/v1/traces", json=document,
                          headers={"Authorization": f"Bearer {api.key}", "X-Request-Id": "req-json-1"})
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "req-json-1"
    partial = response.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "1" and "gen_ai.request.model" in partial["errorMessage"]
    chat = next(span for span in spans if span.name.startswith("chat gpt"))
    found = _wait_for(kafka_bootstrap, api.topic, {_event_id(chat)})
    assert found[_event_id(chat)][0]["cache_read_tokens"] == 1536
    claude = next(s for s in spans if s.name == "chat claude")
    assert _event_id(claude) not in found
    [record] = _dlq_by_request(kafka_bootstrap, api.dlq_topic, "req-json-1", 1)
    assert (record["code"], record["event_id"]) == ("invalid_span", _event_id(claude))
    assert "gen_ai.request.model" in record["reason"]


def test_otlp_protobuf_all_bad_is_400_with_a_status(api):
    spans = [s for s in _record_spans() if s.name == "chat claude"]
    request = encode_spans(spans)
    for attribute in list(request.resource_spans[0].scope_spans[0].spans[0].attributes):
        if attribute.key == "gen_ai.request.model":
            request.resource_spans[0].scope_spans[0].spans[0].attributes.remove(attribute)
    response = httpx.post(f"{api.url}/v1/traces", content=request.SerializeToString(),
                          headers={"Authorization": f"Bearer {api.key}", "Content-Type": "application/x-protobuf"})
    assert response.status_code == 400
    from google.rpc.status_pb2 import Status as RpcStatus
    assert "gen_ai.request.model" in RpcStatus.FromString(response.content).message


def test_otlp_protobuf_that_does_not_parse_is_400_with_a_status(api):
    from google.rpc.status_pb2 import Status as RpcStatus

    truncated = encode_spans(_record_spans()).SerializeToString()[:-7]
    for body in (truncated, b"\x0a\xff\xff\xff"):
        response = httpx.post(f"{api.url}/v1/traces", content=body,
                              headers={"Authorization": f"Bearer {api.key}", "Content-Type": "application/x-protobuf"})
        assert response.status_code == 400
        assert "not an OTLP ExportTraceServiceRequest" in RpcStatus.FromString(response.content).message


def test_only_non_genai_spans_is_an_empty_success(api):
    spans = [s for s in _record_spans() if s.name == "POST /chat"]
    response = httpx.post(f"{api.url}/v1/traces", content=encode_spans(spans).SerializeToString(),
                          headers={"Authorization": f"Bearer {api.key}", "Content-Type": "application/x-protobuf"})
    assert response.status_code == 200
    assert not ExportTraceServiceResponse.FromString(response.content).HasField("partial_success")
    dropped = [line for line in httpx.get(f"{api.url}/metrics").text.splitlines()
               if line.startswith("gatewatch_api_spans_dropped_total ")]
    assert dropped and float(dropped[0].split()[1]) >= 1


def _event(i: int, **fields) -> dict:
    return {"event_id": f"json-{i}-{time.time_ns()}", "request_id": f"r-{i}", "event_time": int(time.time() * 1000),
            "user_id": "u-1", "org_id": "not-acme", "model": "gpt-4o", "latency_ms": 12, "input_tokens": 5,
            "output_tokens": 6, **fields}


def test_json_events_object_array_ndjson_org_from_key(api, kafka_bootstrap):
    headers = {"Authorization": f"Bearer {api.key}"}
    one, batch, lines = _event(1), [_event(2), _event(3)], [_event(4), _event(5)]
    assert httpx.post(f"{api.url}/v1/events", json=one, headers=headers).json() == {"accepted": 1, "rejected_count": 0}
    assert httpx.post(f"{api.url}/v1/events", json=batch, headers=headers).json()["accepted"] == 2
    ndjson = "\n".join(json.dumps(e) for e in lines).encode()
    response = httpx.post(f"{api.url}/v1/events", content=gzip.compress(ndjson),
                          headers={**headers, "Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"})
    assert response.json()["accepted"] == 2
    ids = {e["event_id"] for e in [one, *batch, *lines]}
    found = _wait_for(kafka_bootstrap, api.topic, ids)
    assert ids <= set(found)
    assert {(found[i][0]["org_id"], found[i][0]["region"]) for i in ids} == {("acme", "eu")}


def test_json_events_take_trace_context_from_their_fields_or_the_traceparent_header(api, kafka_bootstrap):
    header_trace, header_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    own_trace, own_span = "0AF7651916CD43DD8448EB211C80319C", "B7AD6B7169203331"
    plain, own = _event(20, output_tokens=90, reasoning_tokens=64), _event(21, trace_id=own_trace, span_id=own_span)
    headers = {"Authorization": f"Bearer {api.key}", "traceparent": f"00-{header_trace}-{header_span}-01"}
    assert httpx.post(f"{api.url}/v1/events", json=[plain, own], headers=headers).json()["accepted"] == 2
    malformed = _event(22)
    headers["traceparent"] = f"00-{'0' * 32}-{header_span}-01"  # the W3C invalid trace id: ignored
    assert httpx.post(f"{api.url}/v1/events", json=malformed, headers=headers).json()["accepted"] == 1
    found = _wait_for(kafka_bootstrap, api.topic, {plain["event_id"], own["event_id"], malformed["event_id"]})
    stored = {name: found[event["event_id"]][0] for name, event in
              (("plain", plain), ("own", own), ("malformed", malformed))}
    assert (stored["plain"]["trace_id"], stored["plain"]["span_id"]) == (header_trace, header_span)
    assert (stored["plain"]["output_tokens"], stored["plain"]["reasoning_tokens"]) == (90, 64)
    assert (stored["own"]["trace_id"], stored["own"]["span_id"]) == (own_trace.lower(), own_span.lower())
    assert (stored["malformed"]["trace_id"], stored["malformed"]["span_id"]) == (None, None)
    bad = [line for line in httpx.get(f"{api.url}/metrics").text.splitlines()
           if line.startswith("gatewatch_api_bad_traceparent_total ")]
    assert bad and float(bad[0].split()[1]) >= 1


def test_bad_trace_ids_and_reasoning_above_output_are_400_naming_the_field(api):
    headers = {"Authorization": f"Bearer {api.key}"}
    for changes, field in (({"trace_id": "xyz"}, "trace_id"), ({"span_id": "0" * 16}, "span_id"),
                           ({"output_tokens": 10, "reasoning_tokens": 11}, "reasoning_tokens")):
        response = httpx.post(f"{api.url}/v1/events", json=_event(30, **changes), headers=headers)
        assert response.status_code == 400, changes
        assert response.json()["field"] == field


def test_bad_events_get_400_with_field_and_rule_or_a_partial_200(api, kafka_bootstrap):
    headers = {"Authorization": f"Bearer {api.key}"}
    response = httpx.post(f"{api.url}/v1/events", json=_event(6, input_tokens=-5), headers=headers)
    assert response.status_code == 400
    body = response.json()
    assert body["field"] == "input_tokens" and body["code"] == "out_of_range" and "input_tokens" in body["error"]
    good = _event(7)
    missing_model = _event(8)
    del missing_model["model"]
    response = httpx.post(f"{api.url}/v1/events", json=[missing_model, good, "nope"], headers=headers)
    assert response.status_code == 200
    body = response.json()
    assert body["accepted"] == 1 and body["rejected_count"] == 2
    assert [(r["index"], r["code"]) for r in body["rejected"]] == [(0, "missing_field"), (2, "wrong_type")]
    assert httpx.post(f"{api.url}/v1/events", content=b"{not json", headers=headers).status_code == 400
    found = _wait_for(kafka_bootstrap, api.topic, {good["event_id"]})
    assert good["event_id"] in found and missing_model["event_id"] not in found


def _dlq_by_request(bootstrap: str, topic: str, request_id: str, count: int) -> list[dict]:
    from schemas.dlq import decode_dlq
    from sinks.kafka import read_topic

    deadline = time.monotonic() + 30
    while True:
        found = [record for _p, _o, record in read_topic(bootstrap, topic, decode_dlq)
                 if record["request_id"] == request_id]
        if len(found) >= count or time.monotonic() > deadline:
            return sorted(found, key=lambda r: r["dlq_id"])
        time.sleep(0.3)


def test_rejected_input_leaves_a_dlq_record_without_its_text(api, kafka_bootstrap):
    headers = {"Authorization": f"Bearer {api.key}", "X-Request-Id": "req-dlq-1"}
    bad = _event(12, prompt="mail me at ana.secret@example.com", input_tokens=-1)
    assert httpx.post(f"{api.url}/v1/events", json=[bad, _event(13)], headers=headers).status_code == 200
    unreadable = {**headers, "X-Request-Id": "req-dlq-2"}
    assert httpx.post(f"{api.url}/v1/events", content=b"{not json", headers=unreadable).status_code == 400
    [record] = _dlq_by_request(kafka_bootstrap, api.dlq_topic, "req-dlq-1", 1)
    assert (record["stage"], record["code"], record["event_id"], record["dlq_id"]) == (
        "api", "out_of_range", bad["event_id"], "api:req-dlq-1:0")
    assert "input_tokens" in record["reason"]
    assert record["original"] is None and record["text_withheld"] and record["original_size"] > 0
    [body_record] = _dlq_by_request(kafka_bootstrap, api.dlq_topic, "req-dlq-2", 1)
    assert body_record["code"] == "bad_body" and body_record["original"] is None
    raw = b"".join(msg.value() for msg in consume(kafka_bootstrap, api.dlq_topic))
    assert b"ana.secret" not in raw


def test_keys_401_403_and_revocation_within_seconds(api):
    assert httpx.post(f"{api.url}/v1/events", json=_event(9)).status_code == 401
    assert httpx.post(f"{api.url}/v1/events", json=_event(9),
                      headers={"Authorization": "Bearer gwk_000000000000_nope"}).status_code == 401
    key = api.create_key("beta")
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{api.url}/v1/events", json=_event(10), headers=headers).status_code == 200
    key_id = key.split("_")[1]
    assert run_cli("api-keys", "revoke", key_id, env=api.env, timeout=60).returncode == 0
    deadline = time.monotonic() + 5
    while httpx.post(f"{api.url}/v1/events", json=[], headers=headers).status_code != 403:
        assert time.monotonic() < deadline, "a revoked key still works after 5 s"
        time.sleep(0.1)
    listed = run_cli("api-keys", "list", "--org", "beta", env=api.env, timeout=60).stdout
    assert json.loads(listed)["revoked"] is True and key.split("_", 2)[2] not in listed
    assert key.split("_", 2)[2] not in (Path(api.env["GATEWATCH_API__KEYS_PATH"]).read_bytes().decode("latin-1"))


def test_size_limits_are_413_compressed_or_not(api):
    headers = {"Authorization": f"Bearer {api.key}"}
    big = json.dumps([_event(i) for i in range(2000)]).encode()
    assert len(big) > 256 * 1024
    assert httpx.post(f"{api.url}/v1/events", content=big, headers=headers).status_code == 413
    bomb = gzip.compress(b" " * (2 * 1024 * 1024))
    response = httpx.post(f"{api.url}/v1/events", content=bomb, headers={**headers, "Content-Encoding": "gzip"})
    assert response.status_code == 413 and "decompressed" in response.json()["error"]


def test_health_readiness_metrics_and_json_logs(api):
    assert httpx.get(f"{api.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{api.url}/readyz").status_code == 200
    assert httpx.get(f"{api.url}/nowhere").status_code == 404
    assert httpx.get(f"{api.url}/v1/events").status_code == 405
    httpx.post(f"{api.url}/v1/events", json=_event(11), headers={"X-Request-Id": "req-unauth-1"})
    httpx.post(f"{api.url}/v1/events", json=_event(14), headers={"Authorization": f"Bearer {api.key}"})
    metrics = httpx.get(f"{api.url}/metrics").text
    assert 'gatewatch_api_requests_total{route="/v1/events",status="401"}' in metrics
    assert 'gatewatch_api_events_total{outcome="accepted",source="json"}' in metrics
    assert "gatewatch_producer_sent_total" in metrics
    deadline = time.monotonic() + 5
    while not any(line.get("request_id") == "req-unauth-1" and line.get("status") == 401 for line in api.logs()):
        assert time.monotonic() < deadline, api.log_path.read_text()[-2000:]
        time.sleep(0.1)
    assert "ana@example.com" not in api.log_path.read_text()


def test_429_with_retry_after_when_kafka_cannot_keep_up(tmp_path):
    """A broker that never answers: events wait in the producer until max_pending, then
    the API says 429 instead of growing memory or overflowing the spool."""
    server = Server(tmp_path, {"GATEWATCH_KAFKA__BOOTSTRAP": f"127.0.0.1:{_free_port()}",
                               "GATEWATCH_API__MAX_PENDING": "5"})
    try:
        headers = {"Authorization": f"Bearer {server.create_key('acme')}"}
        first = httpx.post(f"{server.url}/v1/events", json=[_event(i) for i in range(5)], headers=headers)
        assert first.status_code == 200 and first.json()["accepted"] == 5
        refused = httpx.post(f"{server.url}/v1/events", json=_event(6), headers=headers)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert httpx.get(f"{server.url}/readyz").status_code == 503
    finally:
        server.stop()


def test_bench_api_reports_accepted_events_from_a_real_http_client(kafka_bootstrap):
    result = run_cli("bench", "api", "--duration", "1", "--warmup", "0", "--events-per-request", "20",
                     "--concurrency", "2", "--bootstrap", kafka_bootstrap, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for fmt in ("json", "otlp"):
        figures = report[fmt]
        assert figures["errors"] == 0 and figures["requests"] > 0
        assert figures["accepted"] == 20 * (figures["requests"] - figures["throttled"])
        assert figures["p99_ms"] >= figures["p50_ms"] > 0 and figures["server_cpu_s"] > 0


def test_bench_api_in_process_reports_cpu_per_acknowledged_event(kafka_bootstrap):
    result = run_cli("bench", "api", "--in-process", "3", "--events-per-request", "20", "--bootstrap", kafka_bootstrap,
                     timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["mode"] == "in-process"
    for fmt in ("json", "otlp"):
        figures = report[fmt]
        assert (figures["requests"], figures["accepted"], figures["unacknowledged"]) == (3, 60, 0)
        assert figures["cpu_us_per_event"] > 0 and figures["events_per_s_per_core"] > 0
