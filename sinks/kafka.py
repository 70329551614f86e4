"""Records produced to a Kafka topic (DLQ, billing events, quota alerts), every delivery
confirmed, and read back for inspection.

A record the broker or the encoder refuses for good (too large, a value out of range, a
schema error) is returned as ``Rejected`` so the caller can dead-letter it and carry on;
only failures that waiting can cure (an outage) raise, and only the undelivered records
need sending again."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

# Errors a retry cannot cure: the same record would be refused again.
PERMANENT_ERRORS = frozenset(getattr(KafkaError, name) for name in (
    "MSG_SIZE_TOO_LARGE", "_MSG_SIZE_TOO_LARGE", "RECORD_LIST_TOO_LARGE", "INVALID_RECORD", "INVALID_MSG",
    "CORRUPT_MESSAGE", "_INVALID_ARG", "_VALUE_SERIALIZATION", "_KEY_SERIALIZATION", "POLICY_VIOLATION",
    "TOPIC_AUTHORIZATION_FAILED") if hasattr(KafkaError, name))


@dataclass
class Rejected:
    """A record refused for good: ``code`` (machine), ``reason`` (never quotes the record)."""

    record: dict
    code: str
    reason: str


class DeliveryFailed(KafkaException):
    """Some records were not delivered for a reason a retry may cure (broker down...);
    ``undelivered`` need sending again, ``rejected`` were refused for good."""

    def __init__(self, topic: str, undelivered: list[dict], errors: list[str], rejected: list[Rejected]):
        super().__init__(f"delivery to {topic} failed: {len(undelivered)} undelivered, errors: {errors[:3]}")
        self.topic = topic
        self.undelivered = undelivered
        self.errors = errors
        self.rejected = rejected

    def __str__(self) -> str:
        return self.args[0]


def is_permanent(error: KafkaError) -> bool:
    return error.code() in PERMANENT_ERRORS


def encode_failure(exc: Exception) -> tuple[str, str]:
    """(code, reason) of a record the encoder refused; the reason names the rule, never
    the value (an exception message may quote it)."""
    code = getattr(exc, "code", None)
    reason = getattr(exc, "reason", None)
    if isinstance(code, str) and isinstance(reason, str):
        return code, reason
    return "encode_error", f"the record cannot be encoded ({type(exc).__name__})"


def produce_when_room(producer: Producer, topic: str, value: bytes, key: bytes | None, on_delivery,
                      wait_s: float = 0.05) -> None:
    """Produce one message, serving delivery reports while the local queue is full."""
    while True:
        try:
            producer.produce(topic, value, key=key, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(wait_s)


class TopicWriter:
    def __init__(self, bootstrap: str, topic: str, encode: Callable[[dict], bytes], key_field: str,
                 extra_config: dict | None = None):
        self.topic = topic
        self.encode = encode
        self.key_field = key_field
        self._producer = Producer({
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            **(extra_config or {}),
        })

    def send(self, records: list[dict]) -> list[Rejected]:
        """Produce every record; return once the broker acknowledged all that it can take,
        with the records refused for good. Raises DeliveryFailed (naming the undelivered
        records) when a retry may help."""
        rejected: list[Rejected] = []
        failed: dict[int, str] = {}
        pending: set[int] = set()

        def delivery_of(index: int):
            def on_delivery(err, _msg):
                pending.discard(index)
                if err is None:
                    return
                if is_permanent(err):
                    rejected.append(Rejected(records[index], "kafka_rejected", f"{self.topic}: {err.str()}"))
                else:
                    failed[index] = err.str()
            return on_delivery

        for index, record in enumerate(records):
            try:
                value = self.encode(record)
            except Exception as exc:  # noqa: BLE001 - any encoder error is a property of this record
                rejected.append(Rejected(record, *encode_failure(exc)))
                continue
            key = str(record.get(self.key_field) or "").encode()[:1024] or None
            pending.add(index)
            try:
                produce_when_room(self._producer, self.topic, value, key, delivery_of(index), wait_s=0.1)
            except KafkaException as exc:
                pending.discard(index)
                error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                if error is None or not is_permanent(error):
                    failed[index] = str(error or exc)
                    continue
                rejected.append(Rejected(record, "kafka_rejected", f"{self.topic}: {error.str()} "
                                                                  f"({len(value)} bytes)"))
        self._producer.flush(30)
        undelivered = sorted(set(failed) | pending)
        if undelivered:
            raise DeliveryFailed(self.topic, [records[i] for i in undelivered],
                                 [failed.get(i, "not acknowledged in 30 s") for i in undelivered], rejected)
        return rejected


def read_topic(bootstrap: str, topic: str, decode: Callable[[bytes], dict],
               timeout_s: float = 30) -> Iterator[tuple[int, int, dict]]:
    """(partition, offset, decoded record) of every record on the topic, up to its end."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"gatewatch-reader-{topic}",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        at_eof: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(at_eof) < len(partitions) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                at_eof.add(msg.partition())
                continue
            yield msg.partition(), msg.offset(), decode(msg.value())
    finally:
        consumer.close()
