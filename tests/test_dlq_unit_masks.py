"""The masks of a DLQ original in UTF-16/32 replace whole code units. The NUL-stripped view
(how ASCII text in UTF-16/32 inside other bytes is read) ended a span after the NULs that
follow its last character: right for little-endian, but in big-endian those NULs are the
high bytes of the next character, so '<EMAIL_ADDRESS>' ate the 0x00 of the space after it.
Each case compares the whole masked original with the text masked first and then encoded:
the bytes on both sides of every mask are exact, and no byte of a PII value is left."""

from __future__ import annotations

import pytest

from redaction import Redactor
from schemas.dlq import decode_dlq, dlq_record, encode_dlq, redact_original, with_redacted_original
from tests.malformed import leaked

CARD, IBAN, EMAIL = "4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00", "alice.smith@example.com"
TEXT = f"write to {EMAIL} or pay {IBAN} with {CARD} today"
FRAMES = {"whole": b"", "after 4 binary bytes": b"\x00\x00\x00\x07", "after a 5-byte header": b"\x00\x00\x00\x00\x08"}
BOMS = {"utf-16-be": b"\xfe\xff", "utf-16-le": b"\xff\xfe", "utf-32-be": b"\x00\x00\xfe\xff",
        "utf-32-le": b"\xff\xfe\x00\x00"}


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor()


def _find_spans(redactor: Redactor):
    return lambda text: [(entity.start, entity.end, entity.type) for entity in redactor.redact(text).entities]


def _masked_text(redactor: Redactor, text: str) -> str:
    """The text with each PII value replaced by <TYPE>, as a str (encoded after)."""
    out, at = [], 0
    for start, end, kind in sorted(_find_spans(redactor)(text)):
        out += [text[at:start], f"<{kind}>"]
        at = end
    return "".join(out) + text[at:]


@pytest.mark.parametrize("frame", FRAMES)
@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-16-le", "utf-32-be", "utf-32-le"])
def test_each_mask_replaces_whole_code_units(redactor, encoding, frame):
    original = FRAMES[frame] + TEXT.encode(encoding)
    want = FRAMES[frame] + _masked_text(redactor, TEXT).encode(encoding)
    assert want.count("<".encode(encoding)) == 3
    masked, _codec = redact_original(original, _find_spans(redactor))
    assert masked == want
    assert not leaked([CARD, IBAN, EMAIL], masked)


@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-16-le"])
def test_a_dlq_record_of_utf16_json_with_a_bom_keeps_every_byte_around_its_masks(redactor, encoding):
    original = BOMS[encoding] + f'{{"prompt": "{TEXT}"}}'.encode(encoding)
    record = dlq_record(stage="decode", code="bad_encoding", reason="JSON in UTF-16", original=original, topic="t",
                        partition=0, offset=1, first_seen_ms=1)
    stored = decode_dlq(encode_dlq(with_redacted_original(record, _find_spans(redactor))))
    assert stored["original"] == BOMS[encoding] + f'{{"prompt": "{_masked_text(redactor, TEXT)}"}}'.encode(encoding)
    assert stored["original_encoding"] == encoding
    assert not leaked([CARD, IBAN, EMAIL], stored["original"])
