"""The string checks the C reader makes while it reads (Reader.read_checked), which let
EventCodec.decode skip clean_strings: on bodies whose strings sit on every edge of the rules
(limits, spaces, controls, non-ASCII, upper-case and all-zero hex ids, long lists), the
checks answer what a Python statement of them answers, the record is read's own, and the
codec decodes exactly what it decodes with clean_strings run on every event (the same event,
key order included, or the same refusal)."""

from __future__ import annotations

import io

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops.settings import ValidationSettings
from schemas.avro_reader import CHECK_HEX_ID, CHECK_IDENTIFIER, CHECK_TEXT, CHECK_TEXT_LIST
from schemas.codec import EventCodec, InvalidEvent
from schemas.registry import LocalRegistry
from tests.test_codec import NOW, event, v1_body

native = pytest.importorskip("schemas._avro_native", reason="schemas/_avro_native.c is not built (no C "
                                                            "compiler): clean_strings runs on every event")
if not hasattr(getattr(native, "Reader", None), "read_checked"):
    pytest.skip("schemas/_avro_native is a build from before Reader.read_checked (clean_strings runs on every "
                "event): rebuild it with python3 setup.py build_ext --inplace", allow_module_level=True)

# Small limits (names: the smallest that the test event's safety decision fits), so that
# generated strings cross them.
RULES = ValidationSettings(max_id_chars=36, max_name_chars=20, max_text_chars=1000, max_array_items=3)


class CleanStringsAlways(EventCodec):
    """The codec as it was before the checks: clean_strings runs on every decoded event."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.string_checks = {}


CHECKED = EventCodec(LocalRegistry(), RULES)
REFERENCE = CleanStringsAlways(LocalRegistry(), RULES)


def passes(value, check: tuple[int, int, int]) -> bool:
    """The check in Python, as avro_reader documents it."""
    kind, limit, item_limit = check
    if kind == CHECK_TEXT_LIST:
        return type(value) is list and len(value) <= limit and all(
            item.isascii() and len(item) <= item_limit for item in value)
    if value is None:
        return True
    if kind == CHECK_IDENTIFIER:
        return value == "" or (value.isascii() and len(value) <= limit and value.isprintable() and " " not in value)
    if kind == CHECK_TEXT:
        return value.isascii() and len(value) <= limit
    assert kind == CHECK_HEX_ID
    return len(value) == limit and set(value) <= set("0123456789abcdef") and value.count("0") != limit


def wire(record: dict) -> bytes:
    """The record as the latest schema's wire format, written as it is (no normalising)."""
    buffer = io.BytesIO()
    buffer.write(bytes([0]) + CHECKED.schema_id.to_bytes(4, "big"))
    fastavro.schemaless_writer(buffer, CHECKED.reader.plain, record)
    return buffer.getvalue()


def outcome(codec: EventCodec, value: bytes):
    try:
        decoded = codec.decode(value, NOW)
    except InvalidEvent as exc:
        return ("rejected", exc.code, exc.reason, exc.schema_id)
    return ("event", decoded, list(decoded))


def strings(edge: int) -> st.SearchStrategy[str]:
    """Text around ``edge`` characters from an alphabet that trips every rule."""
    alphabet = st.sampled_from(list("aZ09-_:.") + [" ", "\t", "\x00", "\x7f", "é", "\u200d", "\ud7ff", "✓", "F", "0"])
    return st.one_of(st.text(alphabet, max_size=4), st.text(alphabet, min_size=edge - 1, max_size=edge + 1),
                     st.just("a" * edge), st.just("a" * (edge + 1)))


def hex_ids(digits: int) -> st.SearchStrategy[str | None]:
    return st.one_of(st.none(), st.just("0" * digits), st.text(st.sampled_from("0123456789abcdefABg"),
                                                                 min_size=digits - 1, max_size=digits + 1))


def edge_value(name: str, check: tuple[int, int, int]) -> st.SearchStrategy:
    kind, limit, item_limit = check
    if kind == CHECK_HEX_ID:
        return hex_ids(limit)
    if kind == CHECK_TEXT_LIST:
        return st.lists(strings(item_limit), max_size=limit + 1)
    if name in REQUIRED_STRINGS:
        return strings(limit)
    return st.one_of(st.none(), strings(limit))


REQUIRED_STRINGS = {field["name"] for field in CHECKED.reader.plain["fields"] if field["type"] == "string"}
VALID_TRACE = {"trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331"}


@st.composite
def records(draw) -> dict:
    """The test event with up to three of its checked fields on an edge."""
    changed = draw(st.lists(st.sampled_from(sorted(CHECKED.string_checks)), max_size=3, unique=True))
    base = event(**draw(st.sampled_from([{}, VALID_TRACE])))
    return {**base, **{name: draw(edge_value(name, CHECKED.string_checks[name])) for name in changed}}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records())
def test_read_checked_answers_the_checks_and_the_codec_decodes_as_before(record):
    try:
        value = wire(record)
    except (UnicodeEncodeError, ValueError):
        return  # a lone surrogate is not UTF-8: no body holds it
    fast = CHECKED._writer(CHECKED.schema_id)[3]
    read, end, passed = fast.read_checked(value, 5)
    assert (read, end) == fast(value, 5)
    assert passed == all(passes(read[name], check) for name, check in CHECKED.string_checks.items())
    assert outcome(CHECKED, value) == outcome(REFERENCE, value)


def test_the_common_event_passes_and_skips_clean_strings():
    value = wire(event(**VALID_TRACE))
    assert CHECKED._decode_checked(value)[2] is True
    assert outcome(CHECKED, value) == outcome(REFERENCE, value)


@pytest.mark.parametrize("changes", [
    {"user_id": "user 1"}, {"model": "m" * 21}, {"org_id": "ｏｒｇ"}, {"prompt": "héllo"}, {"prompt": "a" * 1001},
    {"trace_id": "0AF7651916CD43DD8448EB211C80319C"}, {"span_id": "0" * 16}, {"safety_decisions": ["a"] * 4},
    {"policy_flags": ["ünicode"]},
])
def test_an_event_the_rules_change_or_refuse_takes_clean_strings(changes):
    value = wire(event(**changes))
    assert CHECKED._decode_checked(value)[2] is False
    assert outcome(CHECKED, value) == outcome(REFERENCE, value)


def test_an_older_writer_without_every_checked_field_still_takes_clean_strings():
    """gateway_event v1 has no trace ids: their defaults are not checked, so no v1 body is
    trusted, and its events decode as before."""
    value = bytes([0]) + (1).to_bytes(4, "big") + v1_body(event(user_id="user 1"))
    assert CHECKED._decode_checked(value)[2] is False
    assert CHECKED._writer(1)[4] is None  # no checked reader for that writer
    assert outcome(CHECKED, value) == outcome(REFERENCE, value)
    clean = bytes([0]) + (1).to_bytes(4, "big") + v1_body(event())
    assert outcome(CHECKED, clean) == outcome(REFERENCE, clean)
