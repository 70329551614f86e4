"""Rejected API input as dead-letter records, produced without waiting.

The client already got the error (400 or a partial success); the DLQ record is the
operators' trail of it (`gatewatch dlq inspect --summary` counts rejections by code). The
API does not redact, so ``original`` is always withheld by ``encode_dlq`` (only its size is
kept). Production never blocks a request: when the local queue is full the record is
dropped and counted in ``gatewatch_api_dlq_dropped_total``.
"""

from __future__ import annotations

import time

from confluent_kafka import Producer
from prometheus_client import Counter

from schemas.dlq import dlq_record, encode_dlq

STAGE = "api"
DLQ_DROPPED = Counter("gatewatch_api_dlq_dropped", "DLQ records of rejected API input lost (local queue full)")
DLQ_SENT = Counter("gatewatch_api_dlq_records", "DLQ records of rejected API input handed to Kafka", ["code"])


def rejection(*, code: str, reason: str, request_id: str, index: int, original: bytes | None,
              event_id: str | None) -> dict:
    """The DLQ record of one rejected item of one request (id unique per request and index)."""
    record = dlq_record(stage=STAGE, code=code, reason=reason, original=original, topic=None, partition=None,
                        offset=None, first_seen_ms=int(time.time() * 1000), event_id=event_id,
                        request_id=request_id)
    record["dlq_id"] = f"{STAGE}:{request_id}:{index}"
    return record


class DeadLetters:
    def __init__(self, bootstrap: str, topic: str, extra_config: dict | None = None):
        self.topic = topic
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50,
                                   "queue.buffering.max.messages": 10_000, **(extra_config or {})})

    def send(self, records: list[dict], org_id: str) -> None:
        key = org_id.encode()
        for record in records:
            try:
                self._producer.produce(self.topic, encode_dlq(record), key=key)
            except BufferError:
                DLQ_DROPPED.inc()
                continue
            DLQ_SENT.labels(code=record["code"]).inc()
        self._producer.poll(0)

    def close(self, timeout: float = 10.0) -> int:
        """Deliver what is queued for up to ``timeout`` s; return how many records were not."""
        return self._producer.flush(timeout)
