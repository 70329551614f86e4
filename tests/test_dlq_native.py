"""schemas._avro_native.avro_length_bytes gives schemas.dlq's Python answer byte for byte:
the Avro length prefixes the DLQ's redaction separates from their text (so that a printable
length byte cannot hide PII from a pattern)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from ops.dev.loadgen import generate
from ops.settings import ValidationSettings
from schemas import dlq
from schemas.codec import EventCodec
from schemas.registry import LocalRegistry


def test_the_c_scan_is_the_one_redaction_uses():
    from schemas import _avro_native

    assert dlq.avro_length_bytes is _avro_native.avro_length_bytes


def _avro_string(text: bytes) -> bytes:
    length, out = len(text) << 1, bytearray()
    while length > 0x7F:
        out.append(length & 0x7F | 0x80)
        length >>= 7
    return bytes(out + bytes([length])) + text


# Avro-like bodies: strings with their zig-zag lengths (some cut short), between bytes that
# are not text (union indexes, small ints, NULs) and stray bytes of every value.
_pieces = st.one_of(
    st.binary(min_size=0, max_size=300).map(_avro_string),
    st.text(min_size=6, max_size=200).map(lambda text: _avro_string(text.encode())),
    st.text(min_size=6, max_size=80).map(lambda text: _avro_string(text.encode())[:-3]),
    st.sampled_from([b"\x00", b"\x02", b"\x7f", b"\x1b", b"\x80", b"\xff\x01", b"\x09\x0a\x0d"]),
    st.binary(min_size=1, max_size=8),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_pieces, max_size=20).map(b"".join))
def test_avro_like_bytes_give_the_python_answer(data):
    assert dlq.avro_length_bytes(data) == dlq.avro_length_bytes_python(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_give_the_python_answer(data):
    assert dlq.avro_length_bytes(data) == dlq.avro_length_bytes_python(data)


def test_loadgen_messages_and_their_mutations_give_the_python_answer():
    codec = EventCodec(LocalRegistry(), ValidationSettings())
    messages = [value for _key, value in generate(codec, 60, dup_ratio=0, bad_ratio=0.3, users=50)]
    rng = random.Random(7)
    for value in messages:
        mutated = bytearray(value)
        for _ in range(5):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        for data in (value, bytes(mutated), value[: len(value) // 2], bytearray(value)):
            assert dlq.avro_length_bytes(data) == dlq.avro_length_bytes_python(bytes(data))
    assert any(dlq.avro_length_bytes(value) for value in messages)  # the corpus holds prefixes at all
