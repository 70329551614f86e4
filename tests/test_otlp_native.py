"""The C decoder of OTLP protobuf requests (connectors/ingest_api/_otlp_native.c) against
upb, the reference it replaces: on requests the OpenTelemetry SDK encodes, on fuzzed
messages and on corrupted bytes, both give the same spans (values and their types) or both
refuse the body."""

from __future__ import annotations

import math
import random
import struct

import pytest
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (AnyValue, ArrayValue, InstrumentationScope, KeyValue,
                                                      KeyValueList)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span as PbSpan, Status

from connectors.ingest_api import native, otlp
from connectors.ingest_api.otlp import Span, SpanRejected, python_span_to_event, span_to_event, spans_from_protobuf

pytestmark = pytest.mark.skipif(
    native.extension is None,
    reason="connectors/ingest_api/_otlp_native.c is not built here (no C compiler at install): only upb runs")


def typed(value):
    """A value with the type of every part spelled out, so 1, 1.0 and True differ and NaN
    equals itself."""
    if isinstance(value, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [typed(v) for v in value])
    if isinstance(value, float):
        return ("float", struct.pack("<d", value) if not math.isnan(value) else "nan")
    return (type(value).__name__, value)


def outcome(body: bytes, use_native: bool):
    try:
        spans = spans_from_protobuf(body, use_native=use_native)
    except DecodeError:
        return "refused"
    first_with_resource = {}
    shared = [first_with_resource.setdefault(id(span.resource), index) for index, span in enumerate(spans)]
    return [typed([span.trace_id, span.span_id, span.name, span.start_ns, span.end_ns, span.status_error,
                   span.attributes, span.resource, span.events]) for span in spans], shared


def assert_alike(body: bytes) -> str:
    reference = outcome(body, use_native=False)
    assert outcome(body, use_native=True) == reference, body[:200]
    return "refused" if reference == "refused" else "decoded"


# -- wire helpers for what the protobuf classes cannot write -----------------------------

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def delimited(field: int, payload: bytes) -> bytes:
    return tag(field, 2) + varint(len(payload)) + payload


def request_of_span_bytes(span: bytes, resource: bytes = b"") -> bytes:
    """An ExportTraceServiceRequest around raw Span bytes (ResourceSpans 1, ScopeSpans 2, Span 2)."""
    return delimited(1, (delimited(1, resource) if resource else b"") + delimited(2, delimited(2, span)))


IDS = bytes.fromhex("0af7651916cd43dd8448eb211c80319c") + bytes.fromhex("b7ad6b7169203331")


def plain_span(**fields) -> bytes:
    fields = {"trace_id": IDS[:16], "span_id": IDS[16:], "name": "chat", "start_time_unix_nano": 5,
              "end_time_unix_nano": 9, **fields}
    return PbSpan(**fields).SerializeToString()


# -- requests the OpenTelemetry SDK encodes ------------------------------------------------

def test_sdk_encoded_spans_decode_alike():
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource as SdkResource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope as SdkScope
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status as SdkStatus, StatusCode, TraceFlags

    rng = random.Random(16)
    resources = [SdkResource({"service.name": "gateway", "deployment.environment": "prod", "replicas": 3}),
                 SdkResource({"service.name": "worker-ü", "weights": [0.5, 1.5], "zones": ["a", "b"]})]
    spans = []
    for n in range(60):
        context = SpanContext(rng.getrandbits(128) or 1, rng.getrandbits(64) or 1, False, TraceFlags(1))
        attributes = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                      "gen_ai.request.model": f"gpt-4o-{n % 3}", "gen_ai.usage.input_tokens": rng.randrange(10**6),
                      "gen_ai.request.temperature": rng.random(), "gen_ai.request.stream": bool(n % 2),
                      "gen_ai.response.finish_reasons": ("stop", "length"), "token_ids": (1, 2, 3),
                      "flags": (True, False), "user.id": f"üser-{n}-😀", "empty": ""}
        events = [Event("gen_ai.user.message", {"content": "hi 你好", "index": n}, timestamp=n + 1),
                  Event("gen_ai.choice", {"message": '{"content": "ok"}', "scores": (0.1, 0.2)}, timestamp=n + 2)]
        links = [Link(SpanContext(rng.getrandbits(128) or 1, rng.getrandbits(64) or 1, True), {"link.kind": "retry"})]
        status = SdkStatus(StatusCode.ERROR, "boom") if n % 4 == 0 else SdkStatus(StatusCode.OK if n % 4 == 1
                                                                                    else StatusCode.UNSET)
        spans.append(ReadableSpan(f"chat {n}", context=context, parent=None if n % 3 else context,
                                  resource=resources[n % 2], attributes=attributes, events=events, links=links,
                                  kind=SpanKind.CLIENT, status=status, start_time=10**18 + n, end_time=10**18 + 2 * n,
                                  instrumentation_scope=SdkScope(f"scope-{n % 3}", "1.0", None,
                                                                 {"scope.attr": "x"} if n % 3 == 0 else None)))
    body = encode_spans(spans).SerializeToString()
    assert assert_alike(body) == "decoded"
    decoded = spans_from_protobuf(body)
    assert len(decoded) == 60 and {span.status_error for span in decoded} == {True, False}
    assert decoded[0].attributes["gen_ai.response.finish_reasons"] == ["stop", "length"]


def test_bench_and_demo_requests_decode_alike():
    from ops.bench.api import otlp_bodies

    for body in otlp_bodies(50)[:4]:
        assert assert_alike(body) == "decoded"


# -- fuzzed messages -------------------------------------------------------------------------

TEXTS = ["", "a", "gen_ai.request.model", "gpt-4o-mini", "ü", "你好", "😀 emoji", "\x00nul", "x" * 60, "é" * 30,
         "line\nbreak", "\u2028", "\ufffd"]


def random_text(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return rng.choice(TEXTS)
    return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF),
                                   rng.randrange(0xE000, 0x10FFFF)])) for _ in range(rng.randrange(12)))


def random_any_value(rng: random.Random, depth: int = 0) -> AnyValue:
    kind = rng.choice(["string", "string", "int", "bool", "double", "bytes", "array", "kvlist", "unset",
                       "strindex"] if depth < 4 else ["string", "int", "bool", "double", "bytes", "unset"])
    if kind == "string":
        return AnyValue(string_value=random_text(rng))
    if kind == "int":
        return AnyValue(int_value=rng.choice([0, 1, -1, 2**63 - 1, -(2**63), rng.randrange(-10**12, 10**12)]))
    if kind == "bool":
        return AnyValue(bool_value=rng.random() < 0.5)
    if kind == "double":
        return AnyValue(double_value=rng.choice([0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, rng.random()]))
    if kind == "bytes":
        return AnyValue(bytes_value=rng.randbytes(rng.randrange(5)))
    if kind == "array":
        return AnyValue(array_value=ArrayValue(values=[random_any_value(rng, depth + 1)
                                                       for _ in range(rng.randrange(4))]))
    if kind == "kvlist":
        return AnyValue(kvlist_value=KeyValueList(values=random_key_values(rng, depth + 1)))
    if kind == "strindex":
        return AnyValue(string_value_strindex=rng.choice([0, 7, -3, 2**31 - 1]))
    return AnyValue()


def random_key_values(rng: random.Random, depth: int = 0, most: int = 5) -> list[KeyValue]:
    keys = ["k", "gen_ai.request.model", "user.id", "", "ü.key"]
    return [KeyValue(key=rng.choice(keys) if rng.random() < 0.5 else random_text(rng),
                     value=random_any_value(rng, depth)) if rng.random() < 0.9 else KeyValue(key=rng.choice(keys))
            for _ in range(rng.randrange(most))]


def random_request(rng: random.Random) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for _ in range(rng.randrange(1, 3)):
        resource_spans = request.resource_spans.add(schema_url=rng.choice(["", "https://x/1.0"]))
        if rng.random() < 0.8:
            resource_spans.resource.CopyFrom(Resource(attributes=random_key_values(rng)))
        for _ in range(rng.randrange(1, 3)):
            scope_spans = resource_spans.scope_spans.add()
            if rng.random() < 0.5:
                scope_spans.scope.CopyFrom(InstrumentationScope(name=random_text(rng), version="1",
                                                                attributes=random_key_values(rng, most=2)))
            for _ in range(rng.randrange(4)):
                span = scope_spans.spans.add(trace_id=rng.randbytes(rng.choice([16, 16, 0, 3])),
                                             span_id=rng.randbytes(rng.choice([8, 8, 0])), name=random_text(rng),
                                             start_time_unix_nano=rng.choice([0, 1, 2**64 - 1, rng.getrandbits(63)]),
                                             end_time_unix_nano=rng.getrandbits(64), kind=rng.randrange(6),
                                             trace_state=rng.choice(["", "k=v"]), attributes=random_key_values(rng))
                if rng.random() < 0.7:
                    span.status.CopyFrom(Status(code=rng.randrange(3), message=random_text(rng)))
                for _ in range(rng.randrange(3)):
                    span.events.add(name=random_text(rng), time_unix_nano=rng.getrandbits(64),
                                    attributes=random_key_values(rng, most=3))
                for _ in range(rng.randrange(2)):
                    span.links.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8),
                                   attributes=random_key_values(rng, most=2))
    return request


def test_fuzzed_requests_decode_alike():
    rng = random.Random(1616)
    decoded = 0
    for _ in range(400):
        decoded += assert_alike(random_request(rng).SerializeToString()) == "decoded"
    assert decoded == 400


def test_corrupted_requests_are_refused_or_decoded_alike():
    """Truncations, flipped bytes, inserted bytes and junk appended to valid requests: upb
    accepts some (a flipped byte in a value) and refuses others; the C decoder decides each
    one the same way."""
    rng = random.Random(61)
    verdicts = {"decoded": 0, "refused": 0}
    for _ in range(300):
        body = bytearray(random_request(rng).SerializeToString())
        if not body:
            continue
        for _ in range(4):
            mutated = bytearray(body)
            how = rng.randrange(4)
            at = rng.randrange(len(mutated))
            if how == 0:
                mutated = mutated[:at]
            elif how == 1:
                mutated[at] = rng.randrange(256)
            elif how == 2:
                mutated[at:at] = rng.randbytes(rng.randrange(1, 4))
            else:
                mutated += rng.randbytes(rng.randrange(1, 6))
            verdicts[assert_alike(bytes(mutated))] += 1
    assert verdicts["decoded"] > 50 and verdicts["refused"] > 50, verdicts


def test_merged_occurrences_of_singular_fields_decode_alike():
    """Two serialized messages one after the other are their merge: singular fields take the
    last value, submessages merge, repeated fields append, a oneof takes the last member."""
    first = plain_span(name="first", status=Status(code=2),
                       attributes=[KeyValue(key="a", value=AnyValue(array_value=ArrayValue(values=[
                           AnyValue(int_value=1)])))])
    second = PbSpan(name="second", status=Status(message="m"), attributes=[KeyValue(key="b")]).SerializeToString()
    array_then_more = delimited(9, delimited(1, b"a") + delimited(2, delimited(5, delimited(1, b"\x18\x01")))
                                + delimited(2, delimited(5, delimited(1, b"\x18\x02"))))
    oneof_switch = delimited(9, delimited(1, b"k") + delimited(2, delimited(1, b"text") + b"\x18\x07"))
    kvlist_twice = delimited(9, delimited(1, b"m") + delimited(2, delimited(6, delimited(1, delimited(1, b"x"))))
                             + delimited(2, delimited(6, delimited(1, delimited(1, b"y")))))
    key_twice = delimited(9, delimited(1, b"old") + delimited(1, b"new") + delimited(2, b"\x10\x01"))
    resource_twice = delimited(1, delimited(1, b"r1")) + delimited(1, delimited(1, b"r2"))
    for span in (first + second, second + first, first + array_then_more, first + oneof_switch,
                 first + kvlist_twice, first + key_twice):
        assert assert_alike(request_of_span_bytes(span)) == "decoded"
    assert assert_alike(request_of_span_bytes(first, resource=resource_twice)) == "decoded"
    # the resource after the spans that share it
    late_resource = delimited(1, delimited(2, delimited(2, first)) + delimited(1, delimited(1, delimited(1, b"r"))))
    assert assert_alike(late_resource) == "decoded"
    assert spans_from_protobuf(late_resource)[0].resource == {"r": None}


@pytest.mark.parametrize("span", [
    tag(1, 0) + varint(5),                       # trace_id as a varint: an unknown field
    tag(5, 5) + b"abcd",                         # name as fixed32
    tag(7, 0) + varint(5),                       # start time as a varint
    tag(6, 0) + b"\xff" * 9 + b"\x7f",           # 10-byte varint with bits past 64
    tag(6, 0) + b"\xff" * 10 + b"\x01",          # 11-byte varint
    tag(100, 3) + tag(1, 0) + varint(1) + tag(100, 4),  # unknown group
    tag(5, 3) + tag(5, 4),                       # a known field as a group
    tag(100, 3) + tag(101, 4),                   # group ended by another field number
    tag(100, 3) + tag(1, 0) + varint(1),         # unterminated group
    tag(100, 4),                                 # end of group outside one
    tag(0, 0) + varint(1),                       # field number 0
    tag(100, 6), tag(100, 7),                    # wire types 6 and 7
    varint(((1 << 29) - 1) << 3) + varint(1),    # the largest field number
    varint((1 << 29) << 3) + varint(1),          # one past it
    b"\x88\x80\x80\x80\x10" + varint(1),         # 5-byte tag above 2^32
    b"\x88\x80\x80\x80\x80\x00" + varint(1),     # 6-byte tag
    tag(5, 2) + varint(10) + b"ab",              # length past the end
    tag(7, 1) + b"abc",                          # truncated fixed64
    tag(16, 5) + b"ab",                          # truncated fixed32
    delimited(6, varint(1) + varint(2)),         # packed encoding of a singular enum
    delimited(15, tag(3, 0) + varint(2**64 - 2)),  # status code -2
    delimited(15, tag(3, 0) + varint(2**32 + 2)),  # status code 2 in the low 32 bits
    delimited(9, delimited(1, b"k") + delimited(2, tag(8, 0) + varint(2**64 - 1))),  # strindex -1
    delimited(9, delimited(1, b"k") + delimited(2, tag(2, 0) + varint(2))),  # bool from 2
    delimited(9, delimited(1, b"k") + tag(3, 0) + varint(4)),  # key_strindex
    delimited(100, b"\xff"),                     # bad UTF-8 in an unknown field: not checked
    delimited(9, delimited(1, b"k") + delimited(2, delimited(7, b"\xff"))),  # bytes are not UTF-8
], ids=lambda body: body.hex()[:24])
def test_wire_format_edge_cases_decide_alike(span):
    assert_alike(request_of_span_bytes(plain_span() + span))


BAD_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"ok\x80"]


@pytest.mark.parametrize("bad", BAD_UTF8, ids=lambda bad: bad.hex())
def test_bad_utf8_in_any_string_field_is_refused_like_upb(bad):
    """Every known string field, also those the spans do not carry (trace state, status
    message, scope name, schema urls, link trace state, entity refs), is checked by upb."""
    kv_with = delimited(9, delimited(1, bad))
    bodies = [request_of_span_bytes(plain_span() + where) for where in (
        delimited(5, bad), delimited(3, bad), delimited(15, delimited(2, bad)), kv_with,
        delimited(9, delimited(1, b"k") + delimited(2, delimited(1, bad))),
        delimited(11, delimited(2, bad)), delimited(13, delimited(3, bad)), delimited(13, delimited(4, delimited(1, bad))),
        delimited(5, bad) + delimited(5, b"fine"))]  # an earlier occurrence of a singular string
    bodies += [delimited(1, delimited(3, bad)), delimited(1, delimited(2, delimited(3, bad))),
               delimited(1, delimited(2, delimited(1, delimited(1, bad)))),
               delimited(1, delimited(1, delimited(3, delimited(3, bad)))),
               delimited(1, delimited(1, delimited(1, delimited(1, bad))))]
    for body in bodies:
        assert assert_alike(body) == "refused", body


def nested_arrays(levels: int) -> bytes:
    value = delimited(1, b"x")
    for _ in range(levels):
        value = delimited(5, delimited(1, value))
    return value


def nested_groups(levels: int) -> bytes:
    body = b""
    for _ in range(levels):
        body = tag(100, 3) + body + tag(100, 4)
    return body


@pytest.mark.parametrize("levels", [46, 47, 48, 49])
def test_nesting_depth_limit_is_upbs(levels):
    """upb stops at 100 nested messages or groups: a span's attribute value sits at depth 5
    (request, resource spans, scope spans, span, key value), a resource's at 4."""
    in_span = request_of_span_bytes(plain_span() + delimited(9, delimited(1, b"deep") + delimited(2, nested_arrays(
        levels))))
    assert assert_alike(in_span) == ("decoded" if 5 + 2 * levels <= 100 else "refused")
    in_resource = request_of_span_bytes(plain_span(), resource=delimited(1, delimited(1, b"deep") + delimited(
        2, nested_arrays(levels))))
    assert assert_alike(in_resource) == ("decoded" if 4 + 2 * levels <= 100 else "refused")
    groups = 2 * levels + 2 + levels % 2  # 94, 97, 98, 101 levels below the span
    assert assert_alike(request_of_span_bytes(plain_span() + nested_groups(groups))) == (
        "decoded" if 3 + groups <= 100 else "refused")


def test_refusal_is_a_decode_error_the_app_answers_400():
    with pytest.raises(DecodeError, match="ExportTraceServiceRequest"):
        spans_from_protobuf(request_of_span_bytes(delimited(5, b"\xff")))
    with pytest.raises(DecodeError):
        spans_from_protobuf(b"\x0a\xff\xff\xff")


# -- the mapping: map_span (C) against python_span_to_event ---------------------------------

def mapped(mapping, span, defaults):
    try:
        event = mapping(span, "org-1", "eu", defaults)
    except SpanRejected as exc:
        return ("rejected", exc.field, exc.rule)
    except (ValueError, OverflowError, TypeError) as exc:
        return ("error", type(exc).__name__, str(exc))
    return ("event", typed(event))


def assert_mapped_alike(span, defaults=None) -> str:
    reference = mapped(python_span_to_event, span, defaults)
    assert mapped(span_to_event, span, defaults) == reference, span
    return reference[0] if reference[0] != "event" or reference[1] != typed(None) else "not genai"


def schema_field_defaults() -> dict:
    from types import SimpleNamespace

    from connectors.ingest_api.app import schema_defaults
    from schemas.codec import EventCodec
    from schemas.registry import default_local_registry

    return schema_defaults(SimpleNamespace(codec=EventCodec(default_local_registry())))


def test_native_mapping_is_in_use_and_maps_bench_spans_alike():
    from ops.bench.api import otlp_bodies

    assert otlp._map_span is not None
    defaults = schema_field_defaults()
    for body in otlp_bodies(100)[:3]:
        for span in spans_from_protobuf(body):
            assert assert_mapped_alike(span, defaults) == "event"
            assert assert_mapped_alike(span) == "event"


MAPPED_NAMES = sorted({
    *(name for convention in otlp.TOKEN_CONVENTIONS for name in convention[1:5]),
    *(name for convention in otlp.TOKEN_CONVENTIONS for name in convention[5]), *otlp.MODEL_ATTRIBUTES,
    *otlp.PROVIDER_ATTRIBUTES, *otlp.USER_ATTRIBUTES, *otlp.REQUEST_ID_ATTRIBUTES, *otlp.CONVERSATION_ATTRIBUTES,
    otlp.OPERATION, otlp.ERROR_TYPE, otlp.HTTP_STATUS, otlp.STREAM, *otlp.GENAI_MARKERS,
    "openinference.span.kind", "llm.invocation_parameters", "gen_ai.input.messages", "gen_ai.output.messages",
    "gen_ai.prompt", "gen_ai.completion", "input.value", "output.value", "llm.input_messages.0.message.content"})


def random_mapped_value(rng: random.Random, name: str):
    if "tokens" in name or "token_count" in name:
        if rng.random() < 0.92:
            return rng.choice([0, 1, 120, 4000, 2.5, 1e30, 2**70, None, ""])
        return rng.choice([-5, math.nan, math.inf, True, "12", [1]])
    if name == "openinference.span.kind":
        return rng.choice(["LLM", "EMBEDDING", "CHAIN", "", None, 3])
    if name == "http.response.status_code":
        return rng.choice([200, 404, 99, 600, 599, 100, True, "500", 503.0, None])
    if name == "gen_ai.request.stream":
        return rng.choice([True, False, 1, "true", None])
    if name == "llm.invocation_parameters":
        return rng.choice(['{"model": "m-1"}', '{"model": ""}', '{"model": 5}', "[1]", '"model"', "{bad", None])
    if name.endswith(("messages", ".value", "prompt", "completion", "content")):
        return rng.choice(['[{"role": "user", "parts": [{"type": "text", "content": "hi"}]}]', "plain", "",
                           [{"role": "assistant", "content": "x"}], None, '{"role": "user"}'])
    return rng.choice(["openai", "gpt-4o", "GCP.Gemini", "chat", "embeddings", "", None, 0, 7, 1.5, False,
                       ["a"], {"k": "v"}, b"\x00", "timeout error/π", "x" * 80, "u-1"])


def random_mapped_span(rng: random.Random) -> Span:
    attributes = {name: random_mapped_value(rng, name) for name in rng.sample(MAPPED_NAMES, rng.randrange(1, 14))}
    if rng.random() < 0.7:
        attributes[rng.choice(otlp.GENAI_MARKERS)] = rng.choice(["chat", "openai", None, ""])
    resource = ({name: random_mapped_value(rng, name) for name in rng.sample(MAPPED_NAMES, rng.randrange(3))}
                if rng.random() < 0.5 else rng.choice([{}, {"service.name": "gw"}]))
    trace_id = rng.randbytes(16).hex() if rng.random() < 0.8 else rng.choice([
        "0" * 32, "0AF7651916CD43DD8448EB211C80319C", "zz" * 16, "0af765"])
    span_id = rng.randbytes(8).hex() if rng.random() < 0.85 else rng.choice(["0" * 16, "b7ad6b716920333"])
    start = 1_700_000_000_000_000_000 if rng.random() < 0.85 else rng.choice([0, -1, 1])
    end = start + (rng.choice([0, 2_500_000_000]) if rng.random() < 0.9 else -1)
    events = rng.choice([[], [("gen_ai.user.message", {"content": "q"})], [("gen_ai.choice", {"message": "a"})]])
    return Span(trace_id, span_id, "chat", start, end, rng.random() < 0.3, attributes, resource, events)


def test_fuzzed_spans_map_alike():
    rng = random.Random(1717)
    defaults = schema_field_defaults()
    verdicts: dict[str, int] = {}
    for _ in range(3000):
        verdict = assert_mapped_alike(random_mapped_span(rng), rng.choice([None, {}, defaults]))
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
    assert all(verdicts.get(kind, 0) > 100 for kind in ("event", "rejected", "not genai")), verdicts


def test_spans_of_unusual_types_take_the_python_mapping():
    span = Span(b"0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", "chat", 1, 2, False,
                {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m"}, {})
    assert otlp._map_span(span, "o", "r", None) is NotImplemented
    assert assert_mapped_alike(span) == "event"


MESSAGE_KEYS = ["role", "parts", "content", "message", "text", "result", "response", "type", "other"]


def random_message_tree(rng: random.Random, depth: int = 0):
    kind = rng.random()
    if depth > 4 or kind < 0.35:
        return rng.choice(["hi", "", "système 😀", 0, 7, None, True, 1.5, "user", ["x"]])
    if kind < 0.6:
        return [random_message_tree(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(MESSAGE_KEYS): random_message_tree(rng, depth + 1) for _ in range(rng.randrange(5))}


def random_messages_value(rng: random.Random):
    tree = random_message_tree(rng)
    shape = rng.random()
    if shape < 0.5:
        import orjson

        return orjson.dumps(tree).decode()
    if shape < 0.8:
        return tree
    return rng.choice(["plain text", "", "[not json", "{", "[1, 2", "{\"a\": 1}", None, 5, b"[1]"])


def test_fuzzed_messages_give_the_same_text():
    rng = random.Random(2026)
    seen = set()
    for _ in range(4000):
        value = random_messages_value(rng)
        reference = otlp.python_messages_text(value)
        assert typed(otlp.messages_text(value)) == typed(reference), value
        seen.add(type(reference).__name__)
    assert otlp.messages_text is not otlp.python_messages_text and seen == {"str", "NoneType"}
    semconv = '[{"role": "user", "parts": [{"type": "text", "content": "q"}]}, {"message": {"role": "a", "text": "b"}}]'
    assert otlp.messages_text(semconv) == otlp.python_messages_text(semconv) == "user: q\na: b"
