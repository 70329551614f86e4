"""EventProducer when things go wrong, against a real broker that is stopped, restarted
empty, or outlived by a killed gateway: a fatal idempotence error replaces the producer and
loses nothing; durable mode keeps what a SIGKILLed process accepted; failed sends are
re-sent before newer events, so each user's events keep their order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from connectors.producer import EventProducer, SpoolFull
from ops.dev import services as svc
from schemas.registry import LocalRegistry
from tests.test_producer import _wait, consume, decoded, events, own_broker, spool_dir  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent


def first_deliveries(messages) -> list[dict]:
    """Each event once, at its first delivery (what the flow keeps after dedupe by event_id)."""
    seen, first = set(), []
    for event in decoded(messages):
        if event["event_id"] not in seen:
            seen.add(event["event_id"])
            first.append(event)
    return first


def assert_all_delivered_in_user_order(messages, sent: list[dict]) -> None:
    kept = first_deliveries(messages)
    missing = {e["event_id"] for e in sent} - {e["event_id"] for e in kept}
    assert not missing, f"{len(missing)} of {len(sent)} events never delivered"
    last: dict[str, str] = {}
    for event in kept:  # consume() returns partition by partition, each in offset order
        user = f"{event['org_id']}/{event['user_id']}"
        assert event["request_id"] > last.get(user, ""), \
            f"{user}: {event['request_id']} delivered after {last[user]}"
        last[user] = event["request_id"]


@pytest.mark.parametrize("durable", [False, True], ids=["default", "durable"])
def test_a_broker_that_lost_the_producer_state_gets_every_later_event(own_broker, spool_dir, durable):
    """The broker comes back empty: the producer's next batch has sequence numbers the broker
    never saw, librdkafka raises a fatal OUT_OF_ORDER_SEQUENCE_NUMBER, and the producer must be
    replaced with everything it had not delivered re-sent."""
    topic = f"fatal-{uuid.uuid4().hex[:8]}"
    svc.create_topics(own_broker.address, {topic: 2})
    before = events(200, users=8, seed=11)
    during = events(300, users=8, seed=12, first=200)
    after = events(300, users=8, seed=13, first=500)
    producer = EventProducer(own_broker.address, topic, LocalRegistry(), spool_dir, durable=durable)
    try:
        for event in before:
            producer.send(event)
        assert producer.flush(20) == 0

        own_broker.stop()
        for event in during:
            producer.send(event)
        own_broker.restart_empty()
        svc.create_topics(own_broker.address, {topic: 2})
        for event in after:
            producer.send(event)
        assert producer.flush(45) == 0, f"undelivered: {producer.pending()}, counts {dict(producer.counts)}"
        assert producer.counts["recreated"] >= 1
        assert REGISTRY.get_sample_value("gatewatch_producer_recreated_total", {"topic": topic}) >= 1
    finally:
        producer.close(timeout=5)
    print(f"\nfatal error: producer replaced {producer.counts['recreated']}x, {producer.counts['spooled']} "
          f"events spooled in all, all {len(during) + len(after)} sent after the restart delivered")
    # `before` went down with the broker's data; everything sent since must be there, in order.
    assert_all_delivered_in_user_order(consume(own_broker.address, topic), during + after)


CHILD = """
import json, sys, time
from connectors.producer import EventProducer
from schemas.registry import LocalRegistry
address, topic, spool_dir, events_path = sys.argv[1:5]
producer = EventProducer(address, topic, LocalRegistry(), spool_dir, durable=True)
for event in json.load(open(events_path)):
    producer.send(event)
print("accepted", producer.counts["sent"], flush=True)
time.sleep(120)
"""


def test_durable_mode_keeps_what_a_killed_gateway_accepted_during_an_outage(own_broker, spool_dir, tmp_path):
    topic = f"durable-{uuid.uuid4().hex[:8]}"
    svc.create_topics(own_broker.address, {topic: 2})
    sent = events(500, users=10, seed=21)
    events_path = tmp_path / "events.json"
    events_path.write_text(json.dumps(sent))
    own_broker.stop()
    child = subprocess.Popen([sys.executable, "-c", CHILD, own_broker.address, topic, str(spool_dir),
                              str(events_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.split() == ["accepted", str(len(sent))], (line, child.stderr.read() if child.poll() else "")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL

    own_broker.start()
    successor = EventProducer(own_broker.address, topic, LocalRegistry(), spool_dir)
    try:
        assert successor.flush(60) == 0
        assert successor.counts["replayed"] == len(sent)
    finally:
        successor.close()
    assert not list(spool_dir.glob("*.spool"))
    messages = consume(own_broker.address, topic)
    assert len(messages) == len(sent)
    assert_all_delivered_in_user_order(messages, sent)


def test_a_durable_producer_delivers_while_the_broker_is_up_and_refuses_what_it_cannot_store(
        own_broker, spool_dir):
    topic = f"durable-up-{uuid.uuid4().hex[:8]}"
    svc.create_topics(own_broker.address, {topic: 3})
    sent = events(400, users=10, seed=22)
    with EventProducer(own_broker.address, topic, LocalRegistry(), spool_dir, durable=True,
                       fsync_each_send=True) as producer:
        for event in sent:
            producer.send(event)
        assert producer.flush(30) == 0
        assert producer.counts["replayed"] == len(sent) == producer.counts["delivered"]
    assert not list(spool_dir.glob("*.spool")), "a closed durable producer with nothing pending leaves no spool"
    assert_all_delivered_in_user_order(consume(own_broker.address, topic), sent)

    own_broker.stop()
    try:
        full_dir = spool_dir.parent / "full-spool"
        small = EventProducer(own_broker.address, topic, LocalRegistry(), full_dir, durable=True,
                              max_spool_bytes=4096)
        try:
            with pytest.raises(SpoolFull, match="is full"):
                for event in sent:
                    small.send(event)
            assert 0 < small.counts["sent"] < len(sent) and small.counts["dropped"] == 0
        finally:
            small.close(timeout=0.5)
    finally:
        own_broker.start()


def test_failed_replays_are_resent_before_newer_events(own_broker, spool_dir):
    """Spooled events replayed while the broker is down time out in librdkafka
    (message.timeout.ms set by the gateway) after newer ones were spooled: they are read
    again from their place in the spool, not appended behind the newer ones."""
    topic = f"order-{uuid.uuid4().hex[:8]}"
    svc.create_topics(own_broker.address, {topic: 2})
    before = events(100, users=5, seed=31)
    older = events(300, users=5, seed=32, first=100)
    newer = events(300, users=5, seed=33, first=400)
    producer = EventProducer(own_broker.address, topic, LocalRegistry(), spool_dir,
                             extra_config={"message.timeout.ms": 1500})
    try:
        for event in before:
            producer.send(event)
        assert producer.flush(20) == 0
        own_broker.stop()
        for event in older:
            producer.send(event)
        assert _wait(lambda: producer._broker_down)
        for event in newer:
            producer.send(event)
        assert _wait(lambda: producer.counts["delivery_errors"] > 0, timeout=10), "nothing timed out"
        own_broker.start()
        assert producer.flush(45) == 0
    finally:
        producer.close(timeout=5)
    print(f"\nreplays failed in an outage: {producer.counts['delivery_errors']} re-sent")
    assert_all_delivered_in_user_order(consume(own_broker.address, topic), before + older + newer)


def test_failed_direct_sends_are_resent_before_newer_spooled_events(kafka_bootstrap, spool_dir):
    """The first events wait in librdkafka for a topic that does not exist yet; the queue is
    full, so later ones are spooled; the first ones time out: they go to the spool's head."""
    topic = f"order-direct-{uuid.uuid4().hex[:8]}"
    sent = events(300, users=5, seed=34)
    producer = EventProducer(kafka_bootstrap, topic, LocalRegistry(), spool_dir, extra_config={
        "message.timeout.ms": 1500, "queue.buffering.max.messages": 50, "allow.auto.create.topics": False})
    try:
        for event in sent:
            producer.send(event)
        assert REGISTRY.get_sample_value("gatewatch_producer_spooled_total",
                                         {"topic": topic, "reason": "queue_full"}) > 0
        assert _wait(lambda: REGISTRY.get_sample_value(
            "gatewatch_producer_spooled_total", {"topic": topic, "reason": "delivery_error"}), timeout=10), \
            "the queued sends did not fail"
        svc.create_topics(kafka_bootstrap, {topic: 2})
        assert producer.flush(45) == 0
    finally:
        producer.close(timeout=5)
    assert_all_delivered_in_user_order(consume(kafka_bootstrap, topic), sent)
