"""The ingest dataflow end to end against real servers: a Kafka-protocol broker, Redis,
an S3 server for Parquet and ClickHouse (embedded chdb, the same engine as the server)."""

from __future__ import annotations

import os
import uuid
from collections import Counter

import pyarrow.compute as pc
import pytest
import redis
import s3fs
from bytewax.testing import run_main

from dataflows.ingest import build_flow
from ops.dev.demo import billing_totals, produce, read_dlq
from ops.dev.loadgen import generate
from ops.settings import load_settings
from schemas.codec import EventCodec
from schemas.pricing import with_cost
from schemas.registry import registry_from_settings
from sinks.clickhouse import ClickHouse
from sinks.parquet import ParquetStore
from sinks.quota import QuotaStore

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

COMPARED_FIELDS = ["request_id", "user_id", "org_id", "region", "model", "event_time", "latency_ms",
                   "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "status_code"]


@pytest.fixture(scope="module")
def pipeline_run(kafka_bootstrap, topic_factory, redis_url, s3_endpoint, tmp_path_factory):
    """Produce a mixed workload, run the flow until the topic is drained, return what to check."""
    redis.Redis.from_url(redis_url).flushdb()
    root = tmp_path_factory.mktemp("e2e")
    bucket = f"raw-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir(bucket)
    events_topic = topic_factory(partitions=3)
    dlq_topic = topic_factory(partitions=1)
    billing_topic, alerts_topic = topic_factory(partitions=1), topic_factory(partitions=1)
    settings = load_settings(environ={}, use_service_state=False, overrides={
        "kafka": {"bootstrap": kafka_bootstrap, "events_topic": events_topic, "dlq_topic": dlq_topic, "tail": False,
                  "billing_topic": billing_topic, "quota_alerts_topic": alerts_topic},
        "parquet": {"root": f"s3://{bucket}/raw", "s3_endpoint_url": s3_endpoint, "max_rows": 700},
        "clickhouse": {"url": f"chdb://{root / 'chdb'}", "database": "e2e"},
        "redis": {"url": redis_url},
    })
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    messages = generate(codec, 3000, dup_ratio=0.1, bad_ratio=0.05, users=40, seed=11, keep_events=True)
    expected = produce(kafka_bootstrap, events_topic, messages, 3000)
    run_main(build_flow(settings))
    return settings, expected, root


def test_parquet_on_s3_holds_every_valid_event_once_and_redacted(pipeline_run):
    settings, expected, _root = pipeline_run
    table = ParquetStore(settings.parquet.root, settings.parquet.s3_endpoint_url).read()
    ids = table.column("event_id").to_pylist()
    assert len(ids) == len(set(ids)) == expected.valid
    assert set(ids) == set(expected.events)
    for row in table.slice(0, 200).to_pylist():
        sent = expected.events[row["event_id"]]
        for name in COMPARED_FIELDS:
            got = row[name]
            if name == "event_time":
                got = int(got.timestamp() * 1000)
            assert got == sent[name], name
    texts = " ".join(filter(None, table.column("prompt").to_pylist() + table.column("response").to_pylist()))
    leaked = [value for value in expected.pii_values if value in texts]
    assert expected.pii_values and not leaked
    assert pc.sum(pc.list_value_length(table.column("policy_flags"))).as_py() > 0


def test_clickhouse_matches_the_produced_events(pipeline_run):
    settings, expected, _root = pipeline_run
    clickhouse = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    (rows, tokens), = clickhouse.rows(
        "SELECT count(), sum(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens) "
        "FROM e2e.events FINAL")
    assert (rows, tokens) == (expected.valid, expected.tokens)
    by_model = dict(clickhouse.rows("SELECT model, sum(requests) FROM e2e.daily_metrics GROUP BY model"))
    sent_by_model: dict[str, int] = {}
    for event in expected.events.values():
        sent_by_model[event["model"]] = sent_by_model.get(event["model"], 0) + 1
    assert by_model == sent_by_model
    pricing = settings.pricing
    (cost,), = clickhouse.rows("SELECT sum(cost_usd) FROM e2e.daily_metrics")
    assert cost == sum(with_cost(e, pricing)["cost_usd"] for e in expected.events.values())
    arms = dict(clickhouse.rows("SELECT arm, sum(requests) FROM e2e.experiment_metrics GROUP BY arm"))
    assert arms == dict(Counter(e["variant"] for e in expected.events.values() if e["experiment_id"]))
    flagged = dict(clickhouse.rows("SELECT flag, sum(requests) FROM e2e.policy_metrics GROUP BY flag"))
    assert flagged.get("pii_redacted", 0) > 0
    assert clickhouse.events_without_audit() == 0
    assert clickhouse.rows("SELECT count() FROM e2e.audit_log FINAL")[0][0] == expected.valid


def test_redis_quota_counters_match_to_the_token(pipeline_run):
    settings, expected, _root = pipeline_run
    store = QuotaStore(settings.redis.url)
    per_user: dict[str, dict[str, int]] = {}
    for event in expected.events.values():
        user = per_user.setdefault(f"{event['org_id']}/{event['user_id']}", {"requests": 0, "tokens": 0})
        user["requests"] += 1
        user["tokens"] += sum(event[f"{k}_tokens"] for k in ("input", "output", "cache_read", "cache_write"))
    some_event = next(iter(expected.events.values()))
    for user, want in list(per_user.items())[:10]:
        month = store.usage("user", user, some_event["event_time"])["month"]
        assert (month["requests"], month["tokens"]) == (want["requests"], want["tokens"]), user
    assert store.total_tokens("user") == expected.tokens
    assert store.total_tokens("org") == expected.tokens


def test_every_malformed_message_is_in_the_dlq_topic_with_its_reason(pipeline_run):
    settings, expected, root = pipeline_run
    records = read_dlq(settings.kafka.bootstrap, settings.kafka.dlq_topic, root / "dlq.jsonl")
    assert len(records) == expected.bad
    codes: dict[str, int] = {}
    for record in records:
        codes[record["code"]] = codes.get(record["code"], 0) + 1
    assert codes == expected.bad_kinds
    assert all(record["reason"] and record["stage"] == "decode" for record in records)
    assert all(record["topic"] == settings.kafka.events_topic and record["offset"] is not None for record in records)


def test_replaying_the_whole_topic_changes_no_counter(pipeline_run):
    """Run the flow again over the same topic with no memory of the first run (as after
    losing the recovery store, or resetting offsets): every store stays as it was."""
    settings, expected, root = pipeline_run
    clickhouse = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    store = QuotaStore(settings.redis.url)

    def counters():
        (rows, tokens), = clickhouse.rows(
            "SELECT count(), sum(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens) FROM e2e.events FINAL")
        daily = sorted(clickhouse.rows("SELECT day, model, sum(requests), sum(total_tokens) FROM e2e.daily_metrics "
                                       "GROUP BY day, model"))
        billed, _want = billing_totals(settings.kafka.bootstrap, settings.kafka.billing_topic, expected, settings)
        parquet = ParquetStore(settings.parquet.root, settings.parquet.s3_endpoint_url).read()
        return {"clickhouse": (rows, tokens), "daily": daily, "billed": billed,
                "quota": (store.total_tokens("user"), store.total_tokens("org")),
                "parquet_ids": len(pc.unique(parquet.column("event_id")))}

    before = counters()
    run_main(build_flow(settings))
    assert counters() == before
    assert before["quota"] == (expected.quota_tokens, expected.quota_tokens)


def test_clickhouse_reads_the_raw_parquet_back(pipeline_run):
    """ClickHouse's own Parquet reader (chdb's s3 table function) sees the same rows."""
    settings, expected, _root = pipeline_run
    bucket_path = settings.parquet.root.removeprefix("s3://")
    url = f"{settings.parquet.s3_endpoint_url}/{bucket_path}/**/*.parquet"
    clickhouse = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    (rows, tokens, users), = clickhouse.rows(
        f"SELECT count(DISTINCT event_id), sum(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens),"
        f" uniqExact(user_id) FROM (SELECT * FROM s3('{url}', '{os.environ['AWS_ACCESS_KEY_ID']}',"
        f" '{os.environ['AWS_SECRET_ACCESS_KEY']}', 'Parquet') LIMIT 1 BY event_id)")
    assert (rows, tokens) == (expected.valid, expected.tokens)
    assert users == len({e["user_id"] for e in expected.events.values()})


def test_no_original_pii_is_stored_anywhere(pipeline_run):
    """Every value of every ClickHouse table, every Redis key and value, the Parquet rows and
    the DLQ records hold none of the PII strings the generator put into prompts."""
    settings, expected, root = pipeline_run
    clickhouse = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    stored: list[str] = []
    for (table,) in clickhouse.rows(f"SELECT name FROM system.tables WHERE database = '{settings.clickhouse.database}'"):
        stored.append(repr(clickhouse.rows(f"SELECT * FROM {settings.clickhouse.database}.{table}")))
    client = redis.Redis.from_url(settings.redis.url)
    readers = {b"hash": client.hgetall, b"string": client.get, b"zset": lambda k: client.zrange(k, 0, -1),
               b"set": client.smembers, b"list": lambda k: client.lrange(k, 0, -1)}
    for key in client.scan_iter(count=1000):
        stored.append(repr((key, readers[client.type(key)](key))))
    stored.append(repr(ParquetStore(settings.parquet.root, settings.parquet.s3_endpoint_url).read().to_pylist()))
    read_dlq(settings.kafka.bootstrap, settings.kafka.dlq_topic, root / "dlq-pii.jsonl")
    stored.append((root / "dlq-pii.jsonl").read_text())
    everything = "\n".join(stored)
    assert len(expected.pii_values) > 50
    assert [value for value in expected.pii_values if value in everything] == []
