"""The shared vocabulary (schemas.vocabulary, schemas.pricing, the DLQ record builders) and
the places that must agree with it."""

from __future__ import annotations

from types import SimpleNamespace

from schemas.dlq import dlq_record, event_dlq_record, message_dlq_record
from schemas.vocabulary import TOKEN_FIELDS, TOKEN_KINDS, event_key, topic_partitions, user_key, window_id

TOTAL = {"org_id": "acme", "user_id": "u-1", "model": "gpt-4o", "window_start_ms": 1_795_000_020_000,
         "window_length_ms": 60_000, "n": 3, "input": 10, "output": 5, "cache_read": 2, "cache_write": 0}


def test_every_token_field_is_in_every_record_that_counts_tokens_and_every_kind_is_priced():
    from ops.settings import ModelPrice
    from schemas.registry import default_local_registry

    registry = default_local_registry()
    for name in ("gateway_event", "billing_event", "quota_update"):
        fields = {field["name"] for field in registry.raw(name)["fields"]}
        assert set(TOKEN_FIELDS) <= fields, name
    assert TOKEN_FIELDS == tuple(f"{kind}_tokens" for kind in TOKEN_KINDS)
    assert set(TOKEN_KINDS) == set(ModelPrice.model_fields)


def test_keys_name_users_events_and_windows_within_their_org():
    assert user_key("acme", "u-1") == "acme/u-1"
    assert event_key("acme", "e-1") == "acme/e-1"
    assert window_id(TOTAL) == "acme/u-1/gpt-4o/1795000020000"
    assert user_key("acme", "u-1") != user_key("globex", "u-1")


def test_billing_ids_and_quota_updates_name_a_window_the_same_way():
    from ops.settings import load_settings
    from schemas.records import quota_update
    from sinks.billing import billing_event

    pricing = load_settings(environ={}, use_service_state=False).pricing
    billed = billing_event(TOTAL, pricing)
    update = quota_update(TOTAL)
    assert billed["billing_id"] == window_id(TOTAL)
    assert update["update_id"] == f"{window_id(TOTAL)}#3"
    assert [update[field] for field in TOKEN_FIELDS] == [billed[field] for field in TOKEN_FIELDS] == [10, 5, 2, 0]
    late = billing_event({**TOTAL, "event_id": "e-9"}, pricing)
    assert late["billing_id"] == f"{window_id(TOTAL)}/late/e-9"


def test_the_topic_list_names_every_topic_of_the_kafka_settings():
    from ops.settings import KafkaSettings

    kafka = KafkaSettings()
    topics = topic_partitions(kafka, 6)
    named = {getattr(kafka, name) for name in KafkaSettings.model_fields if name.endswith("_topic")}
    assert set(topics) == named
    assert topics[kafka.events_topic] == topics[kafka.billing_topic] == 6 and topics[kafka.dlq_topic] == 1


def test_the_dlq_builders_match_a_record_built_by_hand():
    message = SimpleNamespace(value=b"\x00bad", topic="gateway-events", partition=2, offset=41)
    assert message_dlq_record(message, stage="decode", code="bad_avro", reason="truncated", schema_id=7,
                              first_seen_ms=5) == dlq_record(
        stage="decode", code="bad_avro", reason="truncated", original=b"\x00bad", topic="gateway-events",
        partition=2, offset=41, schema_id=7, first_seen_ms=5)
    event = {"event_id": "e-1", "request_id": "r-1", "source_partition": 2, "source_offset": 42}
    assert event_dlq_record(event, stage="window", code="late_event", reason="late", first_seen_ms=5) == dlq_record(
        stage="window", code="late_event", reason="late", original=None, topic=None, partition=2, offset=42,
        first_seen_ms=5, event_id="e-1", request_id="r-1")
    billed = event_dlq_record({"billing_id": "b-1"}, stage="sink", code="sink_rejected", reason="too large",
                              event_id="b-1", original=b"{}")
    assert billed["dlq_id"] == "sink:event:b-1" and billed["offset"] is None and billed["original_size"] == 2
    assert billed["first_seen_ms"] > 1_700_000_000_000


def test_unique_events_and_their_tokens_reach_the_prometheus_counters():
    from dataflows.outputs import first_sightings
    from ops import metrics

    def sample(counter, **labels) -> float:
        return counter.labels(**labels)._value.get() if labels else counter._value.get()

    model = "vocabulary-test-model"
    events = [{"model": model, "input_tokens": 10 * i, "output_tokens": i, "cache_read_tokens": 0,
               "cache_write_tokens": 1} for i in (1, 2, 3)]
    before = (sample(metrics.EVENTS, stage="unique"), sample(metrics.DEDUPE_DROPS),
              sample(metrics.TOKENS, model=model, kind="input"), sample(metrics.TOKENS, model=model, kind="output"),
              sample(metrics.TOKENS, model=model, kind="cache_write"))
    seen = [("b", (True, events[0])), ("b", (False, events[0])), ("c", (True, events[1])), ("c", (True, events[2]))]
    assert first_sightings(seen) == events
    after = (sample(metrics.EVENTS, stage="unique"), sample(metrics.DEDUPE_DROPS),
             sample(metrics.TOKENS, model=model, kind="input"), sample(metrics.TOKENS, model=model, kind="output"),
             sample(metrics.TOKENS, model=model, kind="cache_write"))
    assert [a - b for a, b in zip(after, before)] == [3, 1, 60, 6, 3]
