"""`gatewatch demo --via-api`: the generated traffic through `gatewatch serve` (JSON batches
and OTLP GenAI spans) reconciles like the Kafka path, the API's rejections included."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from connectors.ingest_api import otlp
from ops.cli.pipeline import demo as demo_command
from ops.dev import api_feed, demo
from ops.dev.loadgen import make_event, upgrade_to_v2
from ops.settings import Settings
from sinks.clickhouse import ClickHouse, close_chdb

NOW_MS = 1_795_000_000_000


def _decoded(events: list[dict], org: str = "org-01", region: str = "eu") -> list[dict]:
    """What the API makes of the demo's spans: the OTLP exporter's protobuf, decoded and mapped."""
    import gzip

    request = otlp.request_from_protobuf(gzip.decompress(api_feed.otlp_body(events)))
    return [otlp.span_to_event(span, org, region) for span in otlp.spans_of(request)]


def test_a_demo_span_maps_back_to_its_event_each_token_once():
    rng = random.Random(4)
    v1 = make_event(rng, NOW_MS, 50, 0.0)[0]
    v2 = make_event(rng, NOW_MS, 50, 0.0)[0]
    v2.update(upgrade_to_v2(rng, v2), reasoning_tokens=min(40, v2["output_tokens"]), cache_read_tokens=700,
              cache_write_tokens=30, status_code=429)
    for event, got in zip((v1, v2), _decoded([v1, v2])):
        for name in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "event_time",
                     "latency_ms", "user_id", "model", "provider", "request_id", "streaming", "status_code"):
            assert got[name] == event[name], name
        assert got["reasoning_tokens"] == event.get("reasoning_tokens", 0)
        assert event["prompt"] in got["prompt"] and event["response"] in got["response"]
    assert _decoded([v2])[0]["trace_id"] == v2["trace_id"] and _decoded([v2])[0]["span_id"] == v2["span_id"]
    # A v1 event has no trace: its ids come from its event_id, so a resent duplicate is the same span.
    assert _decoded([v1])[0]["event_id"] == _decoded([dict(v1)])[0]["event_id"]
    assert _decoded([v1])[0]["event_id"] != _decoded([v2])[0]["event_id"]


def test_the_otlp_route_is_fixed_per_event_and_never_takes_a_region_no_key_stands_for():
    rng = random.Random(5)
    events = [make_event(rng, NOW_MS, 200, 0.0)[0] for _ in range(2000)]
    share = sum(api_feed.goes_by_otlp(e, 0.3) for e in events) / len(events)
    assert 0.25 < share < 0.35
    assert [api_feed.goes_by_otlp(e, 0.3) for e in events] == [api_feed.goes_by_otlp(dict(e), 0.3) for e in events]
    assert not any(api_feed.goes_by_otlp({**e, "region": "atlantis"}, 1.0) for e in events)


def test_via_api_refuses_chaos_before_starting_anything():
    result = CliRunner().invoke(demo_command, ["--via-api", "--chaos", "1"])
    assert result.exit_code == 2 and "--via-api cannot be combined with --chaos" in result.output


@pytest.mark.integration
@pytest.mark.e2e
def test_demo_via_the_api_reconciles_and_counts_every_rejection(tmp_path):
    found, problems, expected = demo.run(demo.DemoOptions(
        events=400, users=40, seed=31, bad_ratio=0.05, dup_ratio=0.08, late_ratio=0.02, via_api=True,
        otlp_share=0.4, data_dir=str(tmp_path), keep_events=True))
    assert problems == [], problems
    api = found["api"]
    assert expected.bad > 0 and expected.duplicates > 0 and expected.late > 0 and expected.reasoning_tokens > 0
    assert api["rejected"] == expected.bad == found["dlq"]
    assert api["accepted"] == api["server_accepted"] == expected.produced - expected.bad
    assert api["otlp_spans"] > 0 and api["json_events"] > 0 and api["statuses"].get("400", 0) > 0
    # Every DLQ record is the API's, and none carries the rejected input.
    records = [json.loads(line) for line in (tmp_path / "dlq.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"api"} and all(r["original"] is None for r in records)

    by_otlp = [e for e in expected.events.values() if api_feed.goes_by_otlp(e, 0.4)]
    clickhouse = ClickHouse(f"chdb://{tmp_path / 'chdb'}", Settings().clickhouse.database)
    try:
        rows = clickhouse.rows(f"SELECT event_id, trace_id, span_id, reasoning_tokens FROM "
                               f"{clickhouse.database}.events FINAL WHERE startsWith(event_id, 'otel-')")
    finally:
        close_chdb()
    assert len(rows) == len(by_otlp) > 0
    stored = {trace_id: reasoning for _id, trace_id, _span, reasoning in rows}
    for event in by_otlp:
        if "trace_id" in event:
            assert stored[event["trace_id"]] == event["reasoning_tokens"]


@pytest.mark.integration
def test_each_users_events_reach_kafka_in_the_order_generated_across_both_routes(kafka_bootstrap, topic_factory,
                                                                                tmp_path):
    from ops.dev.loadgen import collect, generate
    from ops.dev.services import free_port
    from schemas.codec import EventCodec
    from schemas.registry import registry_from_settings
    from sinks.kafka import read_topic

    topic, dlq_topic = topic_factory(partitions=3, prefix="demo-api"), topic_factory(prefix="demo-api-dlq")
    messages, _expected = collect(generate(api_feed.JsonWire(), 600, dup_ratio=0.1, bad_ratio=0.05, users=15,
                                           seed=12, late_ratio=0.05))
    server = api_feed.ServeProcess(tmp_path, kafka_bootstrap, free_port(), env={
        "GATEWATCH_KAFKA__EVENTS_TOPIC": topic, "GATEWATCH_KAFKA__DLQ_TOPIC": dlq_topic})
    try:
        json_keys, otlp_keys = api_feed.create_keys(server.keys_path, [f"org-{n:02d}" for n in range(7)])
        counts = api_feed.feed(server.url, messages, json_keys, otlp_keys, 0.5)
    finally:
        server.stop()
    assert counts.otlp_spans > 100 and counts.json_events > 100

    settings = Settings()
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    stored: dict[str, list[str]] = {}
    for _partition, _offset, event in read_topic(kafka_bootstrap, topic, lambda raw: codec.decode_record(raw)[0]):
        stored.setdefault(f"{event['org_id']}/{event['user_id']}", []).append(event["request_id"])
    assert sum(map(len, stored.values())) == counts.accepted
    arrived = {request_id for ids in stored.values() for request_id in ids}
    generated: dict[str, list[str]] = {}
    for key, value in messages:
        try:
            request_id = json.loads(value)["request_id"]
        except (ValueError, TypeError, KeyError):
            continue
        if request_id in arrived:  # not one the API rejected
            generated.setdefault(key.decode(), []).append(request_id)
    assert stored == generated
