"""OTLP GenAI span -> gateway event: the pure mapping (no servers)."""

from __future__ import annotations

import json
import time

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span as PbSpan, Status

from connectors.ingest_api.app import parse_traceparent
from connectors.ingest_api.otlp import (TOKEN_CONVENTIONS, Span, SpanRejected, request_from_json, request_from_protobuf,
                                        span_to_event, spans_of, token_counts)
from schemas.codec import EventCodec
from schemas.registry import default_local_registry

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
NOW_NS = time.time_ns()


def genai_span(attributes: dict | None = None, **overrides) -> Span:
    base = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o"}
    fields = dict(trace_id=TRACE, span_id=SPAN, name="chat gpt-4o", start_ns=NOW_NS - 1_500_000_000,
                  end_ns=NOW_NS, status_error=False, attributes={**base, **(attributes or {})}, resource={})
    fields.update(overrides)
    return Span(**fields)


def tokens(attributes: dict) -> dict:
    return token_counts(genai_span(attributes))


def test_semconv_input_tokens_include_cache_so_cache_is_subtracted_once():
    # OTel: input_tokens 1200 INCLUDES 1000 cache reads and 100 cache writes -> 100 uncached.
    assert tokens({"gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 50,
                   "gen_ai.usage.cache_read.input_tokens": 1000,
                   "gen_ai.usage.cache_creation.input_tokens": 100}) == {
        "input_tokens": 100, "output_tokens": 50, "cache_read_tokens": 1000, "cache_write_tokens": 100,
        "reasoning_tokens": 0}


def test_total_tokens_are_preserved_not_double_counted():
    counts = tokens({"gen_ai.usage.input_tokens": 5000, "gen_ai.usage.output_tokens": 7,
                     "gen_ai.usage.cache_read.input_tokens": 4096})
    assert sum(counts.values()) - counts["reasoning_tokens"] == 5000 + 7


def test_reasoning_tokens_are_inside_output_and_not_added():
    counts = tokens({"gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 900,
                     "gen_ai.usage.reasoning.output_tokens": 800})
    assert counts["output_tokens"] == 900 and counts["reasoning_tokens"] == 800


@pytest.mark.parametrize("attributes", [
    {"gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 900, "gen_ai.usage.output_tokens.reasoning": 800},
    {"gen_ai.usage.prompt_tokens": 10, "gen_ai.usage.completion_tokens": 900, "gen_ai.usage.reasoning_tokens": 800},
    {"llm.token_count.prompt": 10, "llm.token_count.completion": 900,
     "llm.token_count.completion_details.reasoning": 800},
], ids=["sentry", "openllmetry", "openinference"])
def test_reasoning_tokens_of_every_convention_are_shown_apart_inside_output(attributes):
    counts = tokens(attributes)
    assert (counts["input_tokens"], counts["output_tokens"], counts["reasoning_tokens"]) == (10, 900, 800)


def test_output_smaller_than_its_reasoning_part_is_read_as_exclusive():
    # 50 visible completion tokens cannot include 800 reasoning ones: the output billed is 850.
    counts = tokens({"gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 50,
                     "gen_ai.usage.reasoning.output_tokens": 800})
    assert (counts["output_tokens"], counts["reasoning_tokens"]) == (850, 800)


def test_reasoning_of_another_convention_is_not_mixed_in():
    counts = tokens({"gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 90,
                     "llm.token_count.completion_details.reasoning": 60})
    assert (counts["output_tokens"], counts["reasoning_tokens"]) == (90, 0)


def test_negative_reasoning_count_names_the_attribute():
    with pytest.raises(SpanRejected) as caught:
        tokens({"gen_ai.usage.output_tokens": 9, "gen_ai.usage.reasoning.output_tokens": -1})
    assert caught.value.field == "gen_ai.usage.reasoning.output_tokens"


def test_span_trace_and_span_ids_are_the_events_trace_context():
    event = span_to_event(genai_span({"gen_ai.usage.output_tokens": 9}), "acme", "eu")
    assert (event["trace_id"], event["span_id"]) == (TRACE, SPAN)
    checked = EventCodec(default_local_registry()).check(event, NOW_NS // 1_000_000)
    assert (checked["trace_id"], checked["span_id"], checked["reasoning_tokens"]) == (TRACE, SPAN, 0)


def test_prompt_smaller_than_its_cache_is_read_as_exclusive():
    # Anthropic-style instrumentations report input beside the cache: 3 < 2000 cannot include it.
    assert tokens({"gen_ai.usage.input_tokens": 3, "gen_ai.usage.output_tokens": 20,
                   "gen_ai.usage.cache_read.input_tokens": 2000})["input_tokens"] == 3


def test_legacy_prompt_and_completion_tokens():
    assert tokens({"gen_ai.usage.prompt_tokens": 300, "gen_ai.usage.completion_tokens": 40}) == {
        "input_tokens": 300, "output_tokens": 40, "cache_read_tokens": 0, "cache_write_tokens": 0,
        "reasoning_tokens": 0}


def test_openinference_token_counts_with_cache_details():
    assert tokens({"llm.token_count.prompt": 1500, "llm.token_count.completion": 12,
                   "llm.token_count.total": 1512, "llm.token_count.prompt_details.cache_read": 1024}) == {
        "input_tokens": 476, "output_tokens": 12, "cache_read_tokens": 1024, "cache_write_tokens": 0,
        "reasoning_tokens": 0}


def test_one_convention_only_when_a_span_carries_two():
    # Some SDKs emit both the new and the legacy names for the same usage: never summed.
    counts = tokens({"gen_ai.usage.input_tokens": 200, "gen_ai.usage.prompt_tokens": 200,
                     "gen_ai.usage.output_tokens": 9, "gen_ai.usage.completion_tokens": 9})
    assert counts["input_tokens"] == 200 and counts["output_tokens"] == 9


@pytest.mark.parametrize("value,rule", [(-1, "must not be negative"), ("12", "must be a number"),
                                        (True, "must be a number")])
def test_bad_token_counts_name_the_attribute(value, rule):
    with pytest.raises(SpanRejected) as caught:
        tokens({"gen_ai.usage.input_tokens": value})
    assert caught.value.field == "gen_ai.usage.input_tokens" and caught.value.rule == rule


def test_full_event_fields():
    event = span_to_event(genai_span({
        "gen_ai.response.model": "gpt-4o-2024-08-06", "user.id": "u-42", "gen_ai.conversation.id": "conv-1",
        "gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 5,
        "org_id": "someone-else"}), "acme", "eu")
    assert event["event_id"] == f"otel-{TRACE}-{SPAN}"
    assert event["org_id"] == "acme" and event["region"] == "eu"
    assert event["model"] == "gpt-4o" and event["model_version"] == "gpt-4o-2024-08-06"
    assert event["provider"] == "openai" and event["endpoint"] == "chat.completions"
    assert event["user_id"] == "u-42" and event["conversation_id"] == "conv-1"
    assert event["latency_ms"] == 1500 and event["event_time"] == (NOW_NS - 1_500_000_000) // 1_000_000
    assert event["status_code"] == 200 and event["error_code"] is None
    # The producer's codec accepts what the mapping makes.
    EventCodec(default_local_registry()).check(event, NOW_NS // 1_000_000)


def test_response_model_when_no_request_model_and_legacy_system():
    span = genai_span({"gen_ai.system": "aws.bedrock", "gen_ai.response.model": "claude-x"})
    del span.attributes["gen_ai.request.model"], span.attributes["gen_ai.provider.name"]
    event = span_to_event(span, "acme", "us")
    assert event["model"] == "claude-x" and event["model_version"] is None and event["provider"] == "bedrock"


def test_user_from_enduser_or_resource_and_default():
    assert span_to_event(genai_span({"enduser.id": "e-1"}), "o", "us")["user_id"] == "e-1"
    assert span_to_event(genai_span(resource={"user.id": "r-1"}), "o", "us")["user_id"] == "r-1"
    assert span_to_event(genai_span(), "o", "us")["user_id"] == "anonymous"


def test_error_status_and_error_type():
    event = span_to_event(genai_span({"error.type": "rate limited!", "http.response.status_code": 429}), "o", "us")
    assert event["status_code"] == 429 and event["error_code"] == "rate_limited_"
    event = span_to_event(genai_span(status_error=True), "o", "us")
    assert event["status_code"] == 500 and event["error_code"] == "error"


def test_non_genai_span_maps_to_none():
    assert span_to_event(genai_span(attributes=None, name="GET /"), "o", "us") is not None
    plain = Span(TRACE, SPAN, "GET /", NOW_NS, NOW_NS, False, {"http.request.method": "GET"}, {})
    assert span_to_event(plain, "o", "us") is None
    openinference = Span(TRACE, SPAN, "llm", NOW_NS, NOW_NS, False,
                         {"openinference.span.kind": "LLM", "llm.model_name": "m"}, {})
    assert span_to_event(openinference, "o", "us")["model"] == "m"


@pytest.mark.parametrize("change,field", [
    ({"attributes": {"gen_ai.request.model": ""}}, "gen_ai.request.model"),
    ({"end_ns": NOW_NS - 2_000_000_000}, "end_time_unix_nano"),
    ({"span_id": "0" * 16}, "trace_id/span_id"),
    ({"start_ns": 0, "end_ns": 0}, "start_time_unix_nano"),
])
def test_rejected_spans_name_the_field(change, field):
    attributes = change.pop("attributes", None)
    with pytest.raises(SpanRejected) as caught:
        span_to_event(genai_span(attributes, **change), "o", "us")
    assert caught.value.field == field


def test_prompt_and_response_from_semconv_attributes():
    messages_in = [{"role": "user", "parts": [{"type": "text", "content": "Hi there"}]}]
    messages_out = [{"role": "assistant", "parts": [{"type": "text", "content": "Hello!"}], "finish_reason": "stop"}]
    event = span_to_event(genai_span({"gen_ai.input.messages": json.dumps(messages_in),
                                      "gen_ai.output.messages": json.dumps(messages_out)}), "o", "us")
    assert event["prompt"] == "user: Hi there" and event["response"] == "assistant: Hello!"


def test_prompt_and_response_from_legacy_span_events():
    span = genai_span(events=[("gen_ai.system.message", {"content": "Be brief"}),
                              ("gen_ai.user.message", {"content": "What is 2+2?"}),
                              ("gen_ai.choice", {"message": json.dumps({"role": "assistant", "content": "4"})})])
    event = span_to_event(span, "o", "us")
    assert event["prompt"] == "system: Be brief\nuser: What is 2+2?" and event["response"] == "assistant: 4"


def test_openinference_requested_model_from_invocation_parameters():
    span = Span(TRACE, SPAN, "ChatCompletion", NOW_NS - 10**9, NOW_NS, False,
                {"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o-mini-2024-07-18", "llm.provider": "openai",
                 "llm.invocation_parameters": json.dumps({"model": "gpt-4o-mini", "temperature": 0})}, {})
    event = span_to_event(span, "o", "us")
    assert (event["model"], event["model_version"], event["provider"]) == (
        "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "openai")


def test_prompt_from_openinference_flattened_messages():
    span = genai_span({"llm.input_messages.0.message.role": "user", "llm.input_messages.0.message.content": "q",
                       "llm.output_messages.0.message.role": "assistant",
                       "llm.output_messages.0.message.content": "a"})
    event = span_to_event(span, "o", "us")
    assert (event["prompt"], event["response"]) == ("user: q", "assistant: a")


def _pb_request() -> ExportTraceServiceRequest:
    def kv(key, **value):
        return KeyValue(key=key, value=AnyValue(**value))
    span = PbSpan(trace_id=bytes.fromhex(TRACE), span_id=bytes.fromhex(SPAN), name="chat",
                  start_time_unix_nano=NOW_NS - 10**9, end_time_unix_nano=NOW_NS,
                  status=Status(code=Status.STATUS_CODE_OK),
                  attributes=[kv("gen_ai.operation.name", string_value="chat"),
                              kv("gen_ai.request.model", string_value="gpt-4o-mini"),
                              kv("gen_ai.usage.input_tokens", int_value=1300),
                              kv("gen_ai.usage.cache_read.input_tokens", int_value=1280),
                              kv("gen_ai.usage.output_tokens", int_value=4)])
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource={"attributes": [kv("service.name", string_value="gw")]},
        scope_spans=[ScopeSpans(spans=[span])])])


def test_protobuf_and_json_requests_map_to_the_same_event():
    from google.protobuf import json_format

    request = _pb_request()
    from_pb = [span_to_event(s, "o", "us") for s in spans_of(request_from_protobuf(request.SerializeToString()))]
    document = json_format.MessageToDict(request)
    # OTLP/JSON carries ids as hex (protobuf's own JSON mapping would use base64).
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                span["traceId"], span["spanId"] = TRACE, SPAN
    from_json = [span_to_event(s, "o", "us") for s in spans_of(request_from_json(document))]
    assert from_pb == from_json
    assert from_pb[0]["input_tokens"] == 20 and from_pb[0]["cache_read_tokens"] == 1280
    assert from_pb[0]["event_id"] == f"otel-{TRACE}-{SPAN}"


def _decoded_attributes(*key_values: KeyValue) -> dict:
    span = PbSpan(trace_id=bytes.fromhex(TRACE), span_id=bytes.fromhex(SPAN), name="s", attributes=list(key_values))
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])])
    [decoded] = spans_of(request_from_protobuf(request.SerializeToString()))
    return decoded.attributes


def test_every_otlp_value_kind_decodes_to_its_python_value():
    from opentelemetry.proto.common.v1.common_pb2 import ArrayValue, KeyValueList

    def kv(key, **value):
        return KeyValue(key=key, value=AnyValue(**value))
    assert _decoded_attributes(
        kv("text", string_value="gpt-4o"), kv("empty", string_value=""), kv("count", int_value=4131),
        kv("negative", int_value=-(2**63)), kv("zero", int_value=0), kv("flag", bool_value=True),
        kv("off", bool_value=False), kv("ratio", double_value=0.5), kv("raw", bytes_value=b"\x00\xff"),
        kv("list", array_value=ArrayValue(values=[AnyValue(string_value="a"), AnyValue(int_value=2)])),
        kv("map", kvlist_value=KeyValueList(values=[kv("k", string_value="v")])), KeyValue(key="unset"),
    ) == {"text": "gpt-4o", "empty": "", "count": 4131, "negative": -(2**63), "zero": 0, "flag": True, "off": False,
          "ratio": 0.5, "raw": b"\x00\xff", "list": ["a", 2], "map": {"k": "v"}, "unset": None}


@pytest.mark.parametrize("convention", TOKEN_CONVENTIONS, ids=[c[0] for c in TOKEN_CONVENTIONS])
def test_every_token_attribute_naming_decoded_from_protobuf_counts_each_kind_once(convention):
    _name, total_in, out, cache_read, cache_write, reasoning_names = convention
    for reasoning in reasoning_names:
        counts = {total_in: 1000, out: 300, cache_read: 600, cache_write: 100, reasoning: 120}
        attributes = _decoded_attributes(
            *(KeyValue(key=key, value=AnyValue(int_value=value)) for key, value in counts.items()),
            KeyValue(key="gen_ai.operation.name", value=AnyValue(string_value="chat")))
        assert token_counts(genai_span(attributes)) == {
            "input_tokens": 300, "output_tokens": 300, "cache_read_tokens": 600, "cache_write_tokens": 100,
            "reasoning_tokens": 120}, reasoning


def test_unknown_attributes_of_any_kind_are_ignored():
    request = _pb_request()
    span = request.resource_spans[0].scope_spans[0].spans[0]
    plain = [span_to_event(s, "o", "us") for s in spans_of(request_from_protobuf(request.SerializeToString()))]
    span.attributes.extend([KeyValue(key="server.address", value=AnyValue(string_value="api.openai.com")),
                            KeyValue(key="gen_ai.request.temperature", value=AnyValue(double_value=0.2)),
                            KeyValue(key="gen_ai.response.finish_reasons", value=AnyValue(string_value="stop")),
                            KeyValue(key="vendor.flag", value=AnyValue(bool_value=True)),
                            KeyValue(key="vendor.blob", value=AnyValue(bytes_value=b"\x01")), KeyValue(key="unset")])
    request.resource_spans[0].resource.attributes.extend([KeyValue(key="host.name", value=AnyValue(string_value="h"))])
    extended = [span_to_event(s, "o", "us") for s in spans_of(request_from_protobuf(request.SerializeToString()))]
    assert extended == plain


@pytest.mark.parametrize("body", [b"\x0a\xff\xff\xff", b"\x0a\x05\x12\x03\x12\x01", b"\xff" * 8],
                         ids=["length-past-the-end", "nested-truncated", "bad-tag"])
def test_malformed_protobuf_is_refused_as_a_whole(body):
    from google.protobuf.message import DecodeError

    with pytest.raises(DecodeError):
        list(spans_of(request_from_protobuf(body)))


def test_json_request_with_bad_ids_is_rejected():
    with pytest.raises(SpanRejected):
        request_from_json({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz"}]}]}]})
    with pytest.raises(SpanRejected):
        request_from_json([1, 2])


W3C_IDS = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")


@pytest.mark.parametrize("header,expected", [
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", W3C_IDS),
    (" 00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-00 ", W3C_IDS),
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future", W3C_IDS),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", None),  # version 00 ends at the flags
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
    (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),
    (f"00-4bf92f3577b34da6a3ce929d0e0e4736-{'0' * 16}-01", None),
    ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),
    ("not a traceparent", None),
])
def test_traceparent_header_parsing_follows_w3c_trace_context(header, expected):
    assert parse_traceparent(header) == expected


def test_schema_defaults_give_the_event_every_field_and_change_nothing_validation_returns():
    from types import SimpleNamespace

    from connectors.ingest_api.app import schema_defaults
    from ops.bench.api import otlp_bodies

    codec = EventCodec(default_local_registry())
    defaults = schema_defaults(SimpleNamespace(codec=codec))
    assert schema_defaults(SimpleNamespace()) is None  # a producer without a codec: no defaults
    spans = [*spans_of(request_from_protobuf(otlp_bodies(40)[0])), genai_span(status_error=True),
             genai_span({"gen_ai.usage.input_tokens": 1200, "gen_ai.usage.cache_read.input_tokens": 1000,
                         "gen_ai.usage.output_tokens": 50, "gen_ai.usage.reasoning.output_tokens": 20,
                         "gen_ai.conversation.id": "c-1", "error.type": "timeout"}),
             Span(TRACE, SPAN, "llm", NOW_NS, NOW_NS, False, {"openinference.span.kind": "LLM", "llm.model_name": "m"},
                  {})]
    fields = {field["name"] for field in codec.reader.parsed["fields"]}
    now_ms = time.time_ns() // 1_000_000
    for span in spans:
        bare, filled = span_to_event(span, "o", "us"), span_to_event(span, "o", "us", defaults)
        assert fields <= set(filled), fields - set(filled)
        assert {key: filled[key] for key in bare} == bare  # the mapping's own values win over defaults
        assert codec.check(filled, now_ms) == codec.check(bare, now_ms)
