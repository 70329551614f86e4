"""The dead-letter queue: DLQ records produced to a Kafka topic, each delivery confirmed."""

from __future__ import annotations

from confluent_kafka import KafkaException, Producer

from schemas.dlq import encode_dlq


class DlqProducer:
    def __init__(self, bootstrap: str, topic: str, extra_config: dict | None = None):
        self.topic = topic
        self._producer = Producer({
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            **(extra_config or {}),
        })

    def send(self, records: list[dict]) -> None:
        """Produce every record and wait until the broker acknowledged all of them."""
        failures: list[str] = []

        def on_delivery(err, _msg):
            if err is not None:
                failures.append(str(err))

        for record in records:
            key = (record.get("event_id") or "").encode() or None
            while True:
                try:
                    self._producer.produce(self.topic, encode_dlq(record), key=key, on_delivery=on_delivery)
                    break
                except BufferError:
                    self._producer.poll(0.1)
        remaining = self._producer.flush(30)
        if remaining or failures:
            raise KafkaException(f"DLQ delivery failed: {remaining} undelivered, errors: {failures[:3]}")
