"""The generated Avro reader (schemas.avro_reader) against fastavro: on valid messages of
every writer version, on every truncation and on byte mutations of them, on the malformed
corpus and on random bodies, ``EventCodec.decode`` answers exactly what it answers with
fastavro alone (the same event, key order included, or the same code and reason)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops.settings import ValidationSettings
from schemas.avro_reader import Unsupported, compile_reader
from schemas.codec import EventCodec, InvalidEvent
from schemas.compiler import plain
from schemas.registry import LocalRegistry
from tests.malformed import CORPUS_NOW, load_corpus
from tests.test_codec import NOW, event, v1_body


class FastavroOnly(EventCodec):
    """The codec as it was before the generated reader: fastavro reads every body."""

    def _writer(self, schema_id):
        return (*super()._writer(schema_id)[:3], None, None)


FAST = EventCodec(LocalRegistry(), ValidationSettings())
REFERENCE = FastavroOnly(LocalRegistry(), ValidationSettings())
FEEDBACK = EventCodec(LocalRegistry(), ValidationSettings(), schema="feedback_event")
FEEDBACK_REFERENCE = FastavroOnly(LocalRegistry(), ValidationSettings(), schema="feedback_event")


def outcome(codec: EventCodec, value: bytes, now: int = NOW):
    try:
        decoded = codec.decode(value, now)
    except InvalidEvent as exc:
        return ("rejected", exc.code, exc.reason, exc.schema_id)
    return ("event", decoded, list(decoded))


def same(value: bytes, now: int = NOW) -> None:
    assert outcome(FAST, value, now) == outcome(REFERENCE, value, now)


def messages() -> list[bytes]:
    """v2 wire messages, v1 wire messages and plain-Avro bodies of varied events."""
    rng = random.Random(7)
    out = []
    for n in range(12):
        record = event(event_id=f"e-{n}", input_tokens=rng.randrange(0, 10_000_000), latency_ms=rng.randrange(0, 900_000),
                       time_to_first_token_ms=rng.choice([None, 0, 1, 140]), streaming=bool(n % 2),
                       prompt=rng.choice([None, "", "héllo ✓ " * rng.randrange(1, 90)]),
                       safety_decisions=["input_filter:pass"] * rng.randrange(0, 4),
                       trace_id=rng.choice([None, "0af7651916cd43dd8448eb211c80319c"]),
                       span_id=rng.choice([None, "b7ad6b7169203331"]), reasoning_tokens=rng.choice([0, 7]),
                       output_tokens=300, status_code=rng.choice([0, 200, 429]))
        out.append(FAST.encode(record))
        out.append(b"\x00\x00\x00\x00\x01" + v1_body(record))
    return out


def test_the_generated_reader_covers_every_shipped_schema_and_refuses_type_changes():
    registry = LocalRegistry()
    for schema_id in (1, 2, 3, 4, 5, 6, 7, 8):
        compile_reader(plain(registry.by_id(schema_id)))
    compile_reader(plain(registry.by_id(1)), plain(registry.by_id(8)))
    v1 = plain(registry.by_id(1))
    widened = {**v1, "fields": [{**f, "type": "double"} if f["name"] == "latency_ms" else f for f in v1["fields"]]}
    with pytest.raises(Unsupported):
        compile_reader(v1, widened)


def test_valid_messages_of_both_writer_versions_decode_alike():
    for value in messages():
        assert outcome(FAST, value)[0] == "event"
        same(value)


def test_every_truncation_and_trailing_byte_answers_alike():
    for value in messages()[:4]:
        for cut in range(len(value)):
            same(value[:cut])
        same(value + b"\x00")
        same(value + b"\x02ab")


def test_byte_mutations_answer_alike():
    rng = random.Random(11)
    for value in messages():
        for _ in range(150):
            mutated = bytearray(value)
            position = rng.randrange(5, len(value))
            mutated[position] = rng.choice([0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF, 0xC3, 0xED, rng.randrange(256)])
            same(bytes(mutated))


def test_the_malformed_corpus_answers_alike():
    for item in load_corpus():
        same(item.value, CORPUS_NOW)


def test_feedback_events_decode_alike():
    record = {"event_id": "f-1", "request_id": "req-1", "org_id": "org-01", "user_id": "user-00001", "region": "eu",
              "event_time": NOW - 5, "rating": "THUMBS_DOWN", "comment": "très bien", "policy_flags": ["x"]}
    value = FEEDBACK.encode(record)
    assert outcome(FEEDBACK, value)[1]["rating"] == "THUMBS_DOWN"
    for cut in range(len(value) + 1):
        assert outcome(FEEDBACK, value[:cut]) == outcome(FEEDBACK_REFERENCE, value[:cut])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([b"\x00\x00\x00\x00\x08", b"\x00\x00\x00\x00\x01"]), st.binary(max_size=300))
def test_random_bodies_answer_alike(header, body):
    same(header + body)


def _value_of(schema, rng: random.Random):
    """A random value of a plain parsed schema (the types the shipped schemas use)."""
    if isinstance(schema, list):
        return _value_of(rng.choice(schema), rng)
    if isinstance(schema, dict):
        if schema["type"] == "array":
            return [_value_of(schema["items"], rng) for _ in range(rng.randrange(0, 70))]
        if schema["type"] == "enum":
            return rng.choice(schema["symbols"])
        return _value_of(schema["type"], rng)
    return {"null": lambda: None, "boolean": lambda: rng.random() < 0.5,
            "int": lambda: rng.randrange(-(2**31), 2**31), "long": lambda: rng.randrange(-(2**63), 2**63),
            "double": lambda: rng.uniform(-1e300, 1e300), "float": lambda: 0.5,
            "string": lambda: "é✓x" * rng.randrange(0, 50), "bytes": lambda: bytes(rng.randrange(256) for _ in range(9)),
            }[schema]()


@pytest.mark.parametrize("schema_id", [1, 2, 3, 4, 5, 6, 7, 8])
def test_every_shipped_schema_reads_as_fastavro_reads_it(schema_id):
    """Random records of every shipped schema (doubles, bytes, enums, long arrays with
    multi-byte counts, extreme longs), whole and cut anywhere: the same record or a refusal
    where fastavro refuses too (the codec then asks fastavro)."""
    import io

    import fastavro

    schema = plain(LocalRegistry().by_id(schema_id))
    read = compile_reader(schema)
    rng = random.Random(schema_id)
    for _ in range(8):
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema, {f["name"]: _value_of(f["type"], rng) for f in schema["fields"]})
        body = buffer.getvalue()
        assert read(body) == (fastavro.schemaless_reader(io.BytesIO(body), schema, None), len(body))
        for cut in range(0, len(body), 1 + len(body) // 60):
            try:
                record, end = read(body[:cut])
            except Exception:  # noqa: BLE001 - the codec then asks fastavro, which names the problem
                continue
            buffer = io.BytesIO(body[:cut])
            assert (record, end) == (fastavro.schemaless_reader(buffer, schema, None), buffer.tell())


def test_reader_fields_the_writer_lacks_get_the_defaults_fastavro_gives():
    import io

    import fastavro

    writer = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "a", "type": "long"}, {"name": "gone", "type": ["null", "string"], "default": None}]})
    reader = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "a", "type": "long"}, {"name": "d", "type": "double", "default": 0},
        {"name": "s", "type": ["null", "string"], "default": None},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["X", "Y"]}, "default": "Y"},
        {"name": "tags", "type": {"type": "array", "items": "string"}, "default": ["q"]}]})
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, writer, {"a": 5, "gone": "x"})
    body = buffer.getvalue()
    read = compile_reader(writer, reader)
    first, end = read(body)
    assert (first, end) == (fastavro.schemaless_reader(io.BytesIO(body), writer, reader), len(body))
    assert list(first) == ["a", "d", "s", "e", "tags"]
    first["tags"].append("changed")
    assert read(body)[0]["tags"] == ["q"]  # each record its own copy of a list default
