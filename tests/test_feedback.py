"""Feedback end to end: ratings from the feedback topic land in ClickHouse with comments
redacted, join to their events by request_id, and bad input goes to the DLQ."""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter

import pytest
from bytewax.testing import run_main
from confluent_kafka import Producer

from dataflows import feedback as feedback_flow
from dataflows import ingest
from ops.dev.demo import produce, read_dlq
from ops.dev.loadgen import generate, make_event
from ops.settings import PricingSettings, load_settings
from schemas.codec import EventCodec
from schemas.pricing import with_cost
from schemas.registry import registry_from_settings
from sinks.clickhouse import ClickHouse

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def ratings_for(events: dict[str, dict], count: int, rng: random.Random) -> list[dict]:
    rated = rng.sample(sorted(events.values(), key=lambda e: e["event_id"]), count)
    out = []
    for n, event in enumerate(rated):
        out.append({
            "event_id": str(uuid.UUID(int=rng.getrandbits(128))), "request_id": event["request_id"],
            "schema_version": 1, "event_time": int(time.time() * 1000), "user_id": event["user_id"],
            "org_id": event["org_id"], "region": event["region"],
            "rating": rng.choice(["THUMBS_UP", "THUMBS_DOWN"]),
            "comment": f"wrong answer, write to jane.doe{n}@example.com" if n % 3 == 0 else None,
            "conversation_id": None, "experiment_id": event["experiment_id"], "variant": event["variant"],
            "policy_flags": []})
    return out


def test_feedback_is_redacted_deduplicated_and_joins_its_events(kafka_bootstrap, topic_factory, redis_url, tmp_path):
    settings = load_settings(environ={}, use_service_state=False, overrides={
        "kafka": {"bootstrap": kafka_bootstrap, "events_topic": topic_factory(partitions=2), "tail": False,
                  "feedback_topic": topic_factory(partitions=2), "dlq_topic": topic_factory(partitions=1),
                  "billing_topic": topic_factory(partitions=1), "quota_alerts_topic": topic_factory(partitions=1)},
        "sinks": "clickhouse,dlq",
        "clickhouse": {"url": f"chdb://{tmp_path / 'chdb'}", "database": "fb"},
        "redis": {"url": redis_url},
    })
    registry = registry_from_settings(settings.schemas)
    codec = EventCodec(registry, settings.validation)
    expected = produce(kafka_bootstrap, settings.kafka.events_topic,
                       generate(codec, 400, dup_ratio=0.0, bad_ratio=0.0, users=30, seed=8, keep_events=True), 400)
    run_main(ingest.build_flow(settings))

    ratings = ratings_for(expected.events, 120, random.Random(4))
    feedback_codec = EventCodec(registry, settings.validation, schema="feedback_event")
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for rating in ratings + ratings[:10]:  # a gateway that resent ten ratings
        producer.produce(settings.kafka.feedback_topic, feedback_codec.encode(rating), key=rating["user_id"].encode())
    producer.produce(settings.kafka.feedback_topic, b'{"event_id": "x", "rating": "MEH"}')
    assert producer.flush(30) == 0
    del producer
    run_main(feedback_flow.build_flow(settings))

    clickhouse = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    stored = clickhouse.rows("SELECT event_id, comment, policy_flags FROM fb.feedback FINAL")
    assert len(stored) == len(ratings)
    comments = [comment for _id, comment, _flags in stored if comment]
    assert len(comments) == sum(1 for r in ratings if r["comment"])
    assert not any("@example.com" in comment for comment in comments)
    assert all("pii_redacted" in flags for _id, comment, flags in stored if comment)
    by_request = {event["request_id"]: event for event in expected.events.values()}

    joined = clickhouse.rows("SELECT f.rating, e.model FROM fb.feedback AS f FINAL "
                             "INNER JOIN fb.events AS e ON e.request_id = f.request_id")
    assert Counter(joined) == Counter((r["rating"], by_request[r["request_id"]]["model"])
                                      for r in ratings)

    by_variant = clickhouse.rows("SELECT model, variant, sum(thumbs_up), sum(thumbs_down) FROM fb.feedback_metrics "
                                 "GROUP BY model, variant")
    want = Counter()
    for r in ratings:
        model = by_request[r["request_id"]]["model"]
        want[(model, r["variant"] or "", r["rating"])] += 1
    assert {(m, v, int(up), int(down)) for m, v, up, down in by_variant} == {
        (m, v, want[(m, v, "THUMBS_UP")], want[(m, v, "THUMBS_DOWN")]) for m, v, _ in want}

    dlq = read_dlq(kafka_bootstrap, settings.kafka.dlq_topic, tmp_path / "dlq.jsonl")
    assert len(dlq) == 1 and dlq[0]["stage"] == "decode"


def test_feedback_view_on_a_clickhouse_server(clickhouse_url):
    clickhouse = ClickHouse(clickhouse_url, f"fb_{uuid.uuid4().hex[:8]}")
    assert "040_feedback" in clickhouse.migrate()
    now = int(time.time() * 1000)
    events = {"r1": "gpt-4o", "r2": "gpt-4o", "r3": "claude-sonnet-4"}
    rng = random.Random(2)
    rows = [with_cost({**make_event(rng, now, 5, 0.0)[0], "classification": "internal", "pii_entity_counts": {},
                       "source_partition": 0, "source_offset": n}, PricingSettings()) for n in range(3)]
    for row, (request_id, model) in zip(rows, events.items()):
        row.update(request_id=request_id, model=model, experiment_id="exp", variant="a")
    clickhouse.insert_events(rows)
    ratings = [("f1", "r1", "THUMBS_UP"), ("f2", "r2", "THUMBS_DOWN"), ("f3", "r3", "THUMBS_UP")]
    clickhouse.insert_feedback([{"event_id": e, "request_id": r, "event_time": now, "user_id": "u", "org_id": "o",
                                 "region": "eu", "rating": rating, "comment": None, "policy_flags": [],
                                 "classification": "public"} for e, r, rating in ratings])
    got = {(m, int(up), int(down)) for m, up, down in clickhouse.rows(
        f"SELECT model, sum(thumbs_up), sum(thumbs_down) FROM {clickhouse.database}.feedback_metrics GROUP BY model")}
    assert got == {("gpt-4o", 1, 1), ("claude-sonnet-4", 1, 0)}
