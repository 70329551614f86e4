"""Decode and encode events: ``RecordCodec`` for any registered record schema, and
``EventCodec`` for gateway and feedback events with their semantic checks.

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
schema present, timestamps as int epoch milliseconds (logical types are stripped before
reading). Avro bodies are read by a reader generated per (writer, reader) pair
(``schemas.avro_reader``); fastavro reads what it declines and names every error.

The string rules and the semantic rules each start with one generated test that nothing
is to change or refuse (the common case); only when it fails are the rules applied one by
one, which find the rule and word the reason. Where the C reader reads a body of a writer
with every string field, it makes the string test itself while the bytes are at hand
(``string_checks``), and a record that passes skips ``clean_strings``.

Input limits and field rules (``schemas.rules``) apply before and while parsing; the
schema compiler (``schemas.compiler``) checks and converts JSON. Every failure raises
``InvalidEvent`` with a short ``code``, a ``reason`` that never quotes string values, and
the writer ``schema_id`` when there was one. The pipeline's own records (billing, quota,
alerts) have their codecs in ``schemas.records``.
"""

from __future__ import annotations

import io
import struct
from typing import Any, Callable

import fastavro

from schemas import avro_encoder
from schemas.avro_reader import CHECK_HEX_ID, CHECK_IDENTIFIER, CHECK_TEXT, CHECK_TEXT_LIST, Unsupported, compile_reader
from schemas.compiler import compile_schema, plain, type_name, zero_byte_array
from schemas.registry import full_name
from schemas.stored_ranges import stored_ranges
from schemas.rules import (
    ID_FIELDS,
    LIST_FIELDS,
    NAME_FIELDS,
    REQUIRED_TEXT,
    TEXT_FIELDS,
    TRACE_ID_FIELDS,
    DecodeLimits,
    EventRules,
    InvalidEvent,
    clean_text,
    detect_encoding,
    parse_json,
    shown,
    trace_context_id,
)
from schemas.vocabulary import COUNTED_TOKEN_FIELDS

# What a caller of the codec handles besides the codecs: the error they raise, the rules
# and limits they take, the schema form a plain-Avro reader needs.
__all__ = ["HEADER", "MAGIC", "DecodeLimits", "EventCodec", "EventRules", "InvalidEvent", "RecordCodec", "plain"]

MAGIC = 0
HEADER = 5
_SCHEMA_ID = struct.Struct(">I").unpack_from
"""The header's big-endian schema id, read in place (a slice and int.from_bytes cost twice)."""


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
        self._writers: dict[int, tuple[dict, dict | None, dict[str, int], Any, Any]] = {}
        self.string_checks: dict[str, tuple[int, int, int]] = {}
        """Checks the C reader applies while reading (avro_reader.compile_reader), for a codec
        with string rules: a record that passes them is one the rules would not change."""
        self.plain_writer_id = plain_writer_id if plain_writer_id is not None else self.schema_id
        self._write: Callable[[dict], bytes] | None = None
        self._write_compiled = False

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
        write = self.writer()
        try:
            if write is not None:
                return write(record)
            buffer = io.BytesIO()
            buffer.write(self._header)
            fastavro.schemaless_writer(buffer, self.reader.plain, record)
            return buffer.getvalue()
        except UnicodeEncodeError:
            raise InvalidEvent("bad_text", f"a string of the {self.name} record holds a lone UTF-16 surrogate, "
                                           "which is not text") from None
        except (ValueError, TypeError, OverflowError, KeyError, AttributeError, struct.error) as exc:
            raise InvalidEvent("wrong_type", f"the {self.name} record does not fit its schema "
                                             f"({type(exc).__name__})") from None

    def writer(self) -> Callable[[dict], bytes] | None:
        """The generated writer of the latest schema, header first (schemas.avro_encoder: about
        1 µs for a billing event against fastavro's 10), or None where fastavro writes it."""
        if not self._write_compiled:
            try:
                self._write = avro_encoder.compile_writer(self.reader.plain, self._header)
            except avro_encoder.Unsupported:
                self._write = None
            self._write_compiled = True
        return self._write

    # -- decoding --------------------------------------------------------------------

    def _writer(self, schema_id: int) -> tuple[dict, dict | None, dict[str, int], Any, Any]:
        """(writer schema, reader schema or None when they are one, {field: divisor} that
        brings the writer's finer timestamps to the reader's milliseconds, the generated
        reader of the pair or None where only fastavro reads it)."""
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
            raise InvalidEvent("wrong_schema", f"schema id {schema_id} is a {type_name(kind)} schema, "
                                               f"not the record {self.reader.full_name}", schema_id)
        writer = _Schema(parsed)
        if writer.full_name not in self.reader.aliases:
            raise InvalidEvent("wrong_schema", f"schema id {schema_id} is {writer.full_name}, "
                                               f"not {self.reader.full_name}", schema_id)
        stalling = zero_byte_array(writer.plain, writer.named)
        if stalling is not None:
            raise InvalidEvent("wrong_schema", f"schema id {schema_id} has an array of items written as no bytes "
                                               f"({stalling}): a count alone could stall the decoder", schema_id)
        reader = None if schema_id == self.schema_id else self.reader.plain
        try:
            fast = compile_reader(writer.plain, reader, self.string_checks)
        except Unsupported:
            fast = None
        # Only where the writer writes every checked field: a default is not checked.
        written = {field["name"] for field in writer.plain["fields"]}
        checked = None
        if self.string_checks and written.issuperset(self.string_checks):
            checked = getattr(fast, "read_checked", None)
        found = (writer.plain, reader, _timestamp_divisors(parsed, self.reader.parsed), fast, checked)
        if len(self._writers) < 1024:
            self._writers[schema_id] = found
        return found

    def _read_avro(self, value: bytes, start: int, schema_id: int | None, wire: bool) -> tuple[dict, bool]:
        """(record of the Avro body that starts at ``start`` of ``value``, whether it passed
        string_checks while it was read)."""
        writer, reader, divisors, fast, checked = self._writer(schema_id)
        record, passed = None, False
        if fast is not None:
            try:
                if checked is not None:
                    record, end, passed = checked(value, start)
                else:
                    record, end = fast(value, start)
            except Exception:  # noqa: BLE001 - fastavro reads it again and names the problem
                record = None
            else:
                if end != len(value):
                    record, passed = None, False
        if record is None:
            record = self._read_fastavro(value[start:], schema_id, wire, writer, reader)
        for name, divisor in divisors.items():
            if isinstance(record.get(name), int):
                record[name] //= divisor
        return record, passed

    def _read_fastavro(self, body: bytes, schema_id: int | None, wire: bool, writer: dict,
                       reader: dict | None) -> dict:
        """The record fastavro reads, or the InvalidEvent that says why it cannot."""
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
        return record

    def _read_json(self, value: bytes) -> dict:
        obj = parse_json(value, self.limits)
        if not isinstance(obj, dict):
            raise InvalidEvent("bad_json", f"JSON message is {shown(obj)}, expected an object")
        return self.normalize(obj)

    def decode_record(self, value: bytes | None) -> tuple[dict, int | None]:
        """(record, writer schema id or None): schema-level decoding only."""
        record, schema_id, _passed = self._decode_checked(value)
        return record, schema_id

    def _decode_checked(self, value: bytes | None) -> tuple[dict, int | None, bool]:
        """decode_record's answer and whether the record passed string_checks as it was read."""
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
            schema_id = _SCHEMA_ID(value, 1)[0]
            record, passed = self._read_avro(value, HEADER, schema_id, True)
            return record, schema_id, passed
        if first in b"{[ \t\r\n":
            return self._read_json(value), None, False
        record, passed = self._read_avro(value, 0, self.plain_writer_id, False)
        return record, None, passed

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
        # For the one-pass test of clean_strings: every id and name field, and the
        # smallest limit among them.
        self._identifiers = tuple(name for name, _limit, identifier in self._string_rules if identifier)
        self._identifier_chars = min((limit for _name, limit, identifier in self._string_rules if identifier),
                                     default=0)
        self._texts = [(name, limit) for name, limit, identifier in self._string_rules if not identifier]
        self._trace_fields = [(name, digits) for name, digits in TRACE_ID_FIELDS if name in fields]
        self._stored = stored_ranges(schema, fields)
        self._nullable = {f["name"] for f in self.reader.plain["fields"]
                          if isinstance(f["type"], list) and "null" in f["type"]}
        self._passes = self._compile_passes()
        self._strings_plain = self._compile_strings_plain()
        # A record whose strings pass these while the C reader reads it is one clean_strings
        # would return unchanged (each check is that field's rule where nothing is to change).
        self.string_checks = {name: (CHECK_IDENTIFIER if identifier else CHECK_TEXT, limit, 0)
                              for name, limit, identifier in self._string_rules}
        self.string_checks.update({name: (CHECK_TEXT_LIST, limits.max_array_items, limits.max_name_chars)
                                   for name in self._list_fields})
        self.string_checks.update({name: (CHECK_HEX_ID, digits, 0) for name, digits in self._trace_fields})

    def clean_strings(self, event: dict) -> dict:
        """Every string field of a canonical event checked against its limit and rule (see
        ``clean_text``), ids and names NFC-normalised in place; the event."""
        try:
            if self._strings_plain(event):
                return event
        except Exception:  # noqa: BLE001 - the rules one by one raise what they raise
            pass
        return self._clean_strings_one_by_one(event)

    def _compile_strings_plain(self):
        """A generated test that every string field is what the rules keep as it is, so
        that ``clean_strings`` has nothing to change or refuse: ids and names ASCII,
        printable and without spaces (tested on them joined, as each property holds for a
        string when it holds for each character; ASCII is its own NFC form), texts ASCII
        (no surrogate), every string within its limit, trace ids lower-case hex, not zero."""
        limits = self.limits
        getters = ", ".join(f"get({name!r})" for name in self._identifiers)
        lines = ["def plain(event):", "    get = event.get",
                 f"    strings = list(filter(None, ({getters},)))",
                 "    joined = ''.join(strings)",
                 "    if not (joined.isascii() and joined.isprintable() and ' ' not in joined",
                 "            and (not strings or max(map(len, strings)) <= ID_CHARS)):",
                 "        return False"]
        namespace = {"HEX": frozenset("0123456789abcdef"), "ID_CHARS": self._identifier_chars,
                     "MAX_ITEMS": limits.max_array_items, "NAME_CHARS": limits.max_name_chars}
        for index, (name, max_chars) in enumerate(self._texts):
            namespace[f"TEXT_CHARS{index}"] = max_chars
            lines += [f"    text = get({name!r})",
                      f"    if text is not None and not (text.isascii() and len(text) <= TEXT_CHARS{index}):",
                      "        return False"]
        for name in self._list_fields:
            lines += [f"    items = get({name!r})",
                      "    if type(items) is not list or len(items) > MAX_ITEMS:",
                      "        return False",
                      "    if items and not (''.join(items).isascii() and "
                      "max(map(len, items)) <= NAME_CHARS):",
                      "        return False"]
        for name, digits in self._trace_fields:
            lines += [f"    text = event[{name!r}]",
                      f"    if text is not None and not (len(text) == {digits} and HEX.issuperset(text) "
                      f"and text.count('0') != {digits}):",
                      "        return False"]
        lines.append("    return True")
        exec(compile("\n".join(lines) + "\n", f"<string rules of {self.name}>", "exec"), namespace)  # noqa: S102
        return namespace["plain"]

    def _clean_strings_one_by_one(self, event: dict) -> dict:
        for name, max_chars, identifier in self._string_rules:
            value = event.get(name)
            if isinstance(value, str):
                if value.isascii() and len(value) <= max_chars and (
                        not identifier or (value.isprintable() and " " not in value)):
                    continue
                event[name] = clean_text(value, name, max_chars, identifier)
        for name in self._list_fields:
            event[name] = self._cleaned_list(name, event.get(name))
        self._clean_trace_ids(event)
        return event

    def _cleaned_list(self, name: str, items: list | None) -> list:
        items = items or []
        if len(items) > self.limits.max_array_items:
            raise InvalidEvent("too_large", f"{name} has {len(items)} items, above validation.max_array_items "
                                            f"({self.limits.max_array_items})")
        return [clean_text(item, f"{name}[{i}]", self.limits.max_name_chars, False) for i, item in enumerate(items)]

    def _clean_trace_ids(self, event: dict) -> None:
        for name, digits in self._trace_fields:
            value = event[name]
            if value is not None:
                event[name] = trace_context_id(value, name, digits)

    def decode(self, value: bytes | None, now_ms: int) -> dict:
        """The canonical event, or InvalidEvent."""
        event, schema_id, passed = self._decode_checked(value)
        try:
            if not passed:
                self.clean_strings(event)
            self.validate(event, now_ms)
        except InvalidEvent as exc:
            exc.schema_id = schema_id
            raise
        return event

    def validate(self, event: dict, now_ms: int) -> None:
        """Semantic checks beyond the schema (on a canonical event)."""
        try:
            if self._passes(event, now_ms):
                return
        except Exception:  # noqa: BLE001 - the rules one by one raise what they raise
            pass
        self._validate_one_by_one(event, now_ms)

    def _compile_passes(self):
        """One generated expression that is true only when no rule of ``validate`` fails:
        the common case costs a few comparisons; when it is false, ``_validate_one_by_one``
        finds the rule and says why (so reasons and their order stay in one place)."""
        limits, fields = self.validation, self._fields
        terms = [f"event[{name!r}]" for name in self._required_text]
        terms += [f"0 <= event[{name!r}] <= MAX_TOKENS" for name in self._token_fields]
        if "reasoning_tokens" in fields:
            terms.append("event['reasoning_tokens'] <= event['output_tokens']")
        if "latency_ms" in fields:
            terms.append("0 <= event['latency_ms'] <= MAX_LATENCY")
        if "time_to_first_token_ms" in fields:
            terms.append("(event['time_to_first_token_ms'] is None or "
                         "0 <= event['time_to_first_token_ms'] <= MAX_LATENCY)")
        if "status_code" in fields:
            terms.append("(100 <= event['status_code'] <= 599 or event['status_code'] == 0)")
        if "schema_version" in fields:
            terms.append("event['schema_version'] >= 1")
        if "region" in fields:
            terms.append("event['region'] in REGIONS")
        if "event_time" in fields:
            terms.append("now_ms - MAX_PAST <= event['event_time'] <= now_ms + MAX_FUTURE")
        terms += self._stored_range_terms()
        source = "def passes(event, now_ms):\n    return bool(" + "\n                and ".join(terms or ["True"]) + ")\n"
        namespace = {"REGIONS": self.regions, "MAX_TOKENS": limits.max_tokens, "MAX_LATENCY": limits.max_latency_ms,
                     "MAX_PAST": self.max_past_ms, "MAX_FUTURE": self.max_future_ms}
        exec(compile(source, f"<rules of {self.name}>", "exec"), namespace)  # noqa: S102
        return namespace["passes"]

    def _stored_range_terms(self) -> list[str]:
        """Terms of ``passes`` that keep each integer field within what its stores hold,
        only where the rules above do not already keep it narrower."""
        limits = self.validation
        rule_bounds = {name: (0, limits.max_tokens) for name in self._token_fields}
        rule_bounds.update(latency_ms=(0, limits.max_latency_ms), time_to_first_token_ms=(0, limits.max_latency_ms),
                           status_code=(0, 599))
        terms = []
        for name, (low, high, _stores) in self._stored.items():
            rule_low, rule_high = rule_bounds.get(name, (low - 1, high + 1))
            if low <= rule_low and rule_high <= high:
                continue
            term = f"{low} <= event[{name!r}] <= {high}"
            terms.append(f"(event[{name!r}] is None or {term})" if name in self._nullable else term)
        return terms

    def _validate_one_by_one(self, event: dict, now_ms: int) -> None:
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
        for name, (low, high, stores) in self._stored.items():
            value = event[name]
            if value is not None and not low <= value <= high:
                raise InvalidEvent("out_of_range", f"{name} is {value}, outside {low}..{high}, what {stores} "
                                                   "holds (it would be stored wrong)")
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
