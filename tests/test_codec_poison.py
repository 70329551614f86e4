"""Issue 14: inputs that used to stop the flow, stall it or leak PII through the DLQ, one
class per test (each failed on the code before the fix). No server needed."""

from __future__ import annotations

import io
import json
import shutil
import unicodedata

import fastavro
import pytest

from dataflows.ingest import redact_dlq_payload
from ops.settings import ValidationSettings
from redaction import Redactor
from schemas.codec import EventCodec, InvalidEvent, plain
from schemas.dlq import decode_dlq, dlq_record, encode_dlq
from schemas.registry import SCHEMA_DIR, LocalRegistry
from tests.malformed import leaked
from tests.test_codec import NOW, event

CARD, IBAN, EMAIL = "4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00", "alice.smith@example.com"
KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx0123456789"


@pytest.fixture(scope="module")
def codec() -> EventCodec:
    return EventCodec(LocalRegistry(), ValidationSettings())


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor()


def _code(codec: EventCodec, value: bytes) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        codec.decode(value, NOW)
    return caught.value


def _json_with(raw_field: str, raw_value: str) -> bytes:
    """The test event as JSON with one field's value replaced by raw JSON text."""
    return json.dumps(event(**{raw_field: "MARK"})).replace('"MARK"', raw_value).encode()


def _dlq_bytes(redactor: Redactor, original: bytes, schema_id: int | None = None, max_bytes: int = 64 * 1024) -> bytes:
    record = dlq_record(stage="decode", code="bad_encoding", reason="test", original=original, topic="t",
                        partition=0, offset=1, schema_id=schema_id, first_seen_ms=NOW)
    return encode_dlq(redact_dlq_payload(redactor, record, max_original_bytes=max_bytes))


# -- the flow died ---------------------------------------------------------------------------

@pytest.mark.parametrize("digits", [41, 4301, 20_000])
def test_a_json_integer_with_thousands_of_digits_is_an_invalid_event(codec, digits):
    error = _code(codec, _json_with("input_tokens", "9" * digits))
    assert error.code == "out_of_range" and "max_number_digits" in error.reason


@pytest.mark.parametrize("field", ["user_id", "event_id", "prompt"])
@pytest.mark.parametrize("lone", ["\\ud800", "\\udfff", "a\\udbff"])
def test_lone_surrogate_escapes_are_not_text(codec, field, lone):
    assert _code(codec, _json_with(field, f'"{lone}"')).code == "bad_text"


@pytest.mark.parametrize("field", ["user_id", "event_id", "prompt"])
def test_raw_surrogate_bytes_are_not_utf8(codec, field):
    value = json.dumps(event(**{field: "xMARK"})).encode().replace(b"MARK", b"\xed\xa0\x80")
    assert _code(codec, value).code == "bad_json"


def test_a_schema_id_of_a_non_record_schema_is_wrong_schema(tmp_path):
    shutil.copy(SCHEMA_DIR / "gateway_event.v1.avsc", tmp_path)
    (tmp_path / "token.v1.avsc").write_text('{"type": "string"}')
    (tmp_path / "ids.json").write_text(json.dumps({"gateway_event.v1": 1, "token.v1": 9}))
    codec = EventCodec(LocalRegistry(tmp_path), ValidationSettings())
    error = _code(codec, b"\x00\x00\x00\x00\x09" + codec.encode_plain(event()))
    assert error.code == "wrong_schema" and error.schema_id == 9


# -- the flow stalled ---------------------------------------------------------------------------

def _zigzag(number: int) -> bytes:
    number, out = (number << 1) ^ (number >> 63), bytearray()
    while number > 0x7F:
        out.append(number & 0x7F | 0x80)
        number >>= 7
    return bytes(out + bytes([number]))


def _codec_with_writer_field(tmp_path, field_type) -> tuple[EventCodec, dict]:
    """A codec reading gateway_event v1 (id 1) whose registry also holds, as id 60, v1 with
    one more field ("padding", last) of field_type: what a gateway could register."""
    writer = json.loads((SCHEMA_DIR / "gateway_event.v1.avsc").read_text())
    writer["fields"].append({"name": "padding", "type": field_type})
    (tmp_path / "gateway_event.v1.avsc").write_text(json.dumps(writer))
    shutil.copy(SCHEMA_DIR / "gateway_event.v1.avsc", tmp_path / "gateway_event.v2.avsc")
    (tmp_path / "ids.json").write_text(json.dumps({"gateway_event.v1": 60, "gateway_event.v2": 1}))
    return EventCodec(LocalRegistry(tmp_path), ValidationSettings()), writer


NO_BYTES = {"null": "null", "empty fixed": {"type": "fixed", "name": "Nothing", "size": 0},
            "empty record": {"type": "record", "name": "Empty", "fields": []},
            "record of nulls": {"type": "record", "name": "Nulls", "fields": [{"name": "a", "type": "null"}]}}


@pytest.mark.parametrize("items", NO_BYTES.values(), ids=NO_BYTES.keys())
@pytest.mark.parametrize("nested", [False, True], ids=["array", "array in an array"])
def test_a_writer_schema_with_an_array_of_items_of_no_bytes_is_refused_not_looped_over(tmp_path, items, nested):
    """Nine bytes of count asked fastavro for 2**40 items of nothing: it looped for ever."""
    field_type = {"type": "array", "items": {"type": "array", "items": items} if nested else items}
    codec, _writer = _codec_with_writer_field(tmp_path, field_type)
    huge = _zigzag(2**40) + _zigzag(0)
    value = b"\x00" + (60).to_bytes(4, "big") + codec.encode_plain(event()) + (_zigzag(1) + huge + _zigzag(0)
                                                                              if nested else huge)
    error = _code(codec, value)
    assert error.code == "wrong_schema" and error.schema_id == 60
    assert "padding" in error.reason and "no bytes" in error.reason


@pytest.mark.parametrize("field_type, value", [
    ({"type": "array", "items": {"type": "record", "name": "Maybe", "fields": [{"name": "a", "type": ["null", "int"]}]}},
     [{"a": 1}, {"a": None}]),
    ({"type": "record", "name": "Empty", "fields": []}, {}),  # its converter once failed to compile
], ids=["array of records of a union", "empty record, not in an array"])
def test_a_writer_field_that_cannot_stall_the_decoder_is_still_read(tmp_path, field_type, value):
    codec, writer = _codec_with_writer_field(tmp_path, field_type)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, plain(fastavro.parse_schema(writer)), {**event(), "padding": value})
    assert codec.decode(b"\x00" + (60).to_bytes(4, "big") + body.getvalue(), NOW) == codec.decode(
        b"\x00" + (1).to_bytes(4, "big") + codec.encode_plain(event()), NOW)


@pytest.mark.parametrize("schema_id", [2**31, 2**32 - 1])
def test_a_schema_id_above_int_range_still_makes_a_dlq_record(codec, redactor, schema_id):
    value = b"\x00" + schema_id.to_bytes(4, "big") + codec.encode_plain(event())
    error = _code(codec, value)
    assert error.code == "unknown_schema_id" and error.schema_id == schema_id
    decoded = decode_dlq(_dlq_bytes(redactor, value, error.schema_id))
    assert decoded["writer_schema_id"] == schema_id and decoded["schema_id"] is None


def test_a_dlq_record_of_a_huge_original_is_cut_keeping_size_and_hash(redactor):
    original = json.dumps(event(prompt=("call " + EMAIL + " ") * 60_000)).encode()
    assert len(original) > 1_500_000
    encoded = _dlq_bytes(redactor, original, max_bytes=16 * 1024)
    assert len(encoded) < 17 * 1024 and not leaked([EMAIL], encoded)
    decoded = decode_dlq(encoded)
    assert decoded["original_size"] == len(original) and decoded["original_truncated"] is True
    assert len(decoded["original_sha256"]) == 64 and len(decoded["original"]) <= 16 * 1024
    assert b"alice" not in decoded["original"]  # not even the start of a value cut at the limit


def test_a_dlq_record_always_encodes_whatever_its_fields_hold():
    record = dlq_record(stage="sink", code="sink_rejected", reason="bad \ud800 " * 1000, original=None, topic="t\udfff",
                        partition=2**40, offset=2**70, schema_id=-(2**40), first_seen_ms=NOW,
                        event_id="u" * 600_000, request_id="r\ud800")
    encoded = encode_dlq(record)
    assert len(encoded) < 8 * 1024
    decoded = decode_dlq(encoded)
    assert decoded["partition"] is None and decoded["offset"] is None and len(decoded["event_id"]) <= 256


def test_a_600000_character_user_id_is_rejected_at_decode(codec):
    error = _code(codec, json.dumps(event(user_id="u" * 600_000)).encode())
    assert error.code == "too_long" and "user_id" in error.reason


# -- PII survived into the DLQ ---------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be",
                                      "utf-8-sig"])
def test_dlq_originals_are_redacted_in_the_encoding_they_were_sent_in(codec, redactor, encoding):
    original = json.dumps(event(prompt=f"card {CARD}, iban {IBAN}, mail {EMAIL}")).encode(encoding)
    error = _code(codec, original)
    assert error.code == "bad_encoding" and error.reason and "truncated" not in error.reason
    encoded = _dlq_bytes(redactor, original)
    assert not leaked([CARD, IBAN, EMAIL], encoded)
    detected = {"utf-16": "utf-16-le", "utf-32": "utf-32-le", "utf-8-sig": "utf-8"}.get(encoding, encoding)
    assert decode_dlq(encoded)["original_encoding"] == detected


@pytest.mark.parametrize("before, encoding", [
    ("Grüße, 日本語 \udcff\udc80 ", "utf-8"),  # escaped undecodable bytes count one byte each
    ("emoji 😀😀 then ", "utf-16-le"),  # two units for one character
])
def test_a_masked_span_after_wide_characters_lands_on_the_pii_bytes(redactor, before, encoding):
    from schemas.dlq import redact_original

    errors = "surrogateescape" if encoding == "utf-8" else "strict"
    original = f"{before}write to {EMAIL} today".encode(encoding, errors)
    masked, _encoding = redact_original(original, lambda text: [
        (entity.start, entity.end, entity.type) for entity in redactor.redact(text).entities])
    assert masked == original.replace(EMAIL.encode(encoding), "<EMAIL_ADDRESS>".encode(encoding))


@pytest.mark.parametrize("value", [IBAN, KEY, CARD, "4111111111111111", EMAIL])
def test_avro_length_bytes_glued_to_pii_do_not_hide_it(codec, redactor, value):
    """A string that is the PII value alone: its zig-zag length byte ('6' for an IBAN, 'T'
    for the key) sits right before it in the Avro body."""
    original = codec.encode(event(region="atlantis", prompt=value, response=value))
    assert _code(codec, original).code == "unknown_region"
    assert not leaked([value], _dlq_bytes(redactor, original))


# -- accepted although they should not be ---------------------------------------------------------

@pytest.mark.parametrize("field", ["event_id", "user_id", "org_id", "request_id"])
@pytest.mark.parametrize("blank", [" ", "   ", "\t", "\u00a0", "\u3000"])
def test_whitespace_only_ids_are_rejected(codec, field, blank):
    assert _code(codec, json.dumps(event(**{field: blank})).encode()).code == "bad_id"


@pytest.mark.parametrize("when", ["2026-09-21T12:00:00\u0000junk", "2026-09-21T12:00:00\u0000",
                                  "2026-09-21T12:00:00Z\u0000", "2026-09-21T12:00:00 UTC"])
def test_iso_times_with_nul_or_junk_are_rejected(codec, when):
    assert _code(codec, json.dumps(event(event_time=when)).encode()).code == "wrong_type"


def test_nfc_and_nfd_spellings_of_an_event_id_are_one_event(codec):
    nfc, nfd = (unicodedata.normalize(form, "événement-1") for form in ("NFC", "NFD"))
    assert nfc != nfd
    first = codec.decode(json.dumps(event(event_id=nfc)).encode(), NOW)
    second = codec.decode(json.dumps(event(event_id=nfd)).encode(), NOW)
    assert first["event_id"] == second["event_id"] == nfc


@pytest.mark.parametrize("mark", ["\u200d", "\u200b", "\u00ad", "\ufeff", "\u202e"])
def test_model_names_with_invisible_characters_are_rejected(codec, mark):
    error = _code(codec, codec.encode(event(model=f"claude{mark}-sonnet-4")))
    assert error.code == "bad_id" and f"U+{ord(mark):04X}" in error.reason


@pytest.mark.parametrize("prefix,encoding,named", [
    (b"\xef\xbb\xbf", "utf-8", "UTF-8 with a byte order mark"), (b"", "utf-16-le", "UTF-16-LE"),
    (b"", "utf-16-be", "UTF-16-BE"), (b"", "utf-32-le", "UTF-32-LE"), (b"", "utf-32-be", "UTF-32-BE"),
    (b"\xff\xfe", "utf-16-le", "UTF-16-LE with a byte order mark")])
def test_bom_and_utf16_32_json_name_their_encoding(codec, prefix, encoding, named):
    error = _code(codec, prefix + json.dumps(event()).encode(encoding))
    assert error.code == "bad_encoding" and named in error.reason


def test_a_timestamp_micros_writer_schema_is_read_as_micros(tmp_path):
    micros = json.loads((SCHEMA_DIR / "gateway_event.v1.avsc").read_text())
    for field in micros["fields"]:
        if field["name"] == "event_time":
            field["type"] = {"type": "long", "logicalType": "timestamp-micros"}
    (tmp_path / "gateway_event.v1.avsc").write_text(json.dumps(micros))
    shutil.copy(SCHEMA_DIR / "gateway_event.v1.avsc", tmp_path / "gateway_event.v2.avsc")
    (tmp_path / "ids.json").write_text(json.dumps({"gateway_event.v1": 50, "gateway_event.v2": 1}))
    codec = EventCodec(LocalRegistry(tmp_path), ValidationSettings())
    body = io.BytesIO()
    fastavro.schemaless_writer(body, plain(fastavro.parse_schema(micros)), {**event(), "event_time": (NOW - 1000) * 1000 + 999})
    decoded = codec.decode(b"\x00" + (50).to_bytes(4, "big") + body.getvalue(), NOW)
    assert decoded["event_time"] == NOW - 1000


# -- defence in depth ----------------------------------------------------------------------------

class _BrokenDecoder(EventCodec):
    """A decoder with a bug no input found yet: the flow must still carry on."""

    def decode(self, value, now_ms):
        if value == b"boom":
            raise KeyError("a bug")
        return super().decode(value, now_ms)


def test_a_decoder_bug_sends_the_message_to_the_dlq_instead_of_stopping_the_flow(codec):
    from types import SimpleNamespace

    from dataflows.ingest import DLQ, OK, decode_batch

    broken = _BrokenDecoder(LocalRegistry(), ValidationSettings(max_past_s=10**10, max_future_s=10**10))
    messages = [SimpleNamespace(value=value, topic="t", partition=0, offset=at)
                for at, value in enumerate([b"boom", codec.encode(event())])]
    routed = decode_batch(broken, messages)
    assert [kind for kind, _ in routed] == [DLQ, OK]
    assert routed[0][1]["code"] == "decoder_error" and "KeyError" in routed[0][1]["reason"]


def test_an_event_routed_to_the_dlq_for_residency_is_cut_to_size():
    from dataflows.outputs import no_storage_to_dlq

    record = no_storage_to_dlq({**event(prompt="p" * 300_000), "source_partition": 0, "source_offset": 1}, 4096)
    decoded = decode_dlq(encode_dlq(record))
    assert decoded["original_truncated"] and len(decoded["original"]) == 4096 and decoded["original_size"] > 300_000


def test_a_replayed_event_routed_to_the_dlq_for_residency_keeps_its_fields_and_not_the_replays_horizon():
    from dataflows.outputs import no_storage_to_dlq
    from dataflows.state import HORIZON_FIELD

    original = {**event(), "source_partition": 0, "source_offset": 1}
    record = no_storage_to_dlq({**original, HORIZON_FIELD: 1_700_000_000_000})
    assert json.loads(decode_dlq(encode_dlq(record))["original"]) == json.loads(json.dumps(original, default=str))
