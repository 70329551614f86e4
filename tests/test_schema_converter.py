"""The generated record converter of schemas.compiler (compile_schema): values already
canonical pass through, everything else goes to the field's converter with its path."""

from __future__ import annotations

import pytest

from schemas.compiler import compile_schema
from schemas.rules import InvalidEvent
from schemas.registry import parse

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
