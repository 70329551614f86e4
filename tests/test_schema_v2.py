"""Gateway event v2 without servers: validation of the new fields, provider usage blocks,
pricing, and raw Parquet written before v2 (see test_schema_v2_flow.py for the stores)."""

from __future__ import annotations

import io
import json
import time
from decimal import Decimal

import fastavro
import pyarrow.parquet as pq
import pytest

from connectors.usage import usage_tokens
from ops.settings import PricingSettings, ValidationSettings
from schemas.codec import EventCodec, InvalidEvent, plain
from schemas.compat import compatibility
from schemas.registry import LocalRegistry
from sinks.billing import with_cost
from sinks.parquet import ARROW_SCHEMA, COLUMNS_SINCE, ParquetStore, to_table

NOW = int(time.time() * 1000)


def event(**fields) -> dict:
    return {"event_id": "e-1", "request_id": "r-1", "event_time": NOW, "user_id": "u-1", "org_id": "acme",
            "region": "eu", "model": "gpt-4o", "latency_ms": 10, "input_tokens": 100, "output_tokens": 500, **fields}


@pytest.fixture(scope="module")
def codec() -> EventCodec:
    return EventCodec(LocalRegistry(), ValidationSettings())


def test_a_json_event_without_the_new_fields_gets_their_defaults(codec):
    decoded = codec.decode(json.dumps(event()).encode(), NOW)
    assert (decoded["reasoning_tokens"], decoded["trace_id"], decoded["span_id"]) == (0, None, None)
    assert decoded["schema_version"] == 2


def test_trace_ids_are_stored_lower_case(codec):
    checked = codec.check(event(trace_id="4BF92F3577B34DA6A3CE929D0E0E4736", span_id="00F067AA0BA902B7"), NOW)
    assert (checked["trace_id"], checked["span_id"]) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")


@pytest.mark.parametrize("fields,code,field", [
    ({"trace_id": "4bf92f3577b34da6a3ce929d0e0e473"}, "bad_id", "trace_id"),        # 31 digits
    ({"trace_id": "4bf92f3577b34da6a3ce929d0e0e473g"}, "bad_id", "trace_id"),       # not hex
    ({"trace_id": "0" * 32}, "bad_id", "trace_id"),                                  # W3C invalid id
    ({"span_id": "alice@example.com"}, "bad_id", "span_id"),
    ({"span_id": "0" * 16}, "bad_id", "span_id"),
    ({"reasoning_tokens": 501}, "out_of_range", "reasoning_tokens"),                 # above output_tokens
    ({"reasoning_tokens": -1}, "out_of_range", "reasoning_tokens"),
    ({"reasoning_tokens": "12"}, "wrong_type", "reasoning_tokens"),
])
def test_bad_new_fields_are_rejected_naming_the_field_never_the_value(codec, fields, code, field):
    with pytest.raises(InvalidEvent) as caught:
        codec.decode(json.dumps(event(**fields)).encode(), NOW)
    assert caught.value.code == code and caught.value.reason.startswith(field)
    assert "alice" not in caught.value.reason


@pytest.mark.parametrize("provider,usage,expected", [
    ("openai", {"prompt_tokens": 1200, "completion_tokens": 80, "prompt_tokens_details": {"cached_tokens": 1024},
                "completion_tokens_details": {"reasoning_tokens": 30}}, (176, 80, 30)),
    ("openai", {"input_tokens": 300, "output_tokens": 900, "output_tokens_details": {"reasoning_tokens": 768}},
     (300, 900, 768)),
    ("google", {"promptTokenCount": 1000, "cachedContentTokenCount": 800, "candidatesTokenCount": 30,
                "thoughtsTokenCount": 70}, (200, 100, 70)),  # thoughts are beside candidates: added once
    ("anthropic", {"input_tokens": 20, "output_tokens": 400}, (20, 400, 0)),
    ("bedrock", {"inputTokens": 5, "outputTokens": 6}, (5, 6, 0)),
    ("openai", None, (0, 0, 0)),
])
def test_usage_blocks_give_reasoning_inside_output(provider, usage, expected, codec):
    counts = usage_tokens(usage, provider)
    assert (counts["input_tokens"], counts["output_tokens"], counts["reasoning_tokens"]) == expected
    codec.check(event(**counts), NOW)  # what the mapping gives is a valid event


def test_reasoning_is_priced_as_output_and_never_on_top():
    pricing = PricingSettings()
    price = pricing.models["gpt-4o"]
    codec = EventCodec(LocalRegistry(), ValidationSettings())
    plain, reasoning = (with_cost(codec.check(event(**fields), NOW), pricing)
                        for fields in ({}, {"reasoning_tokens": 400}))
    assert reasoning["cost_usd"] == plain["cost_usd"] == (100 * price.input + 500 * price.output) / Decimal(10**6)


def test_raw_parquet_written_before_v2_reads_with_the_defaults(tmp_path):
    store = ParquetStore(str(tmp_path))
    rows = [{**event(event_id=f"e-{i}"), "policy_flags": [], "safety_decisions": [], "pii_entity_counts": {}}
            for i in range(3)]
    old_table = to_table(rows).drop_columns(list(COLUMNS_SINCE))
    path = tmp_path / "event_date=2026-11-29" / "region=eu" / "part-old.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(old_table, path)
    table = store.read_file(str(path))
    assert table.schema == ARROW_SCHEMA
    assert table.column("reasoning_tokens").to_pylist() == [0, 0, 0]
    assert table.column("trace_id").to_pylist() == [None] * 3


def test_events_from_before_v2_get_zero_reasoning_in_the_sink_table():
    # e.g. events a flow held in its recovery snapshot across the upgrade
    table = to_table([event(), event(event_id="e-2", reasoning_tokens=7)])
    assert table.column("reasoning_tokens").to_pylist() == [0, 7]
    assert table.column("reasoning_tokens").null_count == 0


def test_v2_is_full_compatible_with_v1_and_only_adds_defaulted_fields():
    registry = LocalRegistry()
    v1, v2 = registry.entry("gateway_event", 1), registry.entry("gateway_event", 2)
    assert (v1.schema_id, v2.schema_id) == (1, 8)
    assert compatibility(v2.raw, v1.raw, "FULL") == []
    added = {f["name"]: f for f in v2.raw["fields"]}.keys() - {f["name"] for f in v1.raw["fields"]}
    assert added == set(COLUMNS_SINCE)
    assert all("default" in f for f in v2.raw["fields"] if f["name"] in added)


def test_a_consumer_still_on_v1_reads_v2_messages(codec):
    """FORWARD: a flow not yet upgraded reads the new producers' records (new fields dropped)."""
    body = codec.encode_plain(event(reasoning_tokens=400, trace_id="4bf92f3577b34da6a3ce929d0e0e4736"))
    reader = plain(LocalRegistry().by_id(1))
    record = fastavro.schemaless_reader(io.BytesIO(body), codec.reader.plain, reader)
    assert "reasoning_tokens" not in record and (record["output_tokens"], record["input_tokens"]) == (500, 100)
