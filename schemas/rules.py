"""What a message may hold before it is an event: input limits, strict JSON, text and id
rules, timestamps; every failure is an ``InvalidEvent``.

Input limits (``DecodeLimits``, from ``validation.*`` settings) apply before and while
parsing: message size, JSON depth, digits of a JSON number, array items, and per-field
string limits (ids, names, free text). Text must be UTF-8 without a BOM: UTF-16/32 and
BOM-prefixed JSON are named in the reason (code ``bad_encoding``); lone surrogates
(``\\ud800`` escapes) are rejected (``bad_text``). Ids and names are NFC-normalised and
must be printable without whitespace or format characters (``bad_id``).

``InvalidEvent`` carries a short ``code``, a ``reason`` naming the field and the rule, and
the writer ``schema_id`` when there was one. Reasons never quote string values (they may
be prompts, responses or other PII); numbers and type names only (``shown``).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Callable

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
    # A Confluent header (NUL, then the schema id) is the common case: of the encodings
    # below only the UTF-32-BE BOM (NUL NUL FE FF), UTF-32-BE (JSON's opener at byte 3) and
    # UTF-16-BE (JSON's opener at byte 1) start with a NUL, and each needs one of these bytes.
    if len(value) >= 4 and value[0] == 0 and value[1] not in _JSON_OPENERS and value[2] != 0xFE \
            and value[3] not in _JSON_OPENERS:  # indexed, not sliced: ~0.2 µs of every event's decode
        return None
    return _detect_encoding_by_rules(value)


def _detect_encoding_by_rules(value: bytes) -> str | None:
    """detect_encoding without its shortcut for a Confluent header."""
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
