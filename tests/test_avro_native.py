"""schemas/_avro_native.c writes the generated Python writer's bytes (and so fastavro's)
for every shipped event schema, the load generator's events, the poison corpus and
hypothesis-made records of every covered type, and raises the Python writer's exception
for every value outside its type."""

from __future__ import annotations

import io
import math
import random
import time

import fastavro
import pytest
from fastavro.utils import generate_many
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import avro_encoder
from schemas.avro_encoder import compile_python_writer, compile_writer
from ops.dev.loadgen import make_event
from schemas.codec import EventCodec, InvalidEvent
from schemas.registry import LocalRegistry
from tests.malformed import load_corpus
from tests.test_avro_encoder import shipped_schemas

native = pytest.importorskip("schemas._avro_native",
                             reason="schemas/_avro_native.c is not built (python3 setup.py build_ext --inplace)")

HEADER = b"\x00\x00\x00\x00\x07"
QUICK = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fastavro_bytes(schema: dict, record: dict) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()


def outcome(write, record):
    """The bytes ``write`` returns for ``record``, or the class of what it raises."""
    try:
        return write(record)
    except Exception as exc:  # noqa: BLE001 - the class is what is compared
        return type(exc)


def writers(schema: dict, prefix: bytes = HEADER):
    c_writer = compile_writer(schema, prefix)
    assert isinstance(c_writer, native.Writer)
    return c_writer, compile_python_writer(schema, prefix)


def assert_same_as_python_and_fastavro(schema: dict, records, prefix: bytes = HEADER) -> int:
    c_writer, python_writer = writers(schema, prefix)
    compared = 0
    for record in records:
        expected = python_writer(record)
        assert c_writer(record) == expected, record
        assert expected == prefix + fastavro_bytes(schema, record), record
        compared += 1
    return compared


def test_every_shipped_event_schema_version_encodes_random_records_as_python_and_fastavro():
    versions = 0
    for _name, _version_id, schema in shipped_schemas():
        if schema.get("name", "").split(".")[-1] not in ("GatewayEvent", "FeedbackEvent"):
            continue
        assert assert_same_as_python_and_fastavro(schema, generate_many(schema, 300)) == 300
        versions += 1
    assert versions >= 3, "gateway_event v1, v2 and feedback_event v1 at least"


def test_loadgen_events_encode_as_python_and_fastavro_and_encode_many_matches_one_by_one():
    codec = EventCodec(LocalRegistry())
    rng = random.Random(16)
    now = int(time.time() * 1000)
    events = [codec.check({**make_event(rng, now, 500, 0.5)[0], "region": "eu"}, now) for _ in range(500)]
    assert assert_same_as_python_and_fastavro(codec.reader.plain, events) == 500
    c_writer, _ = writers(codec.reader.plain)
    assert c_writer.encode_many(events) == [c_writer(event) for event in events]
    assert c_writer.encode_many([]) == []

    def fallback(record):
        raise AssertionError(f"the C writer handed a canonical event to the Python writer: {record}")

    only_c = native.Writer(avro_encoder.native_program(codec.reader.plain), HEADER, fallback)
    assert only_c.encode_many(events) == [c_writer(event) for event in events]


def test_poison_corpus_records_that_read_reencode_as_python_including_their_errors():
    codec = EventCodec(LocalRegistry())
    c_writer, python_writer = writers(codec.reader.plain)
    compared = 0
    for item in load_corpus():
        try:
            record = codec.decode_record(item.value)[0]
        except InvalidEvent:
            continue
        assert outcome(c_writer, record) == outcome(python_writer, record), item.name
        compared += 1
    assert compared >= 5


EVERY_TYPE = fastavro.parse_schema({
    "type": "record", "name": "EveryType", "fields": [
        {"name": "i", "type": "int"}, {"name": "l", "type": "long"}, {"name": "s", "type": "string"},
        {"name": "b", "type": "boolean"}, {"name": "d", "type": "double"}, {"name": "f", "type": "float"},
        {"name": "raw", "type": "bytes"}, {"name": "n", "type": "null"},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]}},
        {"name": "maybe_l", "type": ["null", "long"]}, {"name": "maybe_s", "type": ["null", "string"]},
        {"name": "maybe_d", "type": ["null", "double"]}, {"name": "maybe_b", "type": ["null", "boolean"]},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "grid", "type": {"type": "array", "items": {"type": "array", "items": ["null", "int"]}}},
        {"name": "inner", "type": ["null", {"type": "record", "name": "Inner", "fields": [
            {"name": "x", "type": "long"}, {"name": "y", "type": {"type": "array", "items": "float"}}]}]}]})

INT64 = st.integers(-(2**63), 2**63 - 1) | st.sampled_from([-(2**63), 2**63 - 1, 0, -1, 63, -64, 64, 8191, -8193])
INT32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # no lone surrogates
DOUBLE = st.floats(allow_nan=True, allow_infinity=True)
SINGLE = st.floats(width=32, allow_nan=True, allow_infinity=True)
records = st.fixed_dictionaries({
    "i": INT32, "l": INT64, "s": TEXT, "b": st.booleans(), "d": DOUBLE, "f": SINGLE,
    "raw": st.binary(max_size=40), "n": st.none(), "e": st.sampled_from(["A", "B", "C"]),
    "maybe_l": st.none() | INT64, "maybe_s": st.none() | TEXT, "maybe_d": st.none() | DOUBLE,
    "maybe_b": st.none() | st.booleans(), "tags": st.lists(TEXT, max_size=5),
    "grid": st.lists(st.lists(st.none() | INT32, max_size=4), max_size=3),
    "inner": st.none() | st.fixed_dictionaries({"x": INT64, "y": st.lists(SINGLE, max_size=3)})})
C_EVERY, PYTHON_EVERY = writers(EVERY_TYPE)


@QUICK
@given(records)
def test_fuzzed_records_of_every_covered_type_encode_as_python_and_fastavro(record):
    expected = PYTHON_EVERY(record)
    assert C_EVERY(record) == expected
    assert expected == HEADER + fastavro_bytes(EVERY_TYPE, record)


def test_nan_infinities_empty_null_and_large_records_encode_as_python_and_fastavro():
    base = {"i": 0, "l": 0, "s": "", "b": False, "d": 0.0, "f": 0.0, "raw": b"", "n": None, "e": "A",
            "maybe_l": None, "maybe_s": None, "maybe_d": None, "maybe_b": None, "tags": [], "grid": [], "inner": None}
    variants = [base, {**base, "d": math.nan, "f": math.nan, "maybe_d": math.nan},
                {**base, "d": math.inf, "f": -math.inf, "maybe_d": -math.inf, "l": -(2**63), "maybe_l": 2**63 - 1},
                {**base, "s": "é漢字🙂\x00", "tags": ["", "\U0010ffff"], "grid": [[], [None]],
                 "inner": {"x": 2**63 - 1, "y": []}},
                {**base, "tags": ("a", "b"), "d": 3, "f": 2**24 + 1, "maybe_d": 10**300},  # tuple, ints as floats
                {**base, "s": "ü" * 5000, "tags": ["y" * 3000] * 4, "raw": b"\xff" * 70000}]  # past the stack buffer
    assert assert_same_as_python_and_fastavro(EVERY_TYPE, variants) == len(variants)


GOOD = {"i": 1, "l": 2, "s": "x", "b": True, "d": 1.0, "f": 1.0, "raw": b"r", "n": None, "e": "B",
        "maybe_l": 3, "maybe_s": "y", "maybe_d": 2.0, "maybe_b": False, "tags": ["t"], "grid": [[1]],
        "inner": {"x": 1, "y": [0.5]}}
BAD_VALUES = {
    "i": ["1", 1.5, None, 2**64], "l": [2**63, -(2**63) - 1, 2**70, "7", 7.0, None, True],
    "s": [5, b"bytes", None, "\ud800", "a\udfffb"], "b": [1, 0, None, "yes"], "d": ["1.0", None, 10**400, b"x"],
    "f": [1e300, "1", None, 10**400], "raw": ["text", None, 3, bytearray(b"ab")], "n": [1, "x"],
    "e": ["D", "", None, 1], "maybe_l": ["1", 2**64, 1.5], "maybe_s": [5, "\udc80"], "maybe_b": [1, "no"],
    "tags": [[7], "abc", None, [None], {"a": 1}], "grid": [[[1.5]], [None], [[2**40]]],
    "inner": [{"x": 1}, {"x": "1", "y": []}, {"y": []}, [1, 2], 5]}


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_a_value_outside_its_type_gives_the_python_writers_bytes_or_exception(field):
    for bad in BAD_VALUES[field]:
        record = {**GOOD, field: bad}
        assert outcome(C_EVERY, record) == outcome(PYTHON_EVERY, record), (field, bad)


def test_a_missing_field_or_a_record_that_is_not_a_dict_raises_as_the_python_writer():
    missing = {key: value for key, value in GOOD.items() if key != "d"}

    class Mapping(dict):
        pass

    for record in (missing, None, [], "record", Mapping(GOOD)):
        assert outcome(C_EVERY, record) == outcome(PYTHON_EVERY, record), record
    with pytest.raises(KeyError):
        C_EVERY(missing)
    with pytest.raises(TypeError):
        C_EVERY(GOOD, GOOD)


def test_without_the_extension_compile_writer_is_the_python_writer(monkeypatch):
    monkeypatch.setattr(avro_encoder, "_avro_native", None)
    write = compile_writer(EVERY_TYPE, HEADER)
    assert not isinstance(write, native.Writer)
    assert write(GOOD) == PYTHON_EVERY(GOOD) == C_EVERY(GOOD)
