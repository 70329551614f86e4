"""Through a real broker: good messages in every accepted encoding are decoded by the ingest
step, every kind of bad message becomes a DLQ record with its code, its original bytes and
its topic/partition/offset, and nothing is lost."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from types import SimpleNamespace

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from ops.settings import ValidationSettings
from schemas.codec import EventCodec
from schemas.dlq import decode_dlq, encode_dlq
from schemas.registry import SCHEMA_DIR, LocalRegistry
from tests.test_codec import BAD, event
from tests.test_producer import consume


def test_every_bad_message_lands_in_the_dlq_and_every_good_one_decodes(kafka_bootstrap, topic_factory):
    from dataflows.ingest import DLQ, OK, decode_batch

    topic = topic_factory(partitions=2, prefix="codec")
    now = int(time.time() * 1000)
    codec = EventCodec(LocalRegistry(), ValidationSettings())
    serializer = AvroSerializer(SchemaRegistryClient.new_client({"url": "mock://broker-test"}),
                                (SCHEMA_DIR / "gateway_event.v1.avsc").read_text())
    good = {}
    for i in range(30):
        sample = event(event_id=f"good-{i}", event_time=now - 1000, request_id=f"r-{i}")
        if i % 3 == 0:
            value = codec.encode(sample)
        elif i % 3 == 1:
            value = serializer(sample, SerializationContext(topic, MessageField.VALUE))
        else:
            iso = datetime.fromtimestamp(sample["event_time"] / 1000, tz=UTC).isoformat()
            value = json.dumps({**sample, "event_time": iso}).encode()
        good[sample["event_id"]] = value
    # The BAD cases are dated around the fixed test_codec.NOW, which is not now: their
    # future/past cases may swap codes here, every other check comes first.
    bad = {case: build(codec) for case, code, build, _ in BAD}
    expected_codes = {case: code for case, code, _, _ in BAD}
    fixed_now_cases = {"future", "past"}

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
    for key, value in [*good.items(), *bad.items()]:
        producer.produce(topic, value, key.encode())
    assert producer.flush(30) == 0

    messages = consume(kafka_bootstrap, topic)
    assert len(messages) == len(good) + len(bad)
    batch = [SimpleNamespace(value=m.value(), topic=m.topic(), partition=m.partition(), offset=m.offset())
             for m in messages]
    routed = decode_batch(codec, batch)
    decoded = {item["event_id"] for kind, item in routed if kind == OK}
    assert decoded == set(good)
    records = {}
    for msg, (kind, item) in zip(messages, routed):
        if kind == DLQ:
            records[msg.key().decode()] = (msg, item)
    assert set(records) == set(bad)
    for case, (msg, record) in records.items():
        if case not in fixed_now_cases:
            assert record["code"] == expected_codes[case], (case, record["reason"])
        assert record["stage"] == "decode" and record["reason"]
        assert (record["topic"], record["partition"], record["offset"]) == (topic, msg.partition(), msg.offset())
        assert record["original"] == msg.value()
        stored = decode_dlq(encode_dlq(record))
        # Unredacted originals are never written in clear; the flow redacts them first.
        assert stored["original"] is None
        if msg.value() is None:  # a tombstone: nothing to withhold
            assert stored["original_size"] is None and not stored["text_withheld"]
        else:
            assert stored["original_size"] == len(msg.value()) and stored["text_withheld"]
        assert stored["dlq_id"] == f"decode:{topic}:{msg.partition()}:{msg.offset()}"
