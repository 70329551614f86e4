"""The Avro schema compiler: a parsed schema turned into a function (value, path) ->
canonical value, the check-and-convert step every JSON event and every encoded record
goes through.

``compile_schema`` generates straight-line code per record (a field already canonical
costs one type test); ``conform`` applies it once; ``plain`` is a schema with logical
types removed, so fastavro leaves timestamps as int epoch milliseconds. Failures raise
``schemas.rules.InvalidEvent``.
"""

from __future__ import annotations

import functools
import json
import math
from datetime import datetime
from typing import Any

from schemas.registry import parse
from schemas.rules import InvalidEvent, shown, to_millis

INT_RANGE = (-(2**31), 2**31 - 1)
LONG_RANGE = (-(2**63), 2**63 - 1)


def _strip(schema: Any) -> Any:
    """A copy of a (parsed) schema without logical types and fastavro's private keys."""
    if isinstance(schema, list):
        return [_strip(branch) for branch in schema]
    if isinstance(schema, dict):
        return {key: _strip(value) for key, value in schema.items()
                if key != "logicalType" and not key.startswith("__")}
    return schema


@functools.lru_cache(maxsize=256)
def _plain_by_key(key: str) -> dict:
    return parse(json.loads(key))


def plain(parsed: dict) -> dict:
    """The parsed schema with logical types removed (so longs stay ints), cached."""
    return _plain_by_key(json.dumps(_strip(parsed), sort_keys=True))


def zero_byte_array(schema: Any, named: dict, path: str = "") -> str | None:
    """The path of the first array whose items are written as no bytes at all (null, a
    fixed of size 0, a record of only such fields), or None. Such an array's block count
    alone says how many items to make: a few bytes can ask for 2**62 of them, and every
    reader (fastavro's too) loops that many times, so a writer schema holding one is
    refused before any message is read with it."""
    if isinstance(schema, list):
        return next(filter(None, (zero_byte_array(branch, named, path) for branch in schema)), None)
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if kind == "array":
        if _writes_no_bytes(schema["items"], named, frozenset()):
            return path or "the record"
        return zero_byte_array(schema["items"], named, f"{path}[]")
    if kind == "map":
        return zero_byte_array(schema["values"], named, f"{path}{{}}")
    if kind == "record":
        return next(filter(None, (zero_byte_array(field["type"], named, f"{path}.{field['name']}".lstrip("."))
                                  for field in schema["fields"])), None)
    return None


def _writes_no_bytes(schema: Any, named: dict, resolving: frozenset) -> bool:
    if isinstance(schema, str):
        if schema == "null":
            return True
        if schema in resolving or schema not in named:
            return False  # a primitive, or a record inside itself (which needs a union: bytes)
        return _writes_no_bytes(named[schema], named, resolving | {schema})
    if not isinstance(schema, dict):
        return False  # a union writes its branch's index
    kind = schema.get("type")
    if kind == "fixed":
        return schema.get("size") == 0
    if kind == "record":
        return all(_writes_no_bytes(field["type"], named, resolving) for field in schema["fields"])
    return kind == "null"


def type_name(schema: Any) -> str:
    """A schema as a reason names it: "long or string", "array of int", a record's short name."""
    if isinstance(schema, list):
        return " or ".join(type_name(branch) for branch in schema)
    if isinstance(schema, dict):
        if schema.get("logicalType"):
            return schema["logicalType"]
        if schema.get("type") in ("record", "enum", "fixed"):
            return schema["name"].rsplit(".", 1)[-1]
        if schema.get("type") == "array":
            return f"array of {type_name(schema['items'])}"
        if schema.get("type") == "map":
            return f"map of {type_name(schema['values'])}"
        return type_name(schema["type"])
    return str(schema).rsplit(".", 1)[-1]


def conform(value: Any, schema: Any, path: str, named: dict) -> Any:
    """A JSON-ish value checked against a (parsed, logical types kept) schema and made
    canonical: defaults filled, timestamps to epoch ms, numbers to their Avro type."""
    return compile_schema(schema, named)(value, path)


_FAST_TYPES = {"string": str, "boolean": bool, "double": float, "float": float}


_MISSING = object()


def _already_canonical(schema: Any, value: str) -> str:
    """A Python test that ``value`` needs no conversion under ``schema`` (what the compiled
    converter would return unchanged), or "False" where only the converter can tell."""
    if isinstance(schema, dict) and schema.get("type") in ("int", "long") and schema.get("logicalType") in (
            None, "timestamp-millis", "local-timestamp-millis"):
        schema = schema["type"]
    if isinstance(schema, str) and schema in ("int", "long"):
        low, high = INT_RANGE if schema == "int" else LONG_RANGE
        return f"(type({value}) is int and {low} <= {value} <= {high})"
    if isinstance(schema, str) and schema in _FAST_TYPES:
        return f"type({value}) is {_FAST_TYPES[schema].__name__}"
    if isinstance(schema, list) and len(schema) == 2 and "null" in schema:
        other = _already_canonical(schema[1 - schema.index("null")], value)
        return f"({value} is None or {other})" if other != "False" else "False"
    return "False"


def _compile_record(schema: dict, named: dict, seen: dict):
    """The record converter as generated straight-line code: a field whose value is already
    canonical (nearly all of them) costs one type test, not a converter call."""
    lines = ["def record(value, path):",
             "    if not isinstance(value, dict):",
             "        raise InvalidEvent('wrong_type',",
             "                           f\"{path or 'the message'} is {shown(value)}, expected an object\")",
             "    out = {}"]
    namespace: dict[str, Any] = {"InvalidEvent": InvalidEvent, "shown": shown, "MISSING": _MISSING}
    for index, field in enumerate(schema["fields"]):
        name = field["name"]
        namespace[f"convert{index}"] = compile_schema(field["type"], named, seen)
        where = f"(path + {'.' + name!r} if path else {name!r})"
        lines += [f"    v = value.get({name!r}, MISSING)",
                  "    if v is MISSING:"]
        namespace[f"default{index}"] = field.get("default")
        if "default" not in field:
            lines.append(f"        raise InvalidEvent('missing_field', 'required field ' + {where} + ' is missing')")
        elif isinstance(field["default"], (list, dict)):  # a fresh copy for each record
            lines.append(f"        out[{name!r}] = {type(field['default']).__name__}(default{index})")
        else:
            lines.append(f"        out[{name!r}] = default{index}")
        lines += [f"    elif {_already_canonical(field['type'], 'v')}:",
                  f"        out[{name!r}] = v",
                  "    else:",
                  f"        out[{name!r}] = convert{index}(v, {where})"]
    lines.append("    return out")
    # The same converter for a plain dict that has every field (what producers and the
    # ingestion API send): the values read by subscription and the record built in one
    # display; a missing field (KeyError) or another mapping type goes the long way above,
    # which names the first missing field.
    fields = schema["fields"]
    lines += ["def complete(value, path):",
              "    if type(value) is not dict:",
              "        return record(value, path)",
              "    try:"]
    lines += [f"        v{index} = value[{field['name']!r}]" for index, field in enumerate(fields)] or ["        pass"]
    lines += ["    except KeyError:",
              "        return record(value, path)",
              "    return {"]
    for index, field in enumerate(fields):
        name = field["name"]
        where = f"(path + {'.' + name!r} if path else {name!r})"
        canonical = _already_canonical(field["type"], f"v{index}")
        converted = f"convert{index}(v{index}, {where})"
        if isinstance(field["type"], dict) and field["type"].get("type") == "array":
            canonical = f"(type(v{index}) is list and not v{index})"  # an empty list: a fresh one
            lines.append(f"        {name!r}: [] if {canonical} else {converted},")
        elif canonical == "False":
            lines.append(f"        {name!r}: {converted},")
        else:
            lines.append(f"        {name!r}: v{index} if {canonical} else {converted},")
    lines.append("    }")
    exec(compile("\n".join(lines) + "\n", f"<record converter {schema.get('name', '')}>", "exec"),  # noqa: S102
         namespace)
    complete = namespace["complete"]
    complete.one_by_one = namespace["record"]  # the reference the tests compare with
    return complete


def compile_schema(schema: Any, named: dict, _seen: dict | None = None):
    """A function (value, path) -> canonical value for one schema (see ``conform``)."""
    seen = {} if _seen is None else _seen
    if isinstance(schema, str):
        if schema in named:
            if schema not in seen:
                seen[schema] = None  # recursive types: resolved lazily below
                seen[schema] = compile_schema(named[schema], named, seen)
            found = seen[schema]
            return found if found is not None else (lambda v, p: seen[schema](v, p))
        kind = schema
        exact = _FAST_TYPES.get(kind)
        if kind in ("int", "long"):
            low, high = INT_RANGE if kind == "int" else LONG_RANGE

            def integer(value, path):
                if type(value) is int and low <= value <= high:
                    return value
                return _primitive(value, kind, path)
            return integer
        if exact is not None:
            def fast(value, path):
                if type(value) is exact:
                    return value
                return _primitive(value, kind, path)
            return fast
        return lambda value, path: _primitive(value, kind, path)
    if isinstance(schema, list):
        nullable = "null" in schema
        branches = [compile_schema(b, named, seen) for b in schema if b != "null"]
        expected = type_name(schema)

        def union(value, path):
            if value is None:
                if nullable:
                    return None
                raise InvalidEvent("wrong_type", f"{path} is null, expected {expected}")
            errors = []
            for branch in branches:
                try:
                    return branch(value, path)
                except InvalidEvent as exc:
                    errors.append(exc)
            for exc in errors:
                if exc.code != "wrong_type":
                    raise exc
            got = "a string" if isinstance(value, str) else shown(value)
            raise InvalidEvent("wrong_type", f"{path} is {got}, expected {expected}")
        return union
    kind = schema["type"]
    logical = schema.get("logicalType")
    if kind == "long" and logical in ("timestamp-millis", "local-timestamp-millis",
                                       "timestamp-micros", "local-timestamp-micros"):
        scale = 1000 if "micros" in logical else 1
        as_long = compile_schema("long", named, seen)

        def timestamp(value, path):
            if isinstance(value, (str, datetime)):
                value = to_millis(value, path) * scale
            return as_long(value, path)
        return timestamp
    if kind == "record":
        return _compile_record(schema, named, seen)
    if kind == "array":
        items = compile_schema(schema["items"], named, seen)
        expected = type_name(schema)

        def array(value, path):
            if not isinstance(value, (list, tuple)):
                raise InvalidEvent("wrong_type", f"{path} is {shown(value)}, expected {expected}")
            return [items(item, f"{path}[{i}]") for i, item in enumerate(value)]
        return array
    if kind == "map":
        values = compile_schema(schema["values"], named, seen)
        expected = type_name(schema)

        def mapping(value, path):
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise InvalidEvent("wrong_type", f"{path} is {shown(value)}, expected {expected}")
            return {k: values(v, f"{path}[{i}]") for i, (k, v) in enumerate(value.items())}
        return mapping
    if kind == "enum":
        symbols = schema["symbols"]
        allowed = frozenset(symbols)
        has_default, default = "default" in schema, schema.get("default")

        def enum(value, path):
            if not isinstance(value, str):
                raise InvalidEvent("wrong_type", f"{path} is {shown(value)}, expected one of {', '.join(symbols)}")
            if value in allowed:
                return value
            if has_default:
                return default
            raise InvalidEvent("out_of_range", f"{path} is {shown(value)}, not one of {', '.join(symbols)}")
        return enum
    if kind == "fixed":
        size = schema["size"]

        def fixed(value, path):
            data = value.encode("latin-1") if isinstance(value, str) else value
            if not isinstance(data, bytes) or len(data) != size:
                raise InvalidEvent("wrong_type", f"{path} is {shown(value)}, expected {size} bytes")
            return data
        return fixed
    return compile_schema(kind, named, seen)


def _primitive(value: Any, kind: str, path: str) -> Any:
    if kind == "null":
        if value is None:
            return None
    elif kind == "boolean":
        if isinstance(value, bool):
            return value
    elif kind in ("int", "long"):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            low, high = INT_RANGE if kind == "int" else LONG_RANGE
            if not low <= value <= high:
                raise InvalidEvent("out_of_range", f"{path} is {value}, outside the range of an Avro {kind}")
            return value
    elif kind in ("float", "double"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind == "string":
        if isinstance(value, str):
            return value
    elif kind == "bytes":
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str):
            try:
                return value.encode("latin-1")
            except UnicodeEncodeError:
                pass
    else:
        raise InvalidEvent("wrong_type", f"{path}: unsupported schema type {kind}")
    got = "a string" if isinstance(value, str) else ("null" if value is None else type(value).__name__)
    raise InvalidEvent("wrong_type", f"{path} is {got}, expected {kind}")
