"""The C reader (schemas._avro_native.Reader) against the generated Python reader it stands
for: where the Python reader reads a body, the C reader reads the same record (same keys in
the same order, same types, floats to the bit) and stops at the same byte; where the Python
reader raises, the C reader declines (hands the call to its fallback). Checked on loadgen
messages, hypothesis records of every supported type, random records of every shipped
schema and of consecutive versions, the poison corpus and mutated bytes."""

from __future__ import annotations

import copy
import io
import itertools
import random
import struct

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops.dev.loadgen import generate
from schemas.avro_reader import Unsupported, compile_python_reader, compile_reader, native_reader_program
from schemas.codec import EventCodec, InvalidEvent
from schemas.compiler import plain
from schemas.registry import LocalRegistry
from schemas.rules import _detect_encoding_by_rules, detect_encoding
from tests.malformed import load_corpus
from tests.test_avro_reader import _value_of

native = pytest.importorskip("schemas._avro_native", reason="schemas/_avro_native.c is not built (no C compiler): "
                                                            "the Python reader is used alone")

DECLINED = object()


def _declined(*_args):
    return DECLINED


class Pair:
    """The C reader of a (writer, reader) pair, whose fallback only says it was asked, and
    the Python reader of the same pair."""

    def __init__(self, writer: dict, reader: dict | None = None):
        self.python = compile_python_reader(writer, reader)
        self.native = native.Reader(*native_reader_program(writer, reader), _declined, copy.deepcopy)

    def check(self, data: bytes, start: int = 0) -> bool:
        """Both readers on ``data`` from ``start``; True where the Python reader read it."""
        try:
            expected = self.python(data, start)
        except Exception:  # noqa: BLE001 - any refusal of the Python reader must be a decline in C
            assert self.native(data, start) is DECLINED, (data, start)
            return False
        got = self.native(data, start)
        assert got is not DECLINED, f"the C reader declined what the Python reader reads: {data!r} from {start}"
        assert shape(got) == shape(expected)
        return True


def shape(value):
    """A value with every type spelled out and floats as their bits (NaN equals itself)."""
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    if isinstance(value, dict):
        return ("dict", [(key, shape(item)) for key, item in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [shape(item) for item in value])
    return (type(value).__name__, value)


def body(schema: dict, record: dict) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()


def mutations(data: bytes, rng: random.Random, count: int):
    """Truncations, bytes set to varint/UTF-8 edge values, inserted overlong varints and
    invalid UTF-8 sequences (surrogates, overlong forms, stray continuation bytes)."""
    for cut in range(0, len(data), 1 + len(data) // 40):
        yield data[:cut]
    bad_runs = [b"\xff" * 10 + b"\x01", b"\x80" * 10 + b"\x00", b"\xff" * 9 + b"\x02", b"\xff" * 9 + b"\x01",
                b"\x80\x00", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xf0\x80\x80\xaf",
                b"\xf4\x90\x80\x80", b"\x80", b"\xc3", b"\x02", b"\x03", b"\x04", b"\x7f"]
    for _ in range(count):
        mutated = bytearray(data)
        position = rng.randrange(len(data) + 1)
        choice = rng.random()
        if choice < 0.4 and data:
            mutated[min(position, len(data) - 1)] = rng.choice([0x00, 0x01, 0x02, 0x03, 0x7F, 0x80, 0xFF, 0xC3,
                                                                0xED, rng.randrange(256)])
        elif choice < 0.7:  # in place, so that a string's length still covers it
            run = rng.choice(bad_runs[5:11])
            mutated[position:position + len(run)] = run
        else:
            mutated[position:position] = rng.choice(bad_runs)
        yield bytes(mutated)


def test_loadgen_messages_read_alike_without_a_single_decline():
    codec = EventCodec(LocalRegistry())
    pairs = {}
    read = 0
    for _key, value in generate(codec, 400, mean_words=(150, 250), seed=17):
        if value[:1] != b"\x00" or len(value) < 5:
            continue  # the loadgen's JSON and garbage messages are not Avro
        schema_id = int.from_bytes(value[1:5], "big")
        if schema_id not in pairs:
            try:
                writer, reader = codec._writer(schema_id)[:2]
            except InvalidEvent:
                continue  # the loadgen's bad messages include unknown schema ids
            pairs[schema_id] = Pair(writer, reader)
        read += pairs[schema_id].check(value, 5)
    assert read >= 350 and 8 in pairs, (read, set(pairs))


def test_the_codec_uses_the_c_reader_and_both_refuse_the_same_schemas():
    codec = EventCodec(LocalRegistry())
    assert isinstance(codec._writer(8)[3], native.Reader)
    assert isinstance(compile_reader(codec.reader.plain), native.Reader)
    for field_type in (["null", ENUM], ["null", ["null", "long"]], {"type": "map", "values": "long"},
                       {"type": "fixed", "name": "F", "size": 2}, ["null", {"type": "array", "items": "long"}]):
        schema = {"type": "record", "name": "R", "fields": [{"name": "x", "type": field_type}]}
        for compile_ in (compile_python_reader, native_reader_program, compile_reader):
            with pytest.raises(Unsupported):
                compile_(schema)


SIMPLE = ["null", "boolean", "int", "long", "float", "double", "string", "bytes"]
ENUM = {"type": "enum", "name": "Colour", "symbols": ["RED", "GREEN", "BLUE"]}
FIELDS = [
    *({"name": f"plain_{kind}", "type": kind} for kind in SIMPLE),
    *({"name": f"nullable_{kind}", "type": ["null", kind]} for kind in SIMPLE[1:]),
    # (no array of nulls: a mutated count of 2**62 nulls is a loop the Python reader never ends)
    *({"name": f"array_{kind}", "type": {"type": "array", "items": kind}} for kind in SIMPLE[1:]),
    {"name": "colour", "type": ENUM},
    {"name": "colours", "type": {"type": "array", "items": ENUM}},
    {"name": "three_way", "type": ["string", "null", "long"]},
    {"name": "nullable_list", "type": {"type": "array", "items": ["null", "double"]}},
]
EVERY_TYPE = {"type": "record", "name": "Every", "fields": FIELDS}
"""What the readers compile (the enum spelled out twice, as schemas.compiler.plain leaves it)."""
EVERY_TYPE_WRITTEN = fastavro.parse_schema({**EVERY_TYPE, "fields": [
    {**field, "type": {"type": "array", "items": "Colour"}} if field["name"] == "colours" else field
    for field in FIELDS]})
"""The same schema as fastavro takes it (a name defined once)."""

VALUES = {
    "null": st.none(), "boolean": st.booleans(), "int": st.integers(-(2**31), 2**31 - 1),
    "long": st.integers(-(2**63), 2**63 - 1), "float": st.floats(width=32), "double": st.floats(),
    "string": st.text(max_size=40), "bytes": st.binary(max_size=40),
}


def _strategy(schema):
    if isinstance(schema, list):
        return st.one_of(*(_strategy(branch) for branch in schema))
    if isinstance(schema, dict):
        if schema["type"] == "array":
            return st.lists(_strategy(schema["items"]), max_size=8)
        if schema["type"] == "enum":
            return st.sampled_from(schema["symbols"])
        return _strategy(schema["type"])
    return VALUES[schema]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({f["name"]: _strategy(f["type"]) for f in FIELDS}),
       st.binary(max_size=6), st.randoms(use_true_random=False))
def test_hypothesis_records_of_every_supported_type_read_alike(record, header, rng):
    data = body(EVERY_TYPE_WRITTEN, record)
    pair = Pair(EVERY_TYPE)
    assert pair.check(header + data, len(header))
    assert pair.native(data)[1] == len(data)
    for mutated in mutations(data, rng, 20):
        pair.check(mutated)


def shipped() -> dict[int, dict]:
    registry = LocalRegistry()
    return {schema_id: plain(registry.by_id(schema_id)) for schema_id in range(1, 9)}


def _record_of(schema: dict, rng: random.Random) -> dict:
    return {f["name"]: _value_of(f["type"], rng) for f in schema["fields"]}


# every shipped schema with itself, and consecutive versions both ways (new fields get
# their defaults, dropped ones are read and skipped)
PAIRS = [(n, n) for n in range(1, 9)] + [(1, 8), (8, 1), (2, 7), (7, 2)]


@pytest.mark.parametrize(("writer_id", "reader_id"), PAIRS)
def test_every_shipped_schema_and_version_pair_reads_alike(writer_id, reader_id):
    schemas = shipped()
    writer, reader = schemas[writer_id], schemas[reader_id]
    pair = Pair(writer, None if writer_id == reader_id else reader)
    rng = random.Random(writer_id * 10 + reader_id)
    for _ in range(6):
        data = body(writer, _record_of(writer, rng))
        assert pair.check(data)
        for mutated in mutations(data, rng, 60):
            pair.check(mutated)


def test_the_poison_corpus_reads_alike():
    schemas = shipped()
    pairs = {schema_id: Pair(schema) for schema_id, schema in schemas.items()}
    pairs["v1 as v2"] = Pair(schemas[1], schemas[8])
    for item in load_corpus():
        for pair in pairs.values():
            pair.check(item.value, 5 if item.value[:1] == b"\x00" else 0)
            pair.check(item.value)


# a nullable string's branch and text: valid, cut short, a surrogate, overlong forms, above
# U+10FFFF, a stray continuation byte, a branch out of range
TEXTS = [b"\x00", b"\x02\x02a", b"\x02\x06\xe2\x9c\x93", b"\x02\x04\xed\xa0", b"\x02\x06\xed\xa0\x80",
         b"\x02\x06\xed\xbf\xbf", b"\x02\x04\xc0\xaf", b"\x02\x06\xe0\x80\xaf", b"\x02\x08\xf0\x80\x80\xaf",
         b"\x02\x08\xf4\x90\x80\x80", b"\x02\x02\x80", b"\x04"]


def test_odd_varints_booleans_ints_unions_and_arrays_decline_or_read_as_python_does():
    schema = {"type": "record", "name": "Odd", "fields": [
        {"name": "flag", "type": "boolean"}, {"name": "small", "type": "int"}, {"name": "big", "type": "long"},
        {"name": "maybe", "type": ["null", "string"]}, {"name": "colour", "type": ENUM},
        {"name": "items", "type": {"type": "array", "items": "long"}}]}
    pair = Pair(schema)
    varints = [b"\x00", b"\x80\x00", b"\xff\xff\xff\xff\x0f", b"\x80\x80\x80\x80\x10", b"\xff" * 9 + b"\x01",
               b"\xfe" + b"\xff" * 8 + b"\x01", b"\xff" * 9 + b"\x02", b"\xff" * 10 + b"\x00", b"\x80" * 10 + b"\x00",
               b"\xff", b""]
    counts = [b"\x00", b"\x02\x04\x00", b"\x01\x02\x04\x00", b"\x01\x00\x04\x00", b"\x03\x02\x04\x06\x00",
              b"\xff" * 9 + b"\x01\x00", b"\x02", b"\x7e" + b"\x00" * 10]
    outcomes = [pair.check(b"".join(parts)) for parts in itertools.product(
        [b"\x00", b"\x01", b"\x02"], varints, varints[:6], TEXTS,
        [b"\x00", b"\x04", b"\x06", b"\x01"], counts)]
    assert 500 < sum(outcomes) < len(outcomes) - 10000, "both readable and refused bodies were compared"


def test_reader_defaults_are_fresh_copies_in_the_python_readers_order():
    writer = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "a", "type": "long"}, {"name": "gone", "type": ["null", "string"], "default": None}]})
    reader = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
        {"name": "d", "type": "double", "default": 0}, {"name": "a", "type": "long"},
        {"name": "e", "type": ENUM, "default": "BLUE"},
        {"name": "tags", "type": {"type": "array", "items": "string"}, "default": ["q", "r"]}]})
    pair = Pair(writer, reader)
    data = body(writer, {"a": 5, "gone": "x"})
    assert pair.check(data)
    first, end = pair.native(data)
    assert (list(first), end) == (["a", "d", "e", "tags"], len(data))
    first["tags"].append("changed")
    assert pair.native(data)[0]["tags"] == ["q", "r"]


def test_what_the_c_reader_does_not_take_goes_to_the_python_reader():
    schema = shipped()[5]
    data = body(schema, _record_of(schema, random.Random(3)))
    c_reader, python_reader = compile_reader(schema), compile_python_reader(schema)

    def outcome(read, *args):
        try:
            return shape(read(*args))
        except Exception as exc:  # noqa: BLE001 - the same exception is the point
            return ("raised", type(exc), str(exc))

    for args in [(bytearray(data),), (memoryview(data),), (data, len(data) + 3), (data, -len(data)), (data, 2**70),
                 (b"\x00" + data, 1), (b"\x00" + data, True), (data, 0), (data[:-1],)]:
        assert outcome(c_reader, *args) == outcome(python_reader, *args), args


def test_detect_encoding_answers_as_its_rules_on_every_nul_led_prefix():
    alphabet = [0x00, 0xFE, 0xFF, 0xEF, 0xBB, 0xBF, ord("{"), ord("["), ord('"'), ord("1"), 0x08, 0x80]
    tails = [b"", b"\x00\x00\x00", b'\x00\x00\x00"', b'\x00{\x00"', b"ab"]
    for length in range(1, 6):
        for start in itertools.product(alphabet, repeat=length - 1):
            for tail in tails:
                value = bytes((0, *start)) + tail
                assert detect_encoding(value) == _detect_encoding_by_rules(value), value
    assert detect_encoding(b"\x00\x00\x00\x00\x08\x02") is None
    assert detect_encoding('{"a": 1}'.encode("utf-16-be")) == "UTF-16-BE"
    assert detect_encoding('{"a": 1}'.encode("utf-32-be")) == "UTF-32-BE"
    assert detect_encoding(b"\x00\x00\xfe\xff" + '{"a"}'.encode("utf-32-be")) == "UTF-32-BE with a byte order mark"
