"""The generated Avro encoder writes exactly fastavro's bytes, for every event schema the
project ships and for the edge values of each type."""

from __future__ import annotations

import io
import random
import time

import fastavro
import pytest
from fastavro.utils import generate_many

from ops.dev.loadgen import make_event
from schemas.avro_encoder import Unsupported, compile_encoder, compile_writer
from schemas.codec import EventCodec, InvalidEvent, plain
from schemas.records import record_codec
from schemas.registry import LocalRegistry
from tests.malformed import load_corpus


def fastavro_bytes(schema: dict, record: dict) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()


def generated_bytes(schema: dict, record: dict) -> bytes:
    out = bytearray()
    compile_encoder(schema)(record, out)
    return bytes(out)


def test_random_gateway_events_encode_exactly_as_fastavro():
    codec = EventCodec(LocalRegistry())
    encode = compile_encoder(codec.reader.plain)
    rng = random.Random(5)
    now = int(time.time() * 1000)
    for _ in range(1000):
        event = codec.check({**make_event(rng, now, 500, 0.3)[0], "region": "us"}, now)
        out = bytearray()
        encode(event, out)
        assert bytes(out) == fastavro_bytes(codec.reader.plain, event)


def shipped_schemas(names=("gateway_event", "feedback_event")):
    """(name, schema id, plain schema) of every registered schema id up to each name's latest
    (ids are numbered across names, so other records' schemas come along)."""
    registry = LocalRegistry()
    for name in names:
        latest_id, _ = registry.latest(name)
        for version_id in range(1, latest_id + 1):
            try:
                candidate = registry.by_id(version_id)
            except KeyError:
                continue
            yield name, version_id, plain(candidate)


def test_every_shipped_version_of_the_event_schemas_is_covered_and_encodes_random_records_exactly():
    for name, version_id, schema in shipped_schemas():
        encode = compile_encoder(schema)  # raises Unsupported if a shipped schema is not covered
        for record in generate_many(schema, 200):  # random values of every field's type
            out = bytearray()
            encode(record, out)
            assert bytes(out) == fastavro_bytes(schema, record), (name, version_id)


EDGES = fastavro.parse_schema({
    "type": "record", "name": "Edges", "fields": [
        {"name": "i", "type": "int"}, {"name": "l", "type": "long"}, {"name": "s", "type": "string"},
        {"name": "b", "type": "boolean"}, {"name": "d", "type": "double"}, {"name": "f", "type": "float"},
        {"name": "raw", "type": "bytes"}, {"name": "maybe", "type": ["null", "long"]},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "nested", "type": {"type": "array", "items": {"type": "array", "items": "int"}}},
        {"name": "n", "type": "null"}, {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B"]}}]})


@pytest.mark.parametrize("record", [
    {"i": 0, "l": 0, "s": "", "b": False, "d": 0.0, "f": 0.0, "raw": b"", "maybe": None, "tags": [], "nested": [],
     "n": None, "e": "A"},
    {"i": -(2**31), "l": -(2**63), "s": "é漢字🙂", "b": True, "d": -1.5e300, "f": 3.25, "raw": b"\x00\xff",
     "maybe": 2**63 - 1, "tags": ["a", "", "ü" * 300], "nested": [[1, -1], [], [2**31 - 1]], "n": None, "e": "B"},
    {"i": 2**31 - 1, "l": 63, "s": "x" * 200, "b": True, "d": float("inf"), "f": -0.5, "raw": b"y" * 128,
     "maybe": -64, "tags": ["t"] * 130, "nested": [[64, -65, 8191, -8193]], "n": None, "e": "A"},
], ids=["zeros", "extremes", "varint-boundaries"])
def test_edge_values_encode_exactly_as_fastavro(record):
    assert generated_bytes(EDGES, record) == fastavro_bytes(EDGES, record)


@pytest.mark.parametrize("field_type", [
    {"type": "map", "values": "int"},
    ["int", "string"], {"type": "long", "logicalType": "timestamp-millis"}, {"type": "fixed", "name": "F", "size": 2}])
def test_types_outside_the_subset_are_refused(field_type):
    with pytest.raises(Unsupported):
        compile_encoder({"type": "record", "name": "R", "fields": [{"name": "x", "type": field_type}]})


def test_every_varint_length_and_the_cached_high_bits_encode_exactly_as_fastavro():
    schema = {"type": "record", "name": "L", "fields": [{"name": "l", "type": "long"}]}
    encode = compile_encoder(schema)
    rng = random.Random(5)
    around_each_byte_boundary = [sign * (1 << bits) + delta for bits in range(0, 63, 7) for delta in (-1, 0, 1)
                                 for sign in (1, -1)]
    timestamps = [1_795_940_000_000 + rng.randrange(100_000) for _ in range(300)]  # the high-bits cache reused
    values = around_each_byte_boundary + timestamps + [rng.randrange(-(2**63), 2**63) for _ in range(3000)]
    for value in values + [2**63 - 1, -(2**63)]:
        out = bytearray()
        encode({"l": value}, out)
        assert bytes(out) == fastavro_bytes(schema, {"l": value}), value


def test_the_writer_puts_its_header_first_and_writes_fastavros_bytes_for_random_and_edge_records():
    codec = EventCodec(LocalRegistry())
    header = b"\x00" + codec.schema_id.to_bytes(4, "big")
    write = compile_writer(codec.reader.plain, header)
    rng = random.Random(11)
    now = int(time.time() * 1000)
    for _ in range(300):
        event = codec.check({**make_event(rng, now, 500, 0.5)[0], "region": "eu"}, now)
        assert write(event) == header + fastavro_bytes(codec.reader.plain, event)
    edges = compile_writer(EDGES)
    for record in generate_many(EDGES, 300):  # nulls, unicode, the whole long range, nested arrays
        assert edges(record) == fastavro_bytes(EDGES, record)


def test_the_writer_reencodes_every_readable_record_of_the_poison_corpus_exactly_as_fastavro():
    codec = EventCodec(LocalRegistry())
    write = compile_writer(codec.reader.plain)
    written = 0
    for item in load_corpus():
        try:
            record = codec.decode_record(item.value)[0]  # schema-level: what the semantic rules see
        except InvalidEvent:
            continue
        try:
            expected = fastavro_bytes(codec.reader.plain, record)
        except UnicodeEncodeError:  # a lone surrogate (the semantic rules refuse it first)
            with pytest.raises(UnicodeEncodeError):
                write(record)
            continue
        assert write(record) == expected, item.name
        written += 1
    assert written >= 5, "the corpus should hold records that read (and must re-encode) as well as poison"


def test_a_canonical_record_with_a_value_outside_its_type_fails_loudly_not_silently():
    write = compile_writer(EDGES)
    good = {"i": 0, "l": 0, "s": "", "b": False, "d": 0.0, "f": 0.0, "raw": b"", "maybe": None, "tags": [],
            "nested": [], "n": None, "e": "A"}
    for field, bad in (("s", 5), ("e", "C"), ("tags", [7]), ("raw", "text")):
        with pytest.raises((AttributeError, KeyError, TypeError)):
            write({**good, field: bad})


@pytest.mark.parametrize("name", ["billing_event", "quota_alert", "quota_update", "dlq_record"])
def test_the_pipelines_own_records_are_written_by_the_generated_writer_with_fastavros_bytes(name):
    codec = record_codec(name)
    assert codec.writer() is not None, f"{name} fell back to fastavro"
    header = codec.encode(codec.normalize(next(generate_many(codec.reader.plain, 1))))[:5]
    for record in generate_many(codec.reader.plain, 300):
        assert codec.encode_canonical(record) == header + fastavro_bytes(codec.reader.plain, record)


def test_a_record_the_generated_writer_cannot_take_is_refused_as_invalid_not_raised_raw():
    codec = record_codec("billing_event")
    record = next(generate_many(codec.reader.plain, 1))
    for broken in ({**record, "version": "seven"}, {k: v for k, v in record.items() if k != "model"}):
        with pytest.raises(InvalidEvent) as refused:
            codec.encode_canonical(broken)
        assert refused.value.code == "wrong_type"
