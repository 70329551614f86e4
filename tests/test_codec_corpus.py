"""The fixed malformed corpus through the decoder and the DLQ encoder (no server): every
input gets its InvalidEvent code, and its DLQ record encodes, fits a Kafka message and
holds none of its PII in any encoding."""

from __future__ import annotations

import pytest

from dataflows.ingest import redact_dlq_payload
from schemas.codec import InvalidEvent
from schemas.dlq import decode_dlq, dlq_record, encode_dlq
from tests.malformed import CORPUS_NOW, leaked, load_corpus
from tests.test_codec_poison import codec, redactor  # noqa: F401 - the same module fixtures

CORPUS = load_corpus()


def test_the_corpus_covers_every_class():
    names = " ".join(item.name for item in CORPUS)
    for fragment in ("digit int", "surrogate", "raw bytes ed", "utf-16", "utf-32", "BOM", "schema id 2^31",
                     "Avro unknown region", "event_time", "U+200D", "'   '", "duplicate", "safety decisions",
                     "deep", "600,000-character user_id", "magic byte", "NaN", "Avro cut"):
        assert fragment in names, fragment
    assert len(CORPUS) >= 300


@pytest.mark.parametrize("item", CORPUS, ids=[item.name for item in CORPUS])
def test_every_corpus_input_gets_its_code_and_a_storable_dlq_record(codec, redactor, item):
    with pytest.raises(InvalidEvent) as caught:
        codec.decode(item.value, CORPUS_NOW)
    if item.code != "*":
        assert caught.value.code == item.code, caught.value.reason
    assert not leaked(item.pii, caught.value.reason.encode())
    record = dlq_record(stage="decode", code=caught.value.code, reason=caught.value.reason, original=item.value,
                        topic="gateway-events", partition=0, offset=7, schema_id=caught.value.schema_id,
                        first_seen_ms=CORPUS_NOW)
    encoded = encode_dlq(redact_dlq_payload(redactor, record, max_original_bytes=16 * 1024))
    assert len(encoded) < 20 * 1024
    assert not leaked(item.pii, encoded)
    decoded = decode_dlq(encoded)
    assert decoded["original_size"] == len(item.value)
    assert decoded["writer_schema_id"] == caught.value.schema_id
    assert decoded["payload_redacted"] or decoded["text_withheld"]
