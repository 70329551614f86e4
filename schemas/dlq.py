"""Dead-letter records: what failed, where, why, and (redacted) what it was.

``dlq_record`` builds the record a flow step emits; ``encode_dlq`` writes it in the
Confluent wire format (schema ``dlq_record``, local id); ``decode_dlq`` reads any version.

The original bytes are raw input and may hold PII. A record leaves the pipeline with its
``original`` either redacted (``payload_redacted=True``) or withheld (``original=None``,
``text_withheld=True``): ``encode_dlq`` withholds an original that was not marked as
redacted instead of writing it in clear (pass ``allow_clear_original=True`` only for a DLQ
topic that is itself encrypted or access-controlled for raw data).
"""

from __future__ import annotations

from schemas.codec import record_codec

MAX_REASON = 2000


def dlq_id(stage: str, topic: str | None, partition: int | None, offset: int | None,
           event_id: str | None) -> str:
    """Deterministic: the same failure of the same message always gets the same id."""
    if offset is not None:
        return f"{stage}:{topic or ''}:{partition if partition is not None else ''}:{offset}"
    return f"{stage}:event:{event_id or ''}"


def dlq_record(*, stage: str, code: str, reason: str, original: bytes | None, topic: str | None,
               partition: int | None, offset: int | None, schema_id: int | None = None, first_seen_ms: int,
               attempts: int = 1, event_id: str | None = None, request_id: str | None = None) -> dict:
    """A DLQ record (a plain dict matching schemas/avro/dlq_record.v1.avsc).

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
        "payload_redacted": False,
        "text_withheld": False,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "schema_id": schema_id,
        "event_id": event_id,
        "request_id": request_id,
        "first_seen_ms": int(first_seen_ms),
        "attempts": attempts,
    }


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
    return record_codec("dlq_record").encode(record)


def decode_dlq(value: bytes) -> dict:
    return record_codec("dlq_record").decode(value)
