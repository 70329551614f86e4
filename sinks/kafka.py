"""Records produced to a Kafka topic (DLQ, billing events, quota alerts), every delivery
confirmed, and read back for inspection."""

from __future__ import annotations

import time
from typing import Callable, Iterator

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition


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

    def send(self, records: list[dict]) -> None:
        """Produce every record and return once the broker acknowledged all of them."""
        failures: list[str] = []

        def on_delivery(err, _msg):
            if err is not None:
                failures.append(str(err))

        for record in records:
            key = str(record.get(self.key_field) or "").encode() or None
            produce_when_room(self._producer, self.topic, self.encode(record), key, on_delivery, wait_s=0.1)
        remaining = self._producer.flush(30)
        if remaining or failures:
            raise KafkaException(f"delivery to {self.topic} failed: {remaining} undelivered, errors: {failures[:3]}")


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
