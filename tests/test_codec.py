"""EventCodec, the pipeline's record codecs and the DLQ record: what decodes, and every way
a message can be bad, each with its code (no server needed)."""

from __future__ import annotations

import io
import json
import random
import struct
import time
from datetime import UTC, datetime
from pathlib import Path

import fastavro
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from ops.settings import ValidationSettings
from schemas.codec import EventCodec, InvalidEvent, plain
from schemas.records import (
    decode_billing_event,
    decode_quota_alert,
    decode_quota_update,
    encode_billing_event,
    encode_quota_alert,
    encode_quota_update,
)
from schemas.rules import CODES
from schemas.dlq import decode_dlq, dlq_record, encode_dlq
from schemas.registry import SCHEMA_DIR, ConfluentRegistry, LocalRegistry, registry_from_settings

FIXTURES = Path(__file__).parent / "fixtures" / "schemas"
NOW = 1_790_000_000_000
SECRET = "call me at alice.smith@example.com or +1 415 555 0100"
LATEST_ID = LocalRegistry().latest("gateway_event")[0]


def event(**changes) -> dict:
    base = {
        "event_id": "3b8f2c1e-0000-4000-8000-000000000001", "request_id": "req-1", "schema_version": 1,
        "event_time": NOW - 1000, "user_id": "user-00001", "org_id": "org-01", "region": "eu",
        "provider": "anthropic", "endpoint": "messages", "model": "claude-sonnet-4", "model_version": None,
        "status_code": 200, "error_code": None, "streaming": True, "latency_ms": 812,
        "time_to_first_token_ms": 140, "input_tokens": 120, "output_tokens": 300, "cache_read_tokens": 4096,
        "cache_write_tokens": 512, "prompt": SECRET, "response": "Sure, " + SECRET, "conversation_id": "c-9",
        "experiment_id": "exp-1", "variant": "b", "safety_decisions": ["input_filter:pass"], "policy_flags": [],
        "reasoning_tokens": 0, "trace_id": None, "span_id": None,
    }
    base.update(changes)
    return base


def v1_body(record: dict) -> bytes:
    """The plain Avro body a producer built against gateway_event v1 writes."""
    schema = plain(LocalRegistry().by_id(1))
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, {f["name"]: record[f["name"]] for f in schema["fields"]})
    return buffer.getvalue()


@pytest.fixture(scope="module")
def codec() -> EventCodec:
    return EventCodec(LocalRegistry(), ValidationSettings())


# -- what decodes ----------------------------------------------------------------------------

def test_wire_format_round_trip_gives_the_canonical_event(codec):
    value = codec.encode(event())
    assert value[0] == 0 and struct.unpack(">I", value[1:5])[0] == LATEST_ID
    decoded = codec.decode(value, NOW)
    assert decoded == event()
    assert type(decoded["event_time"]) is int  # not a datetime: logical types are off


def test_encode_fills_defaults_and_accepts_iso_or_datetime_times(codec):
    minimal = {k: event()[k] for k in ("event_id", "request_id", "event_time", "user_id", "org_id", "region",
                                       "model", "latency_ms", "input_tokens", "output_tokens")}
    decoded = codec.decode(codec.encode({**minimal, "event_time": datetime.fromtimestamp((NOW - 1000) / 1000,
                                                                                         tz=UTC)}), NOW)
    assert decoded["event_time"] == NOW - 1000
    assert decoded["cache_read_tokens"] == 0 and decoded["cache_write_tokens"] == 0
    assert decoded["provider"] == "unknown" and decoded["policy_flags"] == [] and decoded["prompt"] is None
    assert set(decoded) == {f["name"] for f in codec.reader.parsed["fields"]}


@pytest.mark.parametrize("when,millis", [
    (NOW - 1000, NOW - 1000),
    ("2026-09-21T13:46:39Z", 1789998399000),
    ("2026-09-21T15:46:39.250+02:00", 1789998399250),
    ("2026-09-21T13:46:39", 1789998399000),  # naive means UTC
    (float(NOW - 1000), NOW - 1000),           # an integral JSON float is accepted
])
def test_json_input_with_int_or_iso_event_time(codec, when, millis):
    body = {**event(), "event_time": when, "unknown_future_field": {"x": 1}}
    body.pop("policy_flags")
    decoded = codec.decode(json.dumps(body).encode(), millis + 1000)
    assert decoded["event_time"] == millis
    assert decoded["policy_flags"] == [] and "unknown_future_field" not in decoded


def test_plain_avro_with_the_configured_writer_schema(codec):
    body = codec.encode_plain(event())
    assert codec.decode(body, NOW) == event()
    body = v1_body(event())
    pinned = EventCodec(LocalRegistry(FIXTURES / "compatible"), ValidationSettings(), plain_writer_id=1)
    assert pinned.decode(body, NOW)["reasoning_tokens"] == 0


def test_older_writer_versions_are_read_into_the_latest_schema():
    v2 = EventCodec(LocalRegistry(FIXTURES / "compatible"), ValidationSettings())
    assert v2.schema_id == 7
    written_by_v1 = b"\x00" + (1).to_bytes(4, "big") + v1_body(event())
    decoded = v2.decode(written_by_v1, NOW)
    assert decoded["reasoning_tokens"] == 0 and decoded["tenant_region"] is None
    assert {k: decoded[k] for k in decoded if k != "tenant_region"} == {k: v for k, v in event().items()
                                                                        if k not in ("trace_id", "span_id")}
    # and a v1 pipeline meets a v2 message: the id is unknown to it (or, in the shipped
    # registry, another schema's), which the DLQ says
    with pytest.raises(InvalidEvent) as caught:
        EventCodec(LocalRegistry(), ValidationSettings()).decode(v2.encode(event()), NOW)
    assert caught.value.code in ("unknown_schema_id", "wrong_schema") and caught.value.schema_id == 7


def test_confluent_avro_serializer_output_decodes():
    """Bytes from confluent-kafka's own AvroSerializer (Confluent wire format, id from the
    registry client: confluent-kafka's mock registry, as no real one runs here)."""
    client = SchemaRegistryClient.new_client({"url": "mock://serializer-test"})
    schema_str = (SCHEMA_DIR / "gateway_event.v1.avsc").read_text()
    serializer = AvroSerializer(client, schema_str, conf={"auto.register.schemas": True})
    context = SerializationContext("gateway-events", MessageField.VALUE)
    sent = event(event_time=datetime.fromtimestamp((NOW - 1000) / 1000, tz=UTC))
    value = serializer(sent, context)
    schema_id = struct.unpack(">I", value[1:5])[0]
    assert value[0] == 0

    via_registry = EventCodec(ConfluentRegistry(client=client), ValidationSettings())
    assert via_registry.decode(value, NOW) == event()
    # The local registry reads it too where the ids agree (a fresh registry's first id is 1).
    assert schema_id == 1 and EventCodec(LocalRegistry(), ValidationSettings()).decode(value, NOW) == event()


def test_confluent_avro_deserializer_reads_what_the_codec_writes():
    client = SchemaRegistryClient.new_client({"url": "mock://deserializer-test"})
    codec = EventCodec(ConfluentRegistry(client=client), ValidationSettings())
    value = codec.encode(event())
    decoded = AvroDeserializer(client)(value, SerializationContext("gateway-events", MessageField.VALUE))
    assert decoded["event_id"] == event()["event_id"]
    assert decoded["event_time"] == datetime.fromtimestamp((NOW - 1000) / 1000, tz=UTC)
    subject = "io.gatewatch.v1.GatewayEvent"  # RecordNameStrategy
    assert client.get_latest_version(subject).schema_id == codec.schema_id


def test_confluent_registry_unknown_id_and_settings():
    from ops.settings import SchemaSettings

    registry = registry_from_settings(SchemaSettings(registry_url="mock://settings-test"))
    assert isinstance(registry, ConfluentRegistry)
    with pytest.raises(KeyError):
        registry.by_id(4242)
    codec = EventCodec(registry, ValidationSettings())
    with pytest.raises(InvalidEvent) as caught:
        codec.decode(b"\x00" + (4242).to_bytes(4, "big") + codec.encode_plain(event()), NOW)
    assert caught.value.code == "unknown_schema_id"


def test_confluent_registry_down_is_not_an_invalid_event():
    from schemas.registry import RegistryUnavailable

    registry = ConfluentRegistry("http://127.0.0.1:9", conf={"timeout": 1, "max.retries": 0})
    with pytest.raises(RegistryUnavailable):
        registry.by_id(1)


# -- every kind of bad message ----------------------------------------------------------------

def _wire(codec, body: bytes, schema_id: int = 1) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + body


def _json(**changes) -> bytes:
    body = event()
    for key, value in changes.items():
        if value is _MISSING:
            body.pop(key)
        else:
            body[key] = value
    return json.dumps(body).encode()


_MISSING = object()
LIMITS = ValidationSettings()

BAD = [
    # (case, code, builder(codec) -> bytes, writer schema id in the error)
    ("no value", "empty", lambda c: None, None),
    ("empty value", "empty", lambda c: b"", None),
    ("unknown schema id", "unknown_schema_id", lambda c: b"\x00\x00\x00\x7f\xff" + c.encode(event())[5:], 32767),
    ("id of another schema", "wrong_schema", lambda c: _wire(c, c.encode_plain(event()), 2), 2),
    ("header cut", "truncated", lambda c: c.encode(event())[:3], None),
    ("body cut", "truncated", lambda c: c.encode(event())[:40], LATEST_ID),
    ("body cut late", "truncated", lambda c: c.encode(event())[:-1], LATEST_ID),
    ("trailing bytes", "bad_avro", lambda c: c.encode(event()) + b"\x02xx", LATEST_ID),
    ("bad union index", "bad_avro", lambda c: _wire(c, _corrupt_union(c)), 1),
    ("not JSON", "bad_json", lambda c: b'{"event_id": "e1", "oops', None),
    ("JSON array", "bad_json", lambda c: b'[1, 2]', None),
    ("JSON not UTF-8", "bad_json", lambda c: b'{"event_id": "\xff\xfe"}', None),
    ("string for int", "wrong_type", lambda c: _json(latency_ms="fast"), None),
    ("bool for long", "wrong_type", lambda c: _json(input_tokens=True), None),
    ("fractional tokens", "wrong_type", lambda c: _json(output_tokens=1.5), None),
    ("number for string", "wrong_type", lambda c: _json(model=4), None),
    ("object for array", "wrong_type", lambda c: _json(policy_flags={"a": 1}), None),
    ("bad timestamp text", "wrong_type", lambda c: _json(event_time="yesterday at noon"), None),
    ("required field missing", "missing_field", lambda c: _json(model=_MISSING), None),
    ("event_id empty", "missing_field", lambda c: c.encode(event(event_id="")), LATEST_ID),
    ("negative tokens", "out_of_range", lambda c: _json(output_tokens=-5), None),
    ("negative cache tokens (Avro)", "out_of_range", lambda c: c.encode(event(cache_read_tokens=-1)), LATEST_ID),
    ("too many tokens", "out_of_range", lambda c: _json(input_tokens=LIMITS.max_tokens + 1), None),
    ("negative latency", "out_of_range", lambda c: c.encode(event(latency_ms=-3)), LATEST_ID),
    ("absurd latency", "out_of_range", lambda c: _json(latency_ms=LIMITS.max_latency_ms + 1), None),
    ("int overflow", "out_of_range", lambda c: _json(latency_ms=2**31), None),
    ("bad status", "out_of_range", lambda c: _json(status_code=700), None),
    ("negative ttft", "out_of_range", lambda c: _json(time_to_first_token_ms=-1), None),
    ("future", "future_timestamp", lambda c: c.encode(event(event_time=NOW + 86_400_000)), LATEST_ID),
    ("past", "past_timestamp", lambda c: _json(event_time=NOW - int(LIMITS.max_past_s * 1000) - 1), None),
    ("region", "unknown_region", lambda c: _json(region="atlantis"), None),
    ("region with PII", "unknown_region", lambda c: c.encode(event(region=SECRET)), LATEST_ID),
]


def _corrupt_union(codec) -> bytes:
    """An Avro body whose model_version union index is 7 (there are two branches)."""
    good = codec.encode_plain(event(model_version=None, prompt=None, response=None))
    plain = codec.reader.plain
    head = {k: v for k, v in event().items()}
    # Re-encode the fields before model_version to find its offset.
    prefix_schema = {"type": "record", "name": "Prefix", "fields": plain["fields"][:10]}
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(prefix_schema, named_schemas={}),
                               {f["name"]: head[f["name"]] for f in plain["fields"][:10]})
    at = len(buffer.getvalue())
    return good[:at] + b"\x0e" + good[at + 1:]


@pytest.mark.parametrize("case,code,build,schema_id", BAD, ids=[b[0] for b in BAD])
def test_every_bad_message_raises_invalid_event_with_its_code(codec, case, code, build, schema_id):
    with pytest.raises(InvalidEvent) as caught:
        codec.decode(build(codec), NOW)
    error = caught.value
    assert error.code == code, error.reason
    assert error.schema_id == schema_id
    assert error.reason and len(error.reason) < 400
    # Reasons never quote text that may be PII.
    for fragment in ("alice", "415 555", "example.com"):
        assert fragment not in error.reason


def test_the_loadgen_malformed_kinds_map_to_their_codes(codec):
    """The demo and e2e tests name each malformed message after the code it must get."""
    from ops.dev.loadgen import BAD_KINDS, make_event, malformed

    sample, _ = make_event(random.Random(3), int(time.time() * 1000), 10, 1.0)
    for kind in BAD_KINDS:
        with pytest.raises(InvalidEvent) as caught:
            codec.decode(malformed(kind, sample, codec), int(time.time() * 1000))
        assert caught.value.code == kind


def test_random_corruption_never_escapes_as_another_exception(codec):
    rng = random.Random(42)
    good = [codec.encode(event(event_id=f"e-{i}", prompt="x" * rng.randrange(0, 50))) for i in range(20)]
    good += [_json(event_id=f"j-{i}") for i in range(5)]
    outcomes: dict[str, int] = {}
    for _ in range(3000):
        value = bytearray(rng.choice(good))
        for _ in range(rng.randrange(1, 4)):
            action = rng.random()
            position = rng.randrange(len(value))
            if action < 0.5:
                value[position] = rng.randrange(256)
            elif action < 0.8:
                del value[position:]
                if not value:
                    break
            else:
                value[position:position] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5)))
        try:
            codec.decode(bytes(value), NOW)
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except InvalidEvent as exc:
            outcomes[exc.code] = outcomes.get(exc.code, 0) + 1
    assert set(outcomes) <= {"ok", *CODES}
    assert outcomes.get("truncated") and outcomes.get("bad_avro")


def test_check_is_what_a_producer_runs(codec):
    assert codec.check(event(), NOW) == event()
    with pytest.raises(InvalidEvent, match="unknown_region"):
        codec.check(event(region="mars"), NOW)


def test_feedback_events_have_their_own_codec():
    feedback = EventCodec(LocalRegistry(), ValidationSettings(), schema="feedback_event")
    assert feedback.schema_id == 5
    sent = {"event_id": "f-1", "request_id": "req-1", "event_time": "2026-09-21T13:46:39Z", "user_id": "u",
            "org_id": "o", "region": "us", "rating": "THUMBS_DOWN", "comment": SECRET}
    decoded = feedback.decode(feedback.encode(sent), NOW)
    assert decoded["rating"] == "THUMBS_DOWN" and decoded["comment"] == SECRET and decoded["event_time"] == 1789998399000
    with pytest.raises(InvalidEvent) as caught:
        feedback.decode(json.dumps({**sent, "rating": "MEH"}).encode(), NOW)
    assert caught.value.code == "out_of_range" and "THUMBS_UP" in caught.value.reason
    with pytest.raises(InvalidEvent) as caught:
        EventCodec(LocalRegistry(), ValidationSettings()).decode(feedback.encode(sent), NOW)
    assert caught.value.code == "wrong_schema"


# -- DLQ records and the pipeline's own records --------------------------------------------------

def _dlq(**changes) -> dict:
    record = dlq_record(stage="decode", code="bad_json", reason="not valid JSON", original=SECRET.encode(),
                        topic="gateway-events", partition=2, offset=1234, schema_id=None, first_seen_ms=NOW)
    record.update(changes)
    return record


def test_dlq_record_round_trip_keeps_redacted_payload_and_source():
    record = _dlq(original=b"call me at <PHONE>", payload_redacted=True)
    decoded = decode_dlq(encode_dlq(record))
    assert decoded == record
    assert decoded["dlq_id"] == "decode:gateway-events:2:1234"
    assert (decoded["topic"], decoded["partition"], decoded["offset"]) == ("gateway-events", 2, 1234)
    assert decoded["original_size"] == len(SECRET.encode())  # the size as received
    assert type(decoded["first_seen_ms"]) is int


def test_dlq_never_stores_an_unredacted_original():
    decoded = decode_dlq(encode_dlq(_dlq()))
    assert decoded["original"] is None and decoded["text_withheld"] is True
    assert decoded["original_size"] == len(SECRET.encode())
    clear = decode_dlq(encode_dlq(_dlq(), allow_clear_original=True))
    assert clear["original"] == SECRET.encode()


def test_dlq_record_shapes_the_flow_builds():
    """As dataflows.ingest builds them: redact stage (no original, event ids), the
    withheld-after-failed-redaction form, a late event, a consume error."""
    redact = dlq_record(stage="redact", code="redaction_failed", reason="analyzer crashed", original=None,
                        topic=None, partition=1, offset=9, first_seen_ms=NOW, event_id="e1", request_id="r1")
    assert decode_dlq(encode_dlq(redact)) == redact
    withheld = {**_dlq(), "original": None, "text_withheld": True}
    assert decode_dlq(encode_dlq(withheld))["text_withheld"] is True
    late = dlq_record(stage="window", code="late_event", reason="too late", original=None, topic=None,
                      partition=0, offset=None, first_seen_ms=NOW, event_id="e2", request_id="r2")
    assert decode_dlq(encode_dlq(late))["dlq_id"] == "window:event:e2"
    long_reason = dlq_record(stage="consume", code="kafka_error", reason="x" * 10_000, original=None,
                             topic="t", partition=0, offset=0, first_seen_ms=NOW)
    assert len(decode_dlq(encode_dlq(long_reason))["reason"]) <= 2000


def test_billing_events_round_trip():
    from ops.settings import PricingSettings
    from sinks.billing import billing_event

    total = {"org_id": "o", "user_id": "u", "model": "claude-sonnet-4", "window_start_ms": NOW - 60_000,
             "window_length_ms": 60_000, "n": 3, "input": 100, "output": 200, "cache_read": 4000, "cache_write": 500}
    record = billing_event(total, PricingSettings())
    value = encode_billing_event(record)
    assert struct.unpack(">I", value[1:5])[0] == 4
    assert decode_billing_event(value) == record


def test_quota_alerts_round_trip_as_redis_stores_them():
    # cjson prints whole numbers without a fraction: threshold 1.0 arrives as int 1
    alert = json.loads('{"alert_id":"o/u|tokens_month|202609|1","subject":"o/u","tier":"free",'
                       '"metric":"tokens_month","period":"202609","threshold":1,"limit":100000,"usage":100020}')
    decoded = decode_quota_alert(encode_quota_alert(alert))
    assert decoded == {**alert, "threshold": 1.0, "alert_time_ms": None}


def test_quota_updates_from_window_totals():
    total = {"org_id": "o", "user_id": "u", "model": "m", "window_start_ms": NOW, "window_length_ms": 60_000,
             "n": 4, "input": 1, "output": 2, "cache_read": 3, "cache_write": 4}
    decoded = decode_quota_update(encode_quota_update(total))
    assert decoded["update_id"] == f"o/u/m/{NOW}#4" and decoded["events"] == 4
    assert (decoded["input_tokens"], decoded["output_tokens"], decoded["cache_read_tokens"],
            decoded["cache_write_tokens"]) == (1, 2, 3, 4)


def test_decoding_speed(codec):
    """Printed, not asserted: decode cost per event of each format."""
    values = {"wire": codec.encode(event()), "json": json.dumps(event()).encode(), "plain": codec.encode_plain(event())}
    for name, value in values.items():
        started = time.perf_counter()
        for _ in range(2000):
            codec.decode(value, NOW)
        print(f"decode {name}: {(time.perf_counter() - started) / 2000 * 1e6:.1f} µs/event")
    started = time.perf_counter()
    for _ in range(2000):
        codec.encode(event())
    print(f"encode: {(time.perf_counter() - started) / 2000 * 1e6:.1f} µs/event")


def test_invalid_event_survives_pickling():
    """Bytewax may move exceptions between processes."""
    import pickle

    error = pickle.loads(pickle.dumps(InvalidEvent("truncated", "body ends early", 7)))
    assert (error.code, error.reason, error.schema_id) == ("truncated", "body ends early", 7)
