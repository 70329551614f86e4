"""Decode and encode events and the pipeline's own records.

Accepted input (``EventCodec.decode``):

* Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro body. The writer
  schema comes from the registry by id and is resolved into the latest schema (defaults
  filled for fields the writer did not have).
* Plain Avro: the body alone, written with a configured writer schema (default: the
  latest gateway_event).
* JSON: one object; ``event_time`` as int epoch milliseconds or an ISO-8601 string
  (naive times are UTC); missing fields with defaults get their default; unknown fields
  are ignored (a newer producer may send them).

The result is the canonical in-flow event: plain Python types, every field of the latest
schema present, timestamps as int epoch milliseconds (fastavro's logical-type conversion
is switched off by reading with logical types stripped).

Input limits (``DecodeLimits``, from ``validation.*`` settings) apply before and while
parsing: message size, JSON depth, digits of a JSON number, array items, and per-field
string limits (ids, names, free text). Text must be UTF-8 without a BOM: UTF-16/32 and
BOM-prefixed JSON are named in the reason (code ``bad_encoding``); lone surrogates
(``\\ud800`` escapes) are rejected (``bad_text``). Ids and names are NFC-normalised and
must be printable without whitespace or format characters (``bad_id``).

Every failure raises ``InvalidEvent`` with a short ``code``, a ``reason`` naming the field
and the rule, and the writer ``schema_id`` when there was one. Reasons never quote string
values (they may be prompts, responses or other PII); numbers and type names only.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Callable

import fastavro

from schemas.registry import default_local_registry, full_name, parse
from schemas.vocabulary import COUNTED_TOKEN_FIELDS, TOKEN_KINDS, window_id

MAGIC = 0
HEADER = 5
INT_RANGE = (-(2**31), 2**31 - 1)
LONG_RANGE = (-(2**63), 2**63 - 1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
REQUIRED_TEXT = ("event_id", "request_id", "user_id", "org_id", "model")
_SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_.:\-]{1,40}$")
CODES = ("empty", "unknown_schema_id", "wrong_schema", "truncated", "bad_avro", "bad_json", "wrong_type",
         "missing_field", "out_of_range", "future_timestamp", "past_timestamp", "unknown_region",
         "too_large", "too_deep", "too_long", "bad_encoding", "bad_text", "bad_id")
# Identifiers and names: NFC-normalised, then checked against ID_RULE; the rest is free text.
ID_FIELDS = ("event_id", "request_id", "user_id", "org_id", "conversation_id", "experiment_id")
NAME_FIELDS = ("provider", "endpoint", "model", "model_version", "error_code", "variant")
TEXT_FIELDS = ("prompt", "response", "comment")
LIST_FIELDS = ("safety_decisions", "policy_flags")
# W3C trace context ids (schema v2): lowercase hex of a fixed length, not all zero.
TRACE_ID_FIELDS = (("trace_id", 32), ("span_id", 16))
_HEX = frozenset("0123456789abcdef")
ID_RULE = "printable characters, no whitespace, control or format characters (e.g. zero-width joiners)"
# Unicode categories an id or name may not contain: controls, format (ZWJ, BOM), surrogates,
# private use, unassigned, separators (whitespace).
_FORBIDDEN_IN_IDS = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"))
_SURROGATE = re.compile("[\ud800-\udfff]")
_ISO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d{1,9})?)?"
                       r"(?:Z|[+-]\d{2}(?::?\d{2})?)?)?$")
# (byte prefix, encoding) of JSON that is not plain UTF-8, longest prefix first.
_BOMS = ((b"\x00\x00\xfe\xff", "UTF-32-BE with a byte order mark"),
         (b"\xff\xfe\x00\x00", "UTF-32-LE with a byte order mark"),
         (b"\xef\xbb\xbf", "UTF-8 with a byte order mark"),
         (b"\xfe\xff", "UTF-16-BE with a byte order mark"),
         (b"\xff\xfe", "UTF-16-LE with a byte order mark"))


_JSON_OPENERS = b"{["
_JSON_SECOND = b'"{}[]- \t\r\n0123456789tfn'


@dataclass(frozen=True)
class DecodeLimits:
    """What one message may hold; anything beyond is an InvalidEvent, checked before the
    costly step it protects (size before parsing, digits before int conversion)."""

    max_message_bytes: int = 1_000_000
    max_json_depth: int = 16
    max_number_digits: int = 40
    max_array_items: int = 256
    max_id_chars: int = 128
    max_name_chars: int = 128
    max_text_chars: int = 500_000

    @classmethod
    def of(cls, validation: Any) -> "DecodeLimits":
        """The limits named in a settings section (any object with these attributes)."""
        return cls(**{name: getattr(validation, name) for name in cls.__dataclass_fields__
                      if hasattr(validation, name)})


@dataclass(frozen=True)
class EventRules(DecodeLimits):
    """The semantic rules of an event besides its input limits; the defaults are those of
    the ``validation`` settings section, which a caller passes instead (any object with
    these attributes)."""

    regions: tuple[str, ...] = ("us", "eu", "apac")
    max_future_s: float = 300
    max_past_s: float = 7 * 86400
    max_latency_ms: int = 15 * 60 * 1000
    max_tokens: int = 10_000_000


def detect_encoding(value: bytes) -> str | None:
    """The name of a non-UTF-8 text encoding the bytes start with (BOM, or JSON's first
    character padded with NULs as UTF-16/32 writes it), or None."""
    for prefix, name in _BOMS:
        if value.startswith(prefix):
            return name
    # The second character must be one JSON allows after "{" or "[", so that a Confluent
    # header (also starting with a NUL) is not taken for UTF-16/32.
    first, second = _JSON_OPENERS, _JSON_SECOND
    if len(value) >= 8 and value[:3] == b"\x00\x00\x00" and value[3] in first and value[4:7] == b"\x00\x00\x00" \
            and value[7] in second:
        return "UTF-32-BE"
    if len(value) >= 8 and value[0] in first and value[1:4] == b"\x00\x00\x00" and value[4] in second \
            and value[5:8] == b"\x00\x00\x00":
        return "UTF-32-LE"
    if len(value) >= 4 and value[0] == 0 and value[1] in first and value[2] == 0 and value[3] in second:
        return "UTF-16-BE"
    if len(value) >= 4 and value[0] in first and value[1] == 0 and value[2] in second and value[3] == 0:
        return "UTF-16-LE"
    return None


class _JsonLimit(Exception):
    def __init__(self, code: str, reason: str):
        self.code, self.reason = code, reason


def _no_constants(name: str):
    raise _JsonLimit("bad_json", f"{name} is not a JSON number")


def _unique_keys(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _JsonLimit("bad_json", "an object has the same key twice")
    return out


def _check_tree(obj: Any, limits: DecodeLimits) -> None:
    """Depth and array sizes of a parsed JSON value, without recursion."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limits.max_json_depth:
            raise InvalidEvent("too_deep", f"JSON nests deeper than validation.max_json_depth "
                                           f"({limits.max_json_depth})")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            if len(value) > limits.max_array_items:
                raise InvalidEvent("too_large", f"a JSON array has {len(value)} items, above "
                                                f"validation.max_array_items ({limits.max_array_items})")
            stack.extend((v, depth + 1) for v in value)


def parse_json(value: bytes, limits: DecodeLimits) -> Any:
    """Strict JSON: UTF-8 without BOM, no NaN/Infinity, no duplicate keys, numbers of at
    most max_number_digits digits (checked before conversion), depth and array limits."""
    encoding = detect_encoding(value)
    if encoding is not None:
        raise InvalidEvent("bad_encoding", f"JSON message is {encoding}; events must be UTF-8 without a "
                                           "byte order mark")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent("bad_json", f"JSON message is not UTF-8 (byte {exc.start})") from None

    def number(kind: Callable[[str], Any]):
        def parse(digits: str):
            if len(digits) > limits.max_number_digits:
                raise _JsonLimit("out_of_range", f"a JSON number has {len(digits)} characters, above "
                                                 f"validation.max_number_digits ({limits.max_number_digits})")
            parsed = kind(digits)
            if isinstance(parsed, float) and not math.isfinite(parsed):
                raise _JsonLimit("out_of_range", "a JSON number is too large for a double")
            return parsed
        return parse

    try:
        obj = json.loads(text, parse_int=number(int), parse_float=number(float), parse_constant=_no_constants,
                         object_pairs_hook=_unique_keys)
    except _JsonLimit as exc:
        raise InvalidEvent(exc.code, exc.reason) from None
    except json.JSONDecodeError as exc:
        raise InvalidEvent("bad_json", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidEvent("too_deep", "JSON nested too deeply") from None
    # Nesting cannot exceed the number of brackets, nor an array its commas + 1.
    if text.count("[") + text.count("{") > limits.max_json_depth or text.count(",") >= limits.max_array_items:
        _check_tree(obj, limits)
    return obj


def clean_text(value: str, path: str, max_chars: int, identifier: bool) -> str:
    """A string field checked: no lone surrogates, at most max_chars; ids and names are
    NFC-normalised (so two spellings of one id are one id) and must follow ID_RULE."""
    if len(value) > max_chars * 4:
        raise InvalidEvent("too_long", f"{path} has {len(value)} characters, above {max_chars}")
    if not value.isascii() and _SURROGATE.search(value):
        raise InvalidEvent("bad_text", f"{path} holds a lone UTF-16 surrogate, which is not text")
    if identifier:
        value = unicodedata.normalize("NFC", value)
    if len(value) > max_chars:
        raise InvalidEvent("too_long", f"{path} has {len(value)} characters, above {max_chars}")
    if identifier and (" " in value or not value.isascii() or not value.isprintable()):
        for char in value:
            if char == " " or unicodedata.category(char) in _FORBIDDEN_IN_IDS:
                raise InvalidEvent("bad_id", f"{path} holds U+{ord(char):04X}; ids and names must be {ID_RULE}")
    return value


def trace_context_id(value: str, path: str, digits: int) -> str:
    """A W3C trace or span id: ``digits`` hex digits (upper case accepted, stored lower
    case, as OpenTelemetry writes them), not all zero (the W3C invalid id)."""
    lowered = value.lower()
    if len(lowered) != digits or not _HEX.issuperset(lowered):
        raise InvalidEvent("bad_id", f"{path} has {len(value)} characters; expected {digits} hex digits "
                                     "(W3C trace context)")
    if lowered.count("0") == digits:
        raise InvalidEvent("bad_id", f"{path} is all zeros, the W3C invalid id")
    return lowered


class InvalidEvent(Exception):
    """A message that is not a valid event: ``code`` (machine), ``reason`` (human), ``schema_id``."""

    def __init__(self, code: str, reason: str, schema_id: int | None = None):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.schema_id = schema_id

    def __reduce__(self):
        return (type(self), (self.code, self.reason, self.schema_id))


def shown(value: Any) -> str:
    """A value fit for a reason: short identifiers as they are, anything else by its size."""
    if isinstance(value, str):
        return repr(value) if _SAFE_TOKEN.match(value) else f"a {len(value)}-character string"
    return type(value).__name__


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


def to_millis(value: Any, path: str) -> int:
    """An ISO-8601 string or datetime as epoch milliseconds (naive = UTC)."""
    if isinstance(value, str):
        try:
            if not _ISO_TIME.match(value.strip()):
                raise ValueError("not ISO-8601")
            value = datetime.fromisoformat(value.strip().replace(",", "."))
        except ValueError:
            raise InvalidEvent("wrong_type", f"{path} is {shown(value)}, not an ISO-8601 timestamp or epoch "
                                              "milliseconds") from None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return (value - EPOCH) // _MS
    raise InvalidEvent("wrong_type", f"{path} is {shown(value)}, expected epoch milliseconds or ISO-8601")



def _type_name(schema: Any) -> str:
    if isinstance(schema, list):
        return " or ".join(_type_name(branch) for branch in schema)
    if isinstance(schema, dict):
        if schema.get("logicalType"):
            return schema["logicalType"]
        if schema.get("type") in ("record", "enum", "fixed"):
            return schema["name"].rsplit(".", 1)[-1]
        if schema.get("type") == "array":
            return f"array of {_type_name(schema['items'])}"
        if schema.get("type") == "map":
            return f"map of {_type_name(schema['values'])}"
        return _type_name(schema["type"])
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
    exec(compile("\n".join(lines) + "\n", f"<record converter {schema.get('name', '')}>", "exec"),  # noqa: S102
         namespace)
    return namespace["record"]


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
        expected = _type_name(schema)

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
        expected = _type_name(schema)

        def array(value, path):
            if not isinstance(value, (list, tuple)):
                raise InvalidEvent("wrong_type", f"{path} is {shown(value)}, expected {expected}")
            return [items(item, f"{path}[{i}]") for i, item in enumerate(value)]
        return array
    if kind == "map":
        values = compile_schema(schema["values"], named, seen)
        expected = _type_name(schema)

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


_FINER_THAN_MILLIS = {"timestamp-micros": 1000, "local-timestamp-micros": 1000,
                      "timestamp-nanos": 1_000_000, "local-timestamp-nanos": 1_000_000}


def _logical_of(field_type: Any) -> str | None:
    branches = field_type if isinstance(field_type, list) else [field_type]
    for branch in branches:
        if isinstance(branch, dict) and branch.get("logicalType"):
            return branch["logicalType"]
    return None


def _timestamp_divisors(writer: dict, reader: dict) -> dict[str, int]:
    """Top-level fields the writer stored in micro- or nanoseconds where the reader wants
    milliseconds (Avro resolution ignores logical types, so the numbers need scaling)."""
    wanted = {f["name"]: _logical_of(f["type"]) for f in reader["fields"]}
    out = {}
    for field in writer["fields"]:
        divisor = _FINER_THAN_MILLIS.get(_logical_of(field["type"]) or "")
        if divisor and (wanted.get(field["name"]) or "").endswith("millis"):
            out[field["name"]] = divisor
    return out


class _Schema:
    """One parsed schema and the derived forms a codec needs."""

    def __init__(self, parsed: dict):
        self.parsed = parsed
        self.plain = plain(parsed)
        self.named = parsed.get("__named_schemas", {})
        self.full_name = full_name(parsed)
        self.convert = compile_schema(parsed, self.named)
        self.aliases = {self.full_name, *(parsed.get("aliases") or [])}


class RecordCodec:
    """Schema-level encoding and decoding of one named schema (no semantic checks).

    ``encode`` writes the Confluent wire format with the id of the registry's latest
    version; ``decode`` reads the wire format of any version with the same record name,
    plain Avro (writer = ``plain_writer_id`` or the latest) and JSON."""

    def __init__(self, registry, name: str, *, plain_writer_id: int | None = None,
                 limits: DecodeLimits | None = None):
        self.registry = registry
        self.name = name
        self.limits = limits or DecodeLimits()
        self.schema_id, parsed = registry.latest(name)
        self.reader = _Schema(parsed)
        self._header = bytes([MAGIC]) + self.schema_id.to_bytes(4, "big")
        self._writers: dict[int, tuple[dict, dict | None, dict[str, int]]] = {}
        self.plain_writer_id = plain_writer_id if plain_writer_id is not None else self.schema_id

    # -- encoding --------------------------------------------------------------------

    def normalize(self, record: dict) -> dict:
        """The record checked against the latest schema, defaults filled, canonical types."""
        return self.reader.convert(record, "")

    def encode_plain(self, record: dict) -> bytes:
        """The Avro body alone (for a consumer configured with a fixed writer schema)."""
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, self.reader.plain, self.normalize(record))
        return buffer.getvalue()

    def encode(self, record: dict) -> bytes:
        """Confluent wire format: magic byte, schema id, Avro body."""
        return self.encode_canonical(self.normalize(record))

    def encode_canonical(self, record: dict) -> bytes:
        """``encode`` of a record that ``normalize`` already returned (skips the checks)."""
        buffer = io.BytesIO()
        buffer.write(self._header)
        try:
            fastavro.schemaless_writer(buffer, self.reader.plain, record)
        except UnicodeEncodeError:
            raise InvalidEvent("bad_text", f"a string of the {self.name} record holds a lone UTF-16 surrogate, "
                                           "which is not text") from None
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidEvent("wrong_type", f"the {self.name} record does not fit its schema "
                                             f"({type(exc).__name__})") from None
        return buffer.getvalue()

    # -- decoding --------------------------------------------------------------------

    def _writer(self, schema_id: int) -> tuple[dict, dict | None, dict[str, int]]:
        """(writer schema, reader schema or None when they are one, {field: divisor} that
        brings the writer's finer timestamps to the reader's milliseconds)."""
        found = self._writers.get(schema_id)
        if found is not None:
            return found
        try:
            parsed = self.registry.by_id(schema_id)
        except KeyError:
            raise InvalidEvent("unknown_schema_id", f"schema id {schema_id} is not registered",
                               schema_id) from None
        if not isinstance(parsed, dict) or parsed.get("type") != "record":
            kind = parsed.get("type") if isinstance(parsed, dict) else parsed
            raise InvalidEvent("wrong_schema", f"schema id {schema_id} is a {_type_name(kind)} schema, "
                                               f"not the record {self.reader.full_name}", schema_id)
        writer = _Schema(parsed)
        if writer.full_name not in self.reader.aliases:
            raise InvalidEvent("wrong_schema", f"schema id {schema_id} is {writer.full_name}, "
                                               f"not {self.reader.full_name}", schema_id)
        found = (writer.plain, None if schema_id == self.schema_id else self.reader.plain,
                 _timestamp_divisors(parsed, self.reader.parsed))
        if len(self._writers) < 1024:
            self._writers[schema_id] = found
        return found

    def _read_avro(self, body: bytes, schema_id: int | None, wire: bool) -> dict:
        writer, reader, divisors = self._writer(schema_id)
        buffer = io.BytesIO(body)
        where = f"schema id {schema_id}" if wire else f"plain Avro (writer schema id {schema_id})"
        try:
            record = fastavro.schemaless_reader(buffer, writer, reader)
        except (EOFError, StopIteration):
            raise InvalidEvent("truncated", f"Avro body of {len(body)} bytes ends early for {where}",
                               schema_id if wire else None) from None
        except fastavro.read.SchemaResolutionError as exc:
            raise InvalidEvent("wrong_schema", f"{where} cannot be read as {self.reader.full_name}: {exc}",
                               schema_id if wire else None) from None
        except Exception as exc:  # noqa: BLE001 - corrupt bytes make fastavro raise anything
            raise InvalidEvent("bad_avro", f"Avro body of {len(body)} bytes does not match {where} "
                                           f"({type(exc).__name__})", schema_id if wire else None) from None
        left = len(body) - buffer.tell()
        if left:
            raise InvalidEvent("bad_avro", f"{left} bytes left after the record: the body does not match {where}",
                               schema_id if wire else None)
        if not isinstance(record, dict):
            raise InvalidEvent("bad_avro", f"{where} is not a record schema", schema_id if wire else None)
        for name, divisor in divisors.items():
            if isinstance(record.get(name), int):
                record[name] //= divisor
        return record

    def _read_json(self, value: bytes) -> dict:
        obj = parse_json(value, self.limits)
        if not isinstance(obj, dict):
            raise InvalidEvent("bad_json", f"JSON message is {shown(obj)}, expected an object")
        return self.normalize(obj)

    def decode_record(self, value: bytes | None) -> tuple[dict, int | None]:
        """(record, writer schema id or None): schema-level decoding only."""
        if not value:
            raise InvalidEvent("empty", "message has no value" if value is None else "message value is empty")
        if len(value) > self.limits.max_message_bytes:
            raise InvalidEvent("too_large", f"message of {len(value)} bytes is above validation.max_message_bytes "
                                            f"({self.limits.max_message_bytes})")
        encoding = detect_encoding(value)
        if encoding is not None:
            raise InvalidEvent("bad_encoding", f"message is JSON in {encoding}; events must be UTF-8 JSON "
                                               "without a byte order mark, or Avro")
        first = value[0]
        if first == MAGIC:
            if len(value) < HEADER:
                raise InvalidEvent("truncated", f"{len(value)} bytes: shorter than the 5-byte Confluent header")
            schema_id = int.from_bytes(value[1:HEADER], "big")
            return self._read_avro(value[HEADER:], schema_id, True), schema_id
        if first in b"{[ \t\r\n":
            return self._read_json(value), None
        return self._read_avro(value, self.plain_writer_id, False), None

    def decode(self, value: bytes | None) -> dict:
        return self.decode_record(value)[0]


class EventCodec(RecordCodec):
    """Gateway events (or feedback events, ``schema="feedback_event"``): decoding with
    schema and semantic validation, encoding with the registered id."""

    def __init__(self, registry, validation=None, *, schema: str = "gateway_event",
                 plain_writer_id: int | None = None):
        if validation is None:
            validation = EventRules()
        super().__init__(registry, schema, plain_writer_id=plain_writer_id, limits=DecodeLimits.of(validation))
        self.validation = validation
        self.regions = frozenset(validation.regions)
        self.max_future_ms = int(validation.max_future_s * 1000)
        self.max_past_ms = int(validation.max_past_s * 1000)
        fields = {f["name"] for f in self.reader.parsed["fields"]}
        self._required_text = [name for name in REQUIRED_TEXT if name in fields]
        self._token_fields = [name for name in COUNTED_TOKEN_FIELDS if name in fields]
        self._fields = fields
        limits = self.limits
        self._string_rules = [(name, limits.max_id_chars, True) for name in ID_FIELDS if name in fields] + \
            [(name, limits.max_name_chars, True) for name in NAME_FIELDS if name in fields] + \
            [(name, limits.max_text_chars, False) for name in TEXT_FIELDS if name in fields]
        self._list_fields = [name for name in LIST_FIELDS if name in fields]
        self._trace_fields = [(name, digits) for name, digits in TRACE_ID_FIELDS if name in fields]

    def clean_strings(self, event: dict) -> dict:
        """Every string field of a canonical event checked against its limit and rule (see
        ``clean_text``), ids and names NFC-normalised in place; the event."""
        for name, max_chars, identifier in self._string_rules:
            value = event.get(name)
            if isinstance(value, str):
                # What clean_text keeps as it is, tested without the call: ASCII holds no
                # surrogate and is its own NFC form.
                if value.isascii() and len(value) <= max_chars and (
                        not identifier or (value.isprintable() and " " not in value)):
                    continue
                event[name] = clean_text(value, name, max_chars, identifier)
        for name in self._list_fields:
            items = event.get(name) or []
            if len(items) > self.limits.max_array_items:
                raise InvalidEvent("too_large", f"{name} has {len(items)} items, above validation.max_array_items "
                                                f"({self.limits.max_array_items})")
            event[name] = [clean_text(item, f"{name}[{i}]", self.limits.max_name_chars, False)
                           for i, item in enumerate(items)]
        for name, digits in self._trace_fields:
            value = event[name]
            if value is not None:
                event[name] = trace_context_id(value, name, digits)
        return event

    def decode(self, value: bytes | None, now_ms: int) -> dict:
        """The canonical event, or InvalidEvent."""
        event, schema_id = self.decode_record(value)
        try:
            self.clean_strings(event)
            self.validate(event, now_ms)
        except InvalidEvent as exc:
            exc.schema_id = schema_id
            raise
        return event

    def validate(self, event: dict, now_ms: int) -> None:
        """Semantic checks beyond the schema (on a canonical event)."""
        for name in self._required_text:
            if not event[name]:
                raise InvalidEvent("missing_field", f"{name} is empty")
        limits = self.validation
        for name in self._token_fields:
            count = event[name]
            if count < 0:
                raise InvalidEvent("out_of_range", f"{name} is {count}; token counts cannot be negative")
            if count > limits.max_tokens:
                raise InvalidEvent("out_of_range", f"{name} is {count}, above validation.max_tokens "
                                                   f"({limits.max_tokens})")
        fields = self._fields
        if "reasoning_tokens" in fields and event["reasoning_tokens"] > event["output_tokens"]:
            raise InvalidEvent("out_of_range", f"reasoning_tokens is {event['reasoning_tokens']}, above "
                                               f"output_tokens ({event['output_tokens']}), which include them")
        if "latency_ms" in fields:
            self._bounded(event, "latency_ms", 0, limits.max_latency_ms, "validation.max_latency_ms")
        if "time_to_first_token_ms" in fields and event["time_to_first_token_ms"] is not None:
            self._bounded(event, "time_to_first_token_ms", 0, limits.max_latency_ms, "validation.max_latency_ms")
        if "status_code" in fields:
            status = event["status_code"]
            if status != 0 and not 100 <= status <= 599:
                raise InvalidEvent("out_of_range", f"status_code is {status}; expected 100-599, or 0 for no response")
        if "schema_version" in fields and event["schema_version"] < 1:
            raise InvalidEvent("out_of_range", f"schema_version is {event['schema_version']}; versions start at 1")
        if "region" in fields and event["region"] not in self.regions:
            raise InvalidEvent("unknown_region", f"region {shown(event['region'])} is not one of the configured "
                                                 f"regions ({', '.join(sorted(self.regions))})")
        if "event_time" in fields:
            at = event["event_time"]
            if at > now_ms + self.max_future_ms:
                raise InvalidEvent("future_timestamp", f"event_time is {(at - now_ms) / 1000:.0f}s in the future; "
                                                       f"at most {self.max_future_ms / 1000:g}s is accepted "
                                                       "(validation.max_future_s)")
            if at < now_ms - self.max_past_ms:
                raise InvalidEvent("past_timestamp", f"event_time is {(now_ms - at) / 1000:.0f}s in the past; "
                                                     f"at most {self.max_past_ms / 1000:g}s is accepted "
                                                     "(validation.max_past_s)")

    @staticmethod
    def _bounded(event: dict, name: str, low: int, high: int, setting: str) -> None:
        value = event[name]
        if value < low:
            raise InvalidEvent("out_of_range", f"{name} is {value}; it cannot be negative")
        if value > high:
            raise InvalidEvent("out_of_range", f"{name} is {value}, above {setting} ({high})")

    def check(self, event: dict, now_ms: int) -> dict:
        """What a producer does before sending: normalize, then validate; the canonical event."""
        normalized = self.clean_strings(self.normalize(event))
        self.validate(normalized, now_ms)
        return normalized


# -- the pipeline's own records: local ids, shipped schemas ------------------------------

@functools.cache
def record_codec(name: str) -> RecordCodec:
    """Codec of one of the pipeline's own record schemas, with the shipped local ids.

    Pipeline-produced records (DLQ, billing events, quota updates and alerts) always use
    the local ids, also when a Confluent registry serves the gateway events: the pipeline
    owns these schemas and `gatewatch schemas check` gates their evolution."""
    return RecordCodec(default_local_registry(), name)


def encode_billing_event(record: dict) -> bytes:
    return record_codec("billing_event").encode(record)


def decode_billing_event(value: bytes) -> dict:
    return record_codec("billing_event").decode(value)


def encode_quota_alert(record: dict) -> bytes:
    return record_codec("quota_alert").encode(record)


def decode_quota_alert(value: bytes) -> dict:
    return record_codec("quota_alert").decode(value)


def quota_update(total: dict) -> dict:
    """A window total of the flow (org_id, user_id, model, window_start_ms, window_length_ms,
    n, input, output, cache_read, cache_write) as a QuotaUpdate record."""
    return {
        "update_id": f"{window_id(total)}#{total['n']}",
        "org_id": total["org_id"], "user_id": total["user_id"], "model": total["model"],
        "window_start_ms": total["window_start_ms"], "window_length_ms": total["window_length_ms"],
        "events": total["n"],
        **{f"{kind}_tokens": total[kind] for kind in TOKEN_KINDS},
    }


def encode_quota_update(total: dict) -> bytes:
    """Accepts a flow window total or a QuotaUpdate record."""
    try:
        record = total if "update_id" in total else quota_update(total)
    except KeyError as exc:
        raise InvalidEvent("missing_field", f"the window total has no {shown(exc.args[0])}") from None
    return record_codec("quota_update").encode(record)


def decode_quota_update(value: bytes) -> dict:
    return record_codec("quota_update").decode(value)
