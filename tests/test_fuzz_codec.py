"""Property tests (hypothesis) over the decoder, the DLQ redaction and every record encoder:
whatever the input, the answer is an event or an InvalidEvent, a DLQ record always encodes,
and a PII value placed anywhere never survives DLQ redaction in any encoding."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops.settings import ValidationSettings
from redaction import Redactor
from schemas.codec import EventCodec, InvalidEvent
from schemas.records import (
    decode_billing_event,
    decode_quota_alert,
    decode_quota_update,
    encode_billing_event,
    encode_quota_alert,
    encode_quota_update,
)
from schemas.dlq import decode_dlq, dlq_record, encode_dlq, with_redacted_original
from schemas.registry import LocalRegistry
from tests.malformed import leaked
from tests.test_codec import NOW, event

QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODEC = EventCodec(LocalRegistry(), ValidationSettings())
REDACTOR = Redactor()
PII = ["alice.smith@example.com", "4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00", "AKIAIOSFODNN7EXAMPLE",
       "+1 415 555 0123"]
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20)
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)


def decodes_or_rejects(value: bytes) -> None:
    try:
        CODEC.decode(value, NOW)
    except InvalidEvent as exc:
        assert exc.code and exc.reason


def spans(text: str) -> list[tuple[int, int, str]]:
    return [(e.start, e.end, e.type) for e in REDACTOR.redact(text).entities]


@QUICK
@given(st.binary(max_size=400))
def test_any_bytes_decode_or_are_rejected(value):
    decodes_or_rejects(value)


@QUICK
@given(st.sampled_from(sorted(event())), json_values)
def test_any_json_value_in_any_field_decodes_or_is_rejected(field, value):
    decodes_or_rejects(json.dumps({**event(), field: value}).encode())


@QUICK
@given(st.sampled_from(sorted(event())), any_text, st.sampled_from(ENCODINGS))
def test_any_text_in_any_field_in_any_encoding_decodes_or_is_rejected(field, text, encoding):
    body = json.dumps({**event(), field: text}, ensure_ascii=False)
    decodes_or_rejects(body.encode(encoding, "surrogatepass"))


@QUICK
@given(st.binary(max_size=300), st.integers(0, 400), st.sampled_from(PII), st.sampled_from(ENCODINGS))
def test_pii_anywhere_in_any_bytes_never_survives_dlq_redaction(noise, at, value, encoding):
    at = min(at, len(noise))
    # Delimited: digits of the noise glued to a phone number make a different number,
    # which no recognizer should (or does) call that phone number.
    pii = (" | " + value + " | ").encode(encoding.replace("-sig", "").replace("utf-16", "utf-16-le")
                                     if encoding in ("utf-16", "utf-32", "utf-8-sig") else encoding)
    original = noise[:at] + pii + noise[at:]
    record = dlq_record(stage="decode", code="bad_avro", reason="fuzz", original=original, topic="t", partition=0,
                        offset=0, first_seen_ms=NOW)
    encoded = encode_dlq(with_redacted_original(record, spans, 1024))
    assert not leaked([value], encoded)


@QUICK
@given(st.sampled_from(PII), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80))
def test_pii_in_an_avro_string_of_any_length_never_survives_dlq_redaction(value, padding):
    original = CODEC.encode(event(region="atlantis", prompt=padding + " " + value, response=value))
    record = dlq_record(stage="decode", code="unknown_region", reason="fuzz", original=original, topic="t",
                        partition=0, offset=0, first_seen_ms=NOW)
    assert not leaked([value], encode_dlq(with_redacted_original(record, spans)))


@QUICK
@given(stage=any_text, code=any_text, reason=any_text, event_id=st.none() | any_text,
       partition=st.none() | st.integers(), offset=st.none() | st.integers(), schema_id=st.none() | st.integers(),
       original=st.none() | st.binary(max_size=100))
def test_any_dlq_record_encodes(stage, code, reason, event_id, partition, offset, schema_id, original):
    record = dlq_record(stage=stage, code=code, reason=reason, original=original, topic=stage, partition=partition,
                        offset=offset, schema_id=schema_id, first_seen_ms=NOW, event_id=event_id, request_id=reason)
    decoded = decode_dlq(encode_dlq(record))
    assert decoded["original"] is None  # never redacted, so withheld


RECORD_CODECS = [(encode_billing_event, decode_billing_event, "billing_id"),
                 (encode_quota_alert, decode_quota_alert, "alert_id"),
                 (encode_quota_update, decode_quota_update, "update_id")]


@pytest.mark.parametrize("encode,decode,key", RECORD_CODECS, ids=[c[2] for c in RECORD_CODECS])
def test_record_encoders_round_trip_or_raise_invalid_event(encode, decode, key):
    @QUICK
    @given(st.dictionaries(st.sampled_from([key, "org_id", "user_id", "model", "version", "events", "cost_usd",
                                            "input_tokens", "window_start_ms", "threshold", "n"]),
                           json_values | any_text, max_size=8))
    def check(fields):
        try:
            encoded = encode(fields)
        except InvalidEvent as exc:
            assert exc.code
            return
        assert isinstance(decode(encoded), dict)

    check()
