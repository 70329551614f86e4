"""Gateway event v2 (reasoning tokens, trace context) through the real broker, the unchanged
ingest flow and every store, beside events of producers still built against v1 in the
same topic: nothing of v1 breaks, reasoning tokens are counted once (inside output) in
ClickHouse, Redis quotas and billing, and the trace ids are stored."""

from __future__ import annotations

import json
import shutil
import time
from decimal import Decimal

import pytest
import redis
from bytewax.testing import run_main

from connectors.producer import EventProducer
from dataflows.ingest import build_flow
from ops.settings import load_settings
from schemas.records import decode_billing_event
from schemas.registry import SCHEMA_DIR, LocalRegistry
from sinks.clickhouse import ClickHouse
from sinks.kafka import read_topic
from sinks.parquet import ParquetStore
from sinks.quota import QuotaStore

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MODEL = "gpt-4o-mini"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _v1_registry(root) -> LocalRegistry:
    """The schema directory a gateway built before v2 ships: gateway_event v1 only."""
    directory = root / "schemas-v1"
    directory.mkdir()
    shutil.copy(SCHEMA_DIR / "gateway_event.v1.avsc", directory)
    (directory / "ids.json").write_text(json.dumps({"gateway_event.v1": 1}))
    return LocalRegistry(directory)


def _event(i: int, version: int, **fields) -> dict:
    return {"event_id": f"v{version}-{i}", "request_id": f"r-{version}-{i}", "event_time": int(time.time() * 1000),
            "user_id": f"u-{i % 2}", "org_id": "acme", "region": "eu", "provider": "openai", "model": MODEL,
            "latency_ms": 40, "input_tokens": 100, "output_tokens": 500, "cache_read_tokens": 50, **fields}


@pytest.fixture(scope="module")
def mixed_run(kafka_bootstrap, topic_factory, redis_url, tmp_path_factory):
    redis.Redis.from_url(redis_url).flushdb()
    root = tmp_path_factory.mktemp("schema-v2")
    topics = {name: topic_factory(partitions=2 if name == "events_topic" else 1, prefix=f"v2-{name[:5]}")
              for name in ("events_topic", "dlq_topic", "billing_topic", "quota_alerts_topic")}
    old = [_event(i, 1) for i in range(6)]
    new = [_event(i, 2, reasoning_tokens=400, trace_id=TRACE, span_id=f"{i + 1:016x}") for i in range(6)]
    with EventProducer(kafka_bootstrap, topics["events_topic"], _v1_registry(root), root / "spool-v1") as v1, \
            EventProducer(kafka_bootstrap, topics["events_topic"], LocalRegistry(), root / "spool-v2") as v2:
        assert (v1.codec.schema_id, v2.codec.schema_id) == (1, 8)
        for old_event, new_event in zip(old, new):  # interleaved: one topic, both versions
            v1.send(old_event)
            v2.send(new_event)
    settings = load_settings(environ={}, use_service_state=False, overrides={
        "kafka": {"bootstrap": kafka_bootstrap, "tail": False, **topics},
        "parquet": {"root": str(root / "raw")},
        "clickhouse": {"url": f"chdb://{root / 'chdb'}", "database": "schema_v2"},
        "redis": {"url": redis_url},
    })
    run_main(build_flow(settings))
    return settings, old, new


def test_clickhouse_rows_of_both_versions_with_reasoning_and_trace_apart(mixed_run):
    settings, old, new = mixed_run
    clickhouse = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    rows = {row[0]: row[1:] for row in clickhouse.rows(
        "SELECT event_id, schema_version, output_tokens, reasoning_tokens, trace_id, span_id, cost_usd "
        "FROM schema_v2.events FINAL")}
    assert set(rows) == {e["event_id"] for e in old + new}
    price = settings.pricing.models[MODEL]
    # 100 input, 50 cache reads and 500 output tokens; the 400 reasoning ones are inside the 500.
    cost = (100 * price.input + 500 * price.output + 50 * price.cache_read) / Decimal(1_000_000)
    for event in old:
        assert rows[event["event_id"]] == (1, 500, 0, None, None, cost)
    for event in new:
        assert rows[event["event_id"]] == (2, 500, 400, TRACE, event["span_id"], cost)
    # The aggregates that outlive raw rows keep reasoning apart too (the flow refreshed them).
    for table in ("usage_hourly", "usage_daily"):
        (output, reasoning), = clickhouse.rows(
            f"SELECT sum(output_tokens), sum(reasoning_tokens) FROM schema_v2.{table} FINAL")
        assert (output, reasoning) == (500 * len(old + new), 400 * len(new)), table


def test_quota_counts_reasoning_once_as_output(mixed_run):
    settings, old, new = mixed_run
    store = QuotaStore(settings.redis.url)
    per_event = 100 + 500 + 50  # reasoning is part of the 500 output tokens, never added
    assert store.total_tokens("user") == store.total_tokens("org") == per_event * len(old + new)
    month = store.usage("user", "acme/u-0", new[0]["event_time"])["month"]
    assert (month["requests"], month["tokens"]) == (6, per_event * 6)


def test_billing_prices_reasoning_as_output(mixed_run):
    settings, old, new = mixed_run
    billed = [record for _p, _o, record in read_topic(settings.kafka.bootstrap, settings.kafka.billing_topic,
                                                      decode_billing_event)]
    latest: dict[str, dict] = {}
    for record in billed:
        if record["billing_id"] not in latest or record["version"] > latest[record["billing_id"]]["version"]:
            latest[record["billing_id"]] = record
    price = settings.pricing.models[MODEL]
    assert sum(r["output_tokens"] for r in latest.values()) == 500 * len(old + new)
    total = sum((Decimal(r["cost_usd"]) for r in latest.values()), Decimal(0))
    assert total == len(old + new) * (100 * price.input + 500 * price.output + 50 * price.cache_read) / 1_000_000


def test_raw_parquet_keeps_the_new_fields(mixed_run):
    settings, old, new = mixed_run
    rows = {row["event_id"]: row for row in ParquetStore(settings.parquet.root).read().to_pylist()}
    assert {(rows[e["event_id"]]["reasoning_tokens"], rows[e["event_id"]]["trace_id"]) for e in old} == {(0, None)}
    assert [(rows[e["event_id"]]["reasoning_tokens"], rows[e["event_id"]]["span_id"]) for e in new] == [
        (400, e["span_id"]) for e in new]
