"""The dead-letter sink: DLQ records to the DLQ topic, every delivery confirmed; a record
the broker refuses for good goes to a local spool file instead (never a retry loop).

Every other sink sends the rows it refuses for good here (``DeadLetters.send_rejected``),
as records that carry the row as redacted JSON, so nothing is lost and the sink carries on.
The record layout itself is ``schemas.dlq``'s.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from collections import Counter
from typing import Callable

from schemas.dlq import bounded_original, encode_dlq, event_dlq_record, fitted, safe_for_storage
from sinks.kafka import DeliveryFailed, Rejected, TopicWriter
from sinks.metrics import get_metrics
from sinks.retry import Retry

log = logging.getLogger(__name__)


def row_key(row: dict) -> str:
    """The id a log line names a row by, bounded (an id may be absurdly long)."""
    for name in ("billing_id", "alert_id", "dlq_id", "update_id", "event_id"):
        if row.get(name):
            value = str(row[name])
            return value if len(value) <= 200 else f"{value[:160]}…({len(value)} chars)"
    return "?"


def note_rejected(sink: str, rejected: list[Rejected]) -> None:
    """Count and log every row a sink refused for good, by its id (never its content)."""
    for refused in rejected:
        get_metrics().increment("gatewatch_sink_rejected", tags={"sink": sink, "code": refused.code})
        log.error("sink refused a row for good; it goes to the DLQ", extra={
            "sink": sink, "code": refused.code, "reason": refused.reason, "row": row_key(refused.record),
            "request_id": refused.record.get("request_id")})


def send_all(sink: str, writer: TopicWriter, records: list[dict], retry: Retry) -> list[Rejected]:
    """Every record delivered, retrying (only the undelivered ones) while the broker is
    out; the records refused for good, each counted and logged by its key."""
    pending, rejected = records, []

    def attempt() -> None:
        nonlocal pending
        try:
            rejected.extend(writer.send(pending))
            pending = []
        except DeliveryFailed as failed:
            rejected.extend(failed.rejected)
            pending = failed.undelivered
            raise

    if pending:
        retry(sink, attempt)
    note_rejected(sink, rejected)
    return rejected


def rejected_to_dlq(sink: str, refused: Rejected, max_original_bytes: int) -> dict:
    """A DLQ record for a row a sink refused: the row as JSON (it has passed redaction
    already), cut to the configured size with its size and hash."""
    row = refused.record
    record = event_dlq_record(row, stage="sink", code="sink_rejected", event_id=row_key(row),
                              reason=f"{sink} refused the row for good ({refused.code}): {refused.reason}")
    payload = json.dumps(row, default=str, ensure_ascii=False).encode("utf-8", "replace")
    return {**bounded_original(record, payload, "utf-8", max_original_bytes), "dlq_id": f"sink:{sink}:{row_key(row)}"}


class DeadLetters:
    """The DLQ topic, with a local spool file for records the broker refuses for good:
    each spooled record is counted (gatewatch_dlq_spooled, alert on any) and logged.

    ``open_writer`` makes the topic's producer on first use: most sinks never refuse a row
    and need no producer for it."""

    _spool_lock = threading.Lock()

    def __init__(self, open_writer: Callable[[], TopicWriter], retry: Retry, max_original_bytes: int,
                 spool_path: str):
        self._open_writer = open_writer
        self.retry = retry
        self.max_original_bytes = max_original_bytes
        self.spool_path = spool_path
        self._writer: TopicWriter | None = None

    @classmethod
    def to_topic(cls, bootstrap: str, topic: str, producer_config: dict | None, retry: Retry,
                 max_original_bytes: int, spool_path: str) -> "DeadLetters":
        return cls(lambda: TopicWriter(bootstrap, topic, encode_dlq, "event_id", producer_config),
                   retry, max_original_bytes, spool_path)

    @property
    def writer(self) -> TopicWriter:
        if self._writer is None:
            self._writer = self._open_writer()
        return self._writer

    def send(self, records: list[dict]) -> None:
        if not records:
            return
        for refused in send_all("dlq", self.writer, records, self.retry):
            self.spool(refused)
        # Counted once per stage and code of the batch: the labels looked up once, not per record.
        for (stage, code), count in Counter((record["stage"], record["code"]) for record in records).items():
            get_metrics().increment("gatewatch_dlq_records", count, tags={"stage": stage, "code": code})
        for record in records:
            log.warning("event sent to the DLQ", extra={
                "request_id": record.get("request_id"), "event_id": record.get("event_id"),
                "stage": record["stage"], "code": record["code"], "reason": record["reason"],
                "source": f"{record.get('topic')}/{record.get('partition')}/{record.get('offset')}"})

    __call__ = send  # the DLQ sink's writer: the flow hands it every DLQ record

    def send_rejected(self, sink: str, rejected: list[Rejected]) -> None:
        if rejected:
            self.send([rejected_to_dlq(sink, refused, self.max_original_bytes) for refused in rejected])

    def send_refused_rows(self, sink: str, rejected: list[tuple[object, BaseException]]) -> None:
        """Rows a store refused for good (see sinks.retry.write_isolating), each counted and logged."""
        # An error's own message may quote the row (PII); only a reason made to be shown is.
        refused = [Rejected(row, "row_rejected", getattr(exc, "safe_reason", None) or f"{type(exc).__name__} writing the row")
                   for row, exc in rejected]
        note_rejected(sink, refused)
        self.send_rejected(sink, refused)

    def spool(self, refused: Rejected) -> None:
        record = fitted(safe_for_storage(refused.record))
        original = record.get("original")
        line = json.dumps({**record, "original": base64.b64encode(original).decode() if original else None,
                           "spool_reason": refused.reason}, default=str)
        with self._spool_lock, open(self.spool_path, "a", encoding="utf-8") as spool:
            spool.write(line + "\n")
        get_metrics().increment("gatewatch_dlq_spooled", tags={"code": str(record.get("code"))})
        log.error("DLQ record refused by the broker, appended to the local spool", extra={
            "dlq_id": row_key(record), "code": record.get("code"), "reason": refused.reason,
            "spool_path": os.path.abspath(self.spool_path), "request_id": record.get("request_id")})
