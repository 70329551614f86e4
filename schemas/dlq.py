"""Dead-letter records: what failed, where, why, and (redacted) what it was.

``dlq_record`` builds the record a flow step emits; ``redact_original`` redacts and bounds
its original bytes; ``encode_dlq`` writes it in the Confluent wire format (schema
``dlq_record``, local id) and never fails on a field that does not fit its type;
``decode_dlq`` reads any version.

The original bytes are raw input and may hold PII. A record leaves the pipeline with its
``original`` either redacted (``payload_redacted=True``) or withheld (``original=None``,
``text_withheld=True``): ``encode_dlq`` withholds an original that was not marked as
redacted instead of writing it in clear (pass ``allow_clear_original=True`` only for a DLQ
topic that is itself encrypted or access-controlled for raw data).
"""

from __future__ import annotations

import hashlib
import re
import time
from bisect import bisect_right
from itertools import accumulate
from typing import Callable, Iterable

from schemas.compiler import INT_RANGE, LONG_RANGE
from schemas.records import record_codec

MAX_REASON = 2000
# Ids and names in a DLQ record are capped: a record that carries a 600,000-character
# user id must still fit a Kafka message.
MAX_ID_CHARS = 256
DEFAULT_MAX_ORIGINAL_BYTES = 64 * 1024
REDACTION_MARGIN = 4096
_STRING_FIELDS = ("dlq_id", "stage", "code", "topic", "event_id", "request_id", "original_encoding",
                  "original_sha256")
_INT_FIELDS = {"partition": INT_RANGE, "attempts": INT_RANGE, "offset": LONG_RANGE, "original_size": LONG_RANGE,
               "writer_schema_id": LONG_RANGE, "first_seen_ms": LONG_RANGE}
_SURROGATES = re.compile("[\ud800-\udfff]")
# (text of a span found in a view) -> spans (start, end, entity type) of PII in it
FindSpans = Callable[[str], Iterable[tuple[int, int, str]]]


def dlq_id(stage: str, topic: str | None, partition: int | None, offset: int | None,
           event_id: str | None) -> str:
    """Deterministic: the same failure of the same message always gets the same id."""
    if offset is not None:
        return f"{stage}:{topic or ''}:{partition if partition is not None else ''}:{offset}"
    return f"{stage}:event:{event_id or ''}"


def dlq_record(*, stage: str, code: str, reason: str, original: bytes | None, topic: str | None,
               partition: int | None, offset: int | None, schema_id: int | None = None, first_seen_ms: int,
               attempts: int = 1, event_id: str | None = None, request_id: str | None = None) -> dict:
    """A DLQ record (a plain dict matching the latest schemas/avro/dlq_record.v*.avsc).

    ``original`` is the raw message value; it is stored only once redacted (see module doc)."""
    if reason is None:
        reason = ""
    if len(reason) > MAX_REASON:
        reason = reason[:MAX_REASON - 1] + "…"
    return {
        "dlq_id": dlq_id(stage, topic, partition, offset, event_id),
        "stage": stage,
        "code": code,
        "reason": reason,
        "original": bytes(original) if original is not None else None,
        "original_size": len(original) if original is not None else None,
        "original_sha256": None,
        "original_truncated": False,
        "original_encoding": None,
        "payload_redacted": False,
        "text_withheld": False,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "schema_id": schema_id if schema_id is not None and INT_RANGE[0] <= schema_id <= INT_RANGE[1] else None,
        "writer_schema_id": schema_id,
        "event_id": event_id,
        "request_id": request_id,
        "first_seen_ms": int(first_seen_ms),
        "attempts": attempts,
    }


def message_dlq_record(message, *, stage: str, code: str, reason: str, first_seen_ms: int,
                       schema_id: int | None = None) -> dict:
    """The DLQ record of a Kafka message that could not be used: its raw value (redacted
    before it is stored) and where it was read (``message``: topic, partition, offset, value)."""
    return dlq_record(stage=stage, code=code, reason=reason, original=message.value, topic=message.topic,
                      partition=message.partition, offset=message.offset, schema_id=schema_id,
                      first_seen_ms=first_seen_ms)


def event_dlq_record(event: dict, *, stage: str, code: str, reason: str, original: bytes | None = None,
                     event_id: str | None = None, first_seen_ms: int | None = None) -> dict:
    """The DLQ record of an event that was decoded: named by its event id (or ``event_id``,
    e.g. a billing id), request id and source partition/offset."""
    return dlq_record(
        stage=stage, code=code, reason=reason, original=original, topic=None,
        partition=event.get("source_partition"), offset=event.get("source_offset"),
        first_seen_ms=first_seen_ms if first_seen_ms is not None else int(time.time() * 1000),
        event_id=event_id if event_id is not None else event.get("event_id"), request_id=event.get("request_id"))


# -- redaction of the original, whatever its encoding ------------------------------------

_BOM_CODECS = ((b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\xef\xbb\xbf", "utf-8"),
               (b"\xfe\xff", "utf-16-be"), (b"\xff\xfe", "utf-16-le"))
_UNIT = {"utf-8": 1, "utf-16-le": 2, "utf-16-be": 2, "utf-32-le": 4, "utf-32-be": 4}


def text_encoding(data: bytes) -> tuple[str, int]:
    """(codec, BOM length) of the text the bytes most likely hold; binary data is 'utf-8'
    (decoded leniently, so the text between binary bytes is still seen)."""
    for bom, codec in _BOM_CODECS:
        if data.startswith(bom):
            return codec, len(bom)
    sample = data[:4096]
    if len(sample) >= 4:
        # Mostly-ASCII text in UTF-16/32 has a NUL in the same place of (nearly) every unit.
        zeros = [sample[k::4].count(0) / len(sample[k::4]) for k in range(4)]
        if zeros[1] > .6 and zeros[2] > .6 and zeros[3] > .6 and zeros[0] < .4:
            return "utf-32-le", 0
        if zeros[0] > .6 and zeros[1] > .6 and zeros[2] > .6 and zeros[3] < .4:
            return "utf-32-be", 0
        even, odd = sample[0::2].count(0) / len(sample[0::2]), sample[1::2].count(0) / len(sample[1::2])
        if odd > .6 and even < .4:
            return "utf-16-le", 0
        if even > .6 and odd < .4:
            return "utf-16-be", 0
    return "utf-8", 0


def _decoded_view(data: bytes, codec: str, skip: int) -> tuple[str, Callable[[int], int] | None, int]:
    """(text for the redactor, the byte offset of its character i or None when it is
    skip + unit * i, width of one unit) of data[skip:]."""
    unit = _UNIT[codec]
    body = data[skip:len(data) - (len(data) - skip) % unit]
    # One character per undecodable unit, so offsets stay computable: an escaped byte
    # (UTF-8), a lone surrogate (UTF-16) or U+FFFD for a code point beyond Unicode (UTF-32).
    errors = {1: "surrogateescape", 2: "surrogatepass", 4: "replace"}[unit]
    text = body.decode(codec, errors)
    # The redactor sees an undecodable byte or lone surrogate as U+FFFD: one character each,
    # so the offsets still line up.
    shown = _SURROGATES.sub("\ufffd", text)
    if unit == 4 or (unit == 1 and text.isascii()) or (unit == 2 and all(ord(c) < 0x10000 for c in text)):
        return shown, None, unit
    # Asked only at the few span boundaries: the characters before one, encoded back.
    return shown, lambda index: skip + len(text[:index].encode(codec, errors)), unit


def _is_text_byte(byte: int) -> bool:
    return byte >= 0x20 and byte != 0x7F or byte in (9, 10, 13)


def avro_length_bytes_python(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges that look like the length prefix of an Avro string glued to its text.

    An Avro string is its zig-zag length then its UTF-8 bytes; the length byte often is a
    printable character ('&' for 19, 'b' for 49) that hides the value from a pattern. A
    prefix counts when the text after it is all text bytes and ends exactly where a
    non-text byte or another such string starts (found right to left), or where the data
    ends."""
    size = len(data)
    text_end = [size] * (size + 1)
    for at in range(size - 1, -1, -1):
        text_end[at] = text_end[at + 1] if _is_text_byte(data[at]) else at
    ends = bytearray(size + 1)
    ends[size] = 1
    for at in range(size):
        if not _is_text_byte(data[at]):
            ends[at] = 1
    found = []
    for at in range(size - 1, -1, -1):
        value, shift, width = 0, 0, 0
        while at + width < size and width < 3:
            byte = data[at + width]
            value |= (byte & 0x7F) << shift
            shift += 7
            width += 1
            if not byte & 0x80:
                break
        else:
            continue
        if value & 1 or value < 12:  # negative lengths, or strings too short to be PII
            continue
        start, end = at + width, at + width + (value >> 1)
        # A string cut by the end of the data counts only after a non-text byte (a union
        # index, say): otherwise every byte near the end would look like a length.
        cut_short = end >= size and text_end[start] == size and (at == 0 or not _is_text_byte(data[at - 1]))
        if start < size and (cut_short or end < size and ends[end] and text_end[start] >= end):
            ends[at] = 1
            found.append((at, start))
    return found


try:  # the same answer in C, where schemas/_avro_native.c is built: ~2 ms per 3 KB record in Python
    from schemas._avro_native import avro_length_bytes
except ImportError:
    avro_length_bytes = avro_length_bytes_python


def _nul_stripped_spans(data: bytes, find_spans: FindSpans) -> list[tuple[int, int, str]]:
    """Spans of PII found with every NUL byte removed: ASCII text in UTF-16/32 embedded in
    other bytes (no BOM, not at the start) reads as plain text then. A span runs from its
    first character's byte to its last's; ``_WholeUnits`` adds their NULs."""
    if data.count(0) < 4:
        return []
    runs = [(run.start(), run.end()) for run in _NUL_FREE_RUN.finditer(data)]
    run_starts = list(accumulate((end - start for start, end in runs), initial=0))[:-1]

    def kept(index: int) -> int:
        """The position in data of the stripped text's byte at index."""
        run = bisect_right(run_starts, index) - 1
        return runs[run][0] + index - run_starts[run]

    return [(kept(start), kept(end - 1) + 1, kind)
            for start, end, kind in find_spans(data.replace(b"\x00", b"").decode("latin-1")) if start < end]


class _WholeUnits:
    """Spans of ASCII text in UTF-16/32 set to whole code units (``span``), for one original:
    the byte order of each run of such text is found once and kept for the next span in it."""

    def __init__(self, data: bytes, codec: str):
        self.data = data
        self.codec = codec
        self._reversed: bytes | None = None
        self._runs: list[tuple[int, int, int, bool]] = []
        """(first text byte, last text byte, NULs between characters, big-endian) of each run seen."""

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The span with the NULs of its first and last character, which come before each
        character in big-endian text and after it in little-endian, never a NUL of the
        character next to it. Spans without NULs between characters are returned as they are."""
        data = self.data
        first = start + _nuls_at(data, start, 1, end - start)
        last = end - 1 - _nuls_at(data, end - 1, -1, end - start)
        if first >= last:
            return start, end
        # NULs between two characters of the span: 1 in UTF-16, 3 in UTF-32, 0 in plain text.
        gap = _nuls_at(data, first + 1, 1, 3)
        if not gap:
            return start, end
        if self._big_endian(first, last, gap):
            return first - _nuls_at(data, first - 1, -1, gap), last + 1
        return first, last + 1 + _nuls_at(data, last + 1, 1, gap)

    def _big_endian(self, first: int, last: int, gap: int) -> bool:
        """Whether the run of text holding data[first..last] has each character's NULs before
        it. Told by the run's ends: the NULs before its first character and after its last
        belong to it on one side only. Where both ends look alike (NUL bytes of the data
        around the text), the detected codec decides; little-endian when it has no byte order."""
        for run_first, run_last, run_gap, big_endian in self._runs:
            if run_gap == gap and run_first <= first and last <= run_last:
                return big_endian
        data, run = self.data, _INTERLEAVED[gap]
        if self._reversed is None:
            self._reversed = data[::-1]
        run_first = len(data) - run.match(self._reversed, len(data) - 1 - first).end()
        run_last = run.match(data, last).end() - 1
        leading = _nuls_at(data, run_first - 1, -1, gap) == gap
        trailing = _nuls_at(data, run_last + 1, 1, gap) == gap
        big_endian = leading if leading != trailing else self.codec.endswith("-be")
        self._runs.append((run_first, run_last, gap, big_endian))
        return big_endian


_INTERLEAVED = {gap: re.compile(rb"[^\x00](?:\x00{%d}[^\x00])*" % gap) for gap in (1, 2, 3)}
"""Text bytes each ``gap`` NULs apart (the same read backwards): ASCII text in UTF-16/32."""


def _nuls_at(data: bytes, at: int, step: int, most: int) -> int:
    """How many NUL bytes (at most ``most``) run from data[at] on, forwards (step 1) or backwards (-1)."""
    count = 0
    while count < most and 0 <= at < len(data) and data[at] == 0:
        count += 1
        at += step
    return count


def _mask(kind: str, region: bytes, codec: str) -> bytes:
    """The mask of a span, in the encoding of the text it replaces: UTF-16/32 of either byte
    order when the span is ASCII text in whole code units of one (an embedded UTF-16 string
    inside binary data, or one the detected codec got wrong), else the detected codec."""
    for width in (2, 4):
        if region and len(region) % width == 0 and region.count(0) == len(region) // width * (width - 1):
            if not region[width - 1::width].count(0):
                return f"<{kind}>".encode(f"utf-{8 * width}-be")
            if not region[0::width].count(0):
                return f"<{kind}>".encode(f"utf-{8 * width}-le")
    return f"<{kind}>".encode(codec)


_NUL_FREE_RUN = re.compile(rb"[^\x00]+")


def _merge(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    merged: list[tuple[int, int, str]] = []
    for start, end, kind in sorted(spans):
        if merged and start <= merged[-1][1]:
            last = merged[-1]
            merged[-1] = (last[0], max(last[1], end), last[2])
        else:
            merged.append((start, end, kind))
    return merged


def redact_original(data: bytes, find_spans: FindSpans, keep: int | None = None) -> tuple[bytes, str]:
    """(the bytes with every PII span masked, encoding name) - masked wherever any of three
    views finds one: the text decoded in its detected encoding, the raw bytes as latin-1,
    and the raw bytes with Avro length prefixes separated from their text.

    With ``keep``, only data[:keep] is returned (a span crossing it masked whole): the
    bytes after it were read only so that a value cut at ``keep`` is still recognised."""
    codec, skip = text_encoding(data)
    spans: list[tuple[int, int, str]] = []
    text, offsets, unit = _decoded_view(data, codec, skip)
    for start, end, kind in find_spans(text):
        if offsets is None:
            spans.append((skip + start * unit, skip + end * unit, kind))
        else:
            spans.append((offsets(start), offsets(end), kind))
    raw = data.decode("latin-1")
    spans += list(find_spans(raw))
    spans += _nul_stripped_spans(data, find_spans)
    whole_units = _WholeUnits(data, codec)
    spans = [(*whole_units.span(start, end), kind) for start, end, kind in spans]
    prefixes = avro_length_bytes(data)
    if prefixes:
        separated = bytearray(data)
        for start, end in prefixes:
            separated[start:end] = b" " * (end - start)
        spans += list(find_spans(separated.decode("latin-1")))
    keep = len(data) if keep is None else min(keep, len(data))
    out, at = bytearray(), 0
    for start, end, kind in _merge(spans):
        if start >= keep:
            break
        out += data[at:start]
        out += _mask(kind, data[start:end], codec)
        at = end
    out += data[at:keep]
    encoding = codec if skip or codec != "utf-8" or _valid_utf8(data) else "binary"
    return bytes(out), encoding


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def bounded_original(record: dict, payload: bytes, encoding: str, max_bytes: int, *, cut_before: bool = False) -> dict:
    """The record holding a payload that is safe to store (redacted, or data already
    cleared for storage), hashed, then cut to max_bytes."""
    return {**record, "original": payload[:max_bytes], "payload_redacted": True,
            "original_truncated": cut_before or len(payload) > max_bytes, "original_encoding": encoding,
            "original_sha256": hashlib.sha256(payload).hexdigest(),
            "original_size": record.get("original_size") or len(payload)}


def with_redacted_original(record: dict, find_spans: FindSpans, max_bytes: int = DEFAULT_MAX_ORIGINAL_BYTES) -> dict:
    """The record with its original redacted, hashed, then cut to max_bytes (its
    original_size stays the size as received)."""
    original = record.get("original")
    if original is None:
        return record
    # Only what can be kept is redacted (plus a margin, so a value cut in two is still seen
    # whole): redacting a megabyte would run over the redactor's time budget.
    redacted, encoding = redact_original(original[:max_bytes + REDACTION_MARGIN], find_spans, keep=max_bytes)
    return bounded_original(record, redacted, encoding, max_bytes, cut_before=len(original) > max_bytes)


# -- encoding: always possible ------------------------------------------------------------

def _fit_text(value: str, limit: int) -> str:
    value = _SURROGATES.sub("\ufffd", value)
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:16]
    return f"{value[:limit - 40]}…[{len(value)} chars, sha256 {digest}]"


def fitted(record: dict) -> dict:
    """The record with every field fitting its Avro type: strings without surrogates and
    capped, numbers in range (an out-of-range number is dropped, its field null)."""
    out = dict(record)
    for name in _STRING_FIELDS:
        if isinstance(out.get(name), str):
            out[name] = _fit_text(out[name], MAX_ID_CHARS)
    out["reason"] = _fit_text(str(out.get("reason") or ""), MAX_REASON)
    for name, (low, high) in _INT_FIELDS.items():
        value = out.get(name)
        if value is not None and not (isinstance(value, int) and low <= value <= high):
            out[name] = None
    schema_id = out.get("schema_id")
    if schema_id is not None and not (isinstance(schema_id, int) and INT_RANGE[0] <= schema_id <= INT_RANGE[1]):
        out["writer_schema_id"] = out.get("writer_schema_id") or (
            schema_id if isinstance(schema_id, int) and LONG_RANGE[0] <= schema_id <= LONG_RANGE[1] else None)
        out["schema_id"] = None
    if out.get("first_seen_ms") is None:
        out["first_seen_ms"] = 0
    if out.get("attempts") is None:
        out["attempts"] = 1
    return out


def safe_for_storage(record: dict) -> dict:
    """The record with an unredacted original withheld (fail closed)."""
    if record.get("original") is not None and not record.get("payload_redacted"):
        size = record.get("original_size")
        return {**record, "original": None, "text_withheld": True,
                "original_size": len(record["original"]) if size is None else size}
    return record


def encode_dlq(record: dict, *, allow_clear_original: bool = False) -> bytes:
    if not allow_clear_original:
        record = safe_for_storage(record)
    if "dlq_id" not in record:
        record = {**record, "dlq_id": dlq_id(record.get("stage", ""), record.get("topic"), record.get("partition"),
                                             record.get("offset"), record.get("event_id"))}
    return record_codec("dlq_record").encode(fitted(record))


def decode_dlq(value: bytes) -> dict:
    return record_codec("dlq_record").decode(value)
