"""Issue 14 end to end: the fixed malformed corpus mixed with valid events, through the real
broker and the ingest flow. The flow exits cleanly, the DLQ holds exactly the malformed
inputs, every valid event reaches Parquet and ClickHouse, and no pattern PII value of any
input appears in the DLQ topic's bytes in any encoding. Among the malformed inputs, events
with an integer just outside its ClickHouse/Parquet column (generated from the migrated
columns): each is out_of_range in the DLQ, and no store or counter holds it wrapped."""

from __future__ import annotations

import random
import uuid

import pytest
import redis
import s3fs
from bytewax.testing import run_main
from confluent_kafka import Producer

from dataflows.ingest import build_flow
from ops.dev.demo import billing_totals
from ops.dev.loadgen import collect, generate
from ops.settings import load_settings
from schemas.codec import EventCodec
from schemas.dlq import decode_dlq
from schemas.registry import registry_from_settings
from sinks.clickhouse import ClickHouse
from sinks.kafka import produce_when_room, read_topic
from sinks.parquet import ParquetStore
from sinks.quota import QuotaStore
from tests.malformed import Malformed, leaked, load_corpus
from tests.test_stored_ranges import column_types, event_with, outside_values

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
VALID = 300
OUTSIDE = "outside its column: "
"""Name prefix of the generated events with an integer just outside its column."""


def _raw_values(bootstrap: str, topic: str) -> list[bytes]:
    """The topic's message values as they are on the broker, undecoded."""
    return [value for _partition, _offset, value in read_topic(bootstrap, topic, lambda value: value)]


@pytest.fixture(scope="module")
def fuzz_run(kafka_bootstrap, topic_factory, redis_url, s3_endpoint, tmp_path_factory):
    redis.Redis.from_url(redis_url).flushdb()
    root = tmp_path_factory.mktemp("fuzz")
    bucket = f"fuzz-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir(bucket)
    settings = load_settings(environ={}, use_service_state=False, overrides={
        "kafka": {"bootstrap": kafka_bootstrap, "events_topic": topic_factory(partitions=2),
                  "dlq_topic": topic_factory(), "tail": False, "billing_topic": topic_factory(),
                  "quota_alerts_topic": topic_factory()},
        "parquet": {"root": f"s3://{bucket}/raw", "s3_endpoint_url": s3_endpoint, "max_rows": 500},
        "clickhouse": {"url": f"chdb://{root / 'chdb'}", "database": "fuzz"},
        "redis": {"url": redis_url},
        "dlq": {"spool_path": str(root / "spool.jsonl")},
    })
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    valid, expected = collect(generate(codec, VALID, dup_ratio=0, bad_ratio=0, pii_ratio=0.5, users=20, seed=14,
                                       keep_events=True))
    malformed = [item for item in load_corpus() if item.flow]
    clickhouse = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    clickhouse.migrate()
    poison = [Malformed(f"{OUTSIDE}{name}={value}", "out_of_range", codec.encode(event_with(
                  name, value, event_id=f"poison-{index}", user_id="poison-user", prompt=None, response=None)), (), True)
              for index, (name, value) in enumerate(outside_values(column_types(clickhouse, "events")))]
    malformed += poison
    messages = [(key, value) for key, value in valid] + [(None, item.value) for item in malformed]
    random.Random(14).shuffle(messages)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 1_048_576})
    failures: list[str] = []
    for key, value in messages:
        produce_when_room(producer, settings.kafka.events_topic, value, key,
                          lambda err, _m: err and failures.append(str(err)))
    assert producer.flush(60) == 0 and not failures, failures[:3]
    run_main(build_flow(settings))  # returns only once the topic is drained: the flow exited cleanly
    return settings, expected, malformed, root


def test_integers_outside_their_columns_are_out_of_range_and_stored_nowhere(fuzz_run):
    settings, expected, malformed, _root = fuzz_run
    records = [decode_dlq(value) for value in _raw_values(settings.kafka.bootstrap, settings.kafka.dlq_topic)]
    poison = [item.name[len(OUTSIDE):].split("=") for item in malformed if item.name.startswith(OUTSIDE)]
    assert len(poison) >= 5
    for name, value in poison:
        found = [record for record in records if record["reason"].startswith(f"{name} is {value}")]
        assert [record["code"] for record in found] == ["out_of_range"], (name, value)
    clickhouse = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    (stored, users), = clickhouse.rows("SELECT countIf(event_id LIKE 'poison-%'), countIf(user_id = 'poison-user') "
                                       "FROM fuzz.events")
    assert (stored, users) == (0, 0)
    table = ParquetStore(settings.parquet.root, settings.parquet.s3_endpoint_url).read()
    assert "poison-user" not in table.column("user_id").to_pylist()
    assert QuotaStore(settings.redis.url).total_tokens("user") == expected.tokens
    billed, owed = billing_totals(settings.kafka.bootstrap, settings.kafka.billing_topic, expected, settings)
    assert billed == owed


def test_the_dlq_holds_exactly_the_malformed_inputs(fuzz_run):
    settings, _expected, malformed, root = fuzz_run
    records = [decode_dlq(value) for value in _raw_values(settings.kafka.bootstrap, settings.kafka.dlq_topic)]
    assert len(records) == len(malformed)
    assert all(r["stage"] == "decode" and r["reason"] and (r["payload_redacted"] or r["text_withheld"])
               for r in records)
    assert not (root / "spool.jsonl").exists()


def test_every_valid_event_is_in_parquet_and_clickhouse(fuzz_run):
    settings, expected, _malformed, _root = fuzz_run
    table = ParquetStore(settings.parquet.root, settings.parquet.s3_endpoint_url).read()
    assert sorted(table.column("event_id").to_pylist()) == sorted(expected.events)
    clickhouse = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    (rows,), = clickhouse.rows("SELECT count() FROM fuzz.events FINAL")
    assert rows == len(expected.events) == VALID


def test_no_pii_value_reaches_the_dlq_topic_in_any_encoding(fuzz_run):
    settings, expected, malformed, _root = fuzz_run
    values = sorted({value for item in malformed for value in item.pii} | set(expected.pii_values))
    assert len(values) >= 10
    dlq = b"\n".join(_raw_values(settings.kafka.bootstrap, settings.kafka.dlq_topic))
    assert not leaked(values, dlq)
