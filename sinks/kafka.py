"""Records produced to a Kafka topic (DLQ, billing events, quota alerts), every delivery confirmed."""

from __future__ import annotations

from typing import Callable

from confluent_kafka import KafkaException, Producer


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
            while True:
                try:
                    self._producer.produce(self.topic, self.encode(record), key=key, on_delivery=on_delivery)
                    break
                except BufferError:
                    self._producer.poll(0.1)
        remaining = self._producer.flush(30)
        if remaining or failures:
            raise KafkaException(f"delivery to {self.topic} failed: {remaining} undelivered, errors: {failures[:3]}")
