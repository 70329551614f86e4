"""The generated record converter of schemas.compiler (compile_schema): values already
canonical pass through, everything else goes to the field's converter with its path."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.compiler import compile_schema
from schemas.rules import InvalidEvent
from schemas.registry import LocalRegistry, parse
from tests.test_codec import event

SCHEMA = parse({"type": "record", "name": "Outer", "namespace": "t", "fields": [
    {"name": "n", "type": "long"},
    {"name": "small", "type": "int", "default": 1},
    {"name": "ratio", "type": "double", "default": 0.5},
    {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "label", "type": ["null", "string"], "default": None},
    {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
    {"name": "inner", "type": {"type": "record", "name": "Inner", "fields": [{"name": "x", "type": "string"}]}},
]})
CONVERT = compile_schema(SCHEMA, {})


def test_canonical_values_pass_and_defaults_are_fresh_copies():
    first = CONVERT({"n": 5, "at": 1_700_000_000_000, "inner": {"x": "a"}, "ignored": 1}, "")
    assert first == {"n": 5, "small": 1, "ratio": 0.5, "at": 1_700_000_000_000, "label": None, "tags": [],
                     "inner": {"x": "a"}}
    first["tags"].append("changed")
    assert CONVERT({"n": 5, "at": 0, "inner": {"x": "a"}}, "")["tags"] == []


def test_other_values_are_converted_or_rejected_by_the_field_converter():
    converted = CONVERT({"n": 5.0, "ratio": 2, "at": "2026-01-01T00:00:00Z", "inner": {"x": "a"}}, "")
    assert (converted["n"], converted["ratio"], converted["at"]) == (5, 2.0, 1_767_225_600_000)
    assert type(converted["n"]) is int and type(converted["ratio"]) is float


@pytest.mark.parametrize("value,code,where", [
    ({"n": True, "at": 0, "inner": {"x": "a"}}, "wrong_type", "n"),            # bool is not a long
    ({"n": 2**63, "at": 0, "inner": {"x": "a"}}, "out_of_range", "n"),
    ({"n": 1, "small": 2**31, "at": 0, "inner": {"x": "a"}}, "out_of_range", "small"),
    ({"n": 1, "at": 0, "label": 3, "inner": {"x": "a"}}, "wrong_type", "label"),
    ({"n": 1, "at": 0, "inner": {}}, "missing_field", "inner.x"),
    ({"at": 0, "inner": {"x": "a"}}, "missing_field", "n"),
    ({"n": 1, "at": 0, "inner": "x"}, "wrong_type", "inner"),
])
def test_bad_values_name_their_field_path(value, code, where):
    with pytest.raises(InvalidEvent) as caught:
        CONVERT(value, "")
    assert caught.value.code == code and where in caught.value.reason


def _outcome(convert, value):
    try:
        return ("converted", convert(value, "ev"))
    except InvalidEvent as exc:
        return ("rejected", exc.code, exc.reason)


_GATEWAY = LocalRegistry().by_id(8)
_GATEWAY_CONVERT = compile_schema(_GATEWAY, _GATEWAY.get("__named_schemas", {}))
_FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=5),
                          st.lists(st.one_of(st.text(max_size=3), st.integers()), max_size=3),
                          st.sampled_from(["2026-01-01T00:00:00Z", 1.0, 2**31, -(2**63) - 1]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([f["name"] for f in _GATEWAY["fields"]]), _FIELD_VALUES, max_size=5),
       st.sets(st.sampled_from([f["name"] for f in _GATEWAY["fields"]]), max_size=2))
def test_the_complete_record_path_converts_as_field_by_field(changes, dropped):
    """Every field present (the one-display path) or some missing (the long way): the same
    record, key order included, or the same first error, as the converter field by field."""
    value = {**event(), **changes}
    for name in dropped:
        value.pop(name)
    fast, reference = _outcome(_GATEWAY_CONVERT, value), _outcome(_GATEWAY_CONVERT.one_by_one, value)
    assert fast == reference
    if fast[0] == "converted":
        assert list(fast[1]) == list(reference[1]) == [f["name"] for f in _GATEWAY["fields"]]


def test_a_complete_record_with_a_bad_field_names_the_first_bad_field():
    value = {**event(), "latency_ms": "slow", "input_tokens": -(2**70)}
    assert _outcome(_GATEWAY_CONVERT, value) == ("rejected", "wrong_type", "ev.latency_ms is a string, expected int")
