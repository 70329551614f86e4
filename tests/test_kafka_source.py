"""The ingest source against a real broker: partition subsets and resting when caught up."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest
from confluent_kafka import OFFSET_BEGINNING, Producer

from connectors.kafka_source import RestingKafkaSource

pytestmark = pytest.mark.integration


def test_only_the_chosen_partitions_are_read(kafka_bootstrap, topic_factory):
    topic = topic_factory(partitions=4)
    assert sorted(RestingKafkaSource([kafka_bootstrap], [topic]).list_parts()) == [f"{p}-{topic}" for p in range(4)]
    assert sorted(RestingKafkaSource([kafka_bootstrap], [topic], only_partitions=[0, 2]).list_parts()) == [
        f"0-{topic}", f"2-{topic}"]


def test_a_caught_up_partition_rests_until_it_has_messages(kafka_bootstrap, topic_factory):
    topic = topic_factory(partitions=1)
    source = RestingKafkaSource([kafka_bootstrap], [topic], tail=True, starting_offset=OFFSET_BEGINNING,
                                idle_wait_s=0.5)
    part = source.build_part("in", f"0-{topic}", None)
    try:
        deadline = time.monotonic() + 10
        while part.next_batch() == [] and part.next_awake() is None and time.monotonic() < deadline:
            pass
        awake = part.next_awake()
        assert awake is not None and awake > datetime.now(timezone.utc)

        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(topic, b"hello", partition=0)
        assert producer.flush(10) == 0
        batch = []
        while not batch and time.monotonic() < deadline:
            batch = part.next_batch()
        assert [msg.value for msg in batch] == [b"hello"] and part.next_awake() is None
    finally:
        part.close()


def test_an_unreachable_broker_is_a_clear_error_not_a_hang():
    from ops.dev.services import free_port

    broker = f"127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match=f"events.*{broker}.*kafka.bootstrap"):
        RestingKafkaSource([broker], ["events"], list_timeout_s=2).list_parts()


def test_consumers_prefetch_a_bounded_amount_and_kafka_extra_overrides_it():
    from connectors.kafka_source import PREFETCH_LIMITS

    bounded = RestingKafkaSource(["127.0.0.1:1"], ["events"])
    assert {key: bounded._add_config[key] for key in PREFETCH_LIMITS} == PREFETCH_LIMITS
    assert int(bounded._add_config["queued.max.messages.kbytes"]) < 65536, "librdkafka's own default"
    assert not set(PREFETCH_LIMITS) & set(bounded._admin_config), "an admin client warns about consumer properties"
    chosen = RestingKafkaSource(["127.0.0.1:1"], ["events"], add_config={"queued.max.messages.kbytes": "1024"})
    assert chosen._add_config["queued.max.messages.kbytes"] == "1024"


def test_a_batch_carries_each_message_and_the_snapshot_resumes_after_the_last(kafka_bootstrap, topic_factory):
    topic = topic_factory(partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for n in range(3):
        producer.produce(topic, f"m{n}".encode(), key=b"k", partition=0, headers=[("h", b"1")])
    assert producer.flush(10) == 0

    def read(resume_state, want: int) -> tuple[list, object]:
        source = RestingKafkaSource([kafka_bootstrap], [topic], tail=True, starting_offset=OFFSET_BEGINNING)
        part = source.build_part("in", f"0-{topic}", resume_state)
        try:
            batch, deadline = [], time.monotonic() + 10
            while len(batch) < want and time.monotonic() < deadline:
                batch += part.next_batch()
            return batch, part.snapshot()
        finally:
            part.close()

    batch, snapshot = read(None, 3)
    assert [(m.value, m.key, m.topic, m.partition, m.offset, m.headers) for m in batch] == [
        (f"m{n}".encode(), b"k", topic, 0, n, [("h", b"1")]) for n in range(3)]
    assert snapshot == 3
    batch, snapshot = read(2, 1)
    assert [m.value for m in batch] == [b"m2"] and snapshot == 3
