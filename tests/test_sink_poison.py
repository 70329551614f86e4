"""Issue 14, sink side, against the real broker: a row refused for good goes to the DLQ and
the sink carries on (no retry loop); a DLQ record the broker refuses goes to the spool."""

from __future__ import annotations

import datetime
import json
import threading
import time
import uuid

import pytest

from dataflows.outputs import billing_writer, clickhouse_writer, database_of, dead_letters, parquet_writer
from ops import metrics
from ops.dev import services as svc
from ops.settings import load_settings
from schemas.records import decode_billing_event, encode_billing_event
from schemas.dlq import decode_dlq, dlq_record
from schemas.pricing import with_cost
from sinks.billing import billing_event
from sinks.kafka import TopicWriter, read_topic
from sinks.clickhouse import ClickHouse, ClickHouseWriter, refused_for_good
from sinks.dlq import DeadLetters
from sinks.parquet import ParquetStore, partition_of
from sinks.retry import write_with_retries
from tests.test_codec import event
from tests.test_quota import total


def _settings(kafka_bootstrap, topic_factory, tmp_path, **kafka):
    return load_settings(environ={}, use_service_state=False, overrides={
        "kafka": {"bootstrap": kafka_bootstrap, "dlq_topic": topic_factory(), "billing_topic": topic_factory(),
                  **kafka},
        "retry": {"initial_backoff_s": 0.05, "max_backoff_s": 0.2},
        "dlq": {"spool_path": str(tmp_path / "spool.jsonl"), "max_original_bytes": 4096}})


def _within(seconds: float, work) -> None:
    """Run work() in a thread; fail (instead of hanging the suite) if it retries forever."""
    errors: list[BaseException] = []

    def run():
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still retrying after {seconds} s"
    assert not errors, errors


def _counter(counter, **labels) -> float:
    return counter.labels(**labels)._value.get()


def test_a_billing_row_over_the_message_limit_goes_to_the_dlq_and_billing_carries_on(
        kafka_bootstrap, topic_factory, tmp_path):
    settings = _settings(kafka_bootstrap, topic_factory, tmp_path)
    write = billing_writer(settings)
    huge = total(1, input=10, user="u" * 600_000)
    normal = [total(1, input=5, user=f"user-{i}") for i in range(3)]
    before = _counter(metrics.SINK_REJECTED, sink="billing", code="kafka_rejected")
    _within(60, lambda: write([[normal[0], huge], normal[1:]]))
    billed = [record for _p, _o, record in read_topic(kafka_bootstrap, settings.kafka.billing_topic,
                                                       decode_billing_event, timeout_s=20)]
    assert sorted(b["user_id"] for b in billed) == ["user-0", "user-1", "user-2"]
    dead = [record for _p, _o, record in read_topic(kafka_bootstrap, settings.kafka.dlq_topic, decode_dlq,
                                                    timeout_s=20)]
    assert len(dead) == 1 and dead[0]["code"] == "sink_rejected" and dead[0]["stage"] == "sink"
    assert "billing" in dead[0]["reason"] and dead[0]["original_truncated"] is True
    assert dead[0]["original_size"] > 600_000 and len(dead[0]["original"]) <= 4096
    assert _counter(metrics.SINK_REJECTED, sink="billing", code="kafka_rejected") == before + 1


def test_a_row_the_encoder_refuses_is_rejected_not_retried(kafka_bootstrap, topic_factory):
    writer = TopicWriter(kafka_bootstrap, topic_factory(), encode_billing_event, "billing_id")
    good = billing_event(total(1, input=5), load_settings(environ={}, use_service_state=False).pricing)
    bad = {**good, "billing_id": "b\ud800", "version": 2**40}
    rejected = writer.send([good, bad])
    assert [r.record for r in rejected] == [bad] and rejected[0].code in ("out_of_range", "bad_text", "encode_error")
    assert "\ud800" not in rejected[0].reason


def test_a_dlq_record_the_broker_refuses_goes_to_the_spool_with_an_alert(kafka_bootstrap, topic_factory, tmp_path):
    # The producer's own size limit at its minimum stands in for a broker that refuses.
    settings = _settings(kafka_bootstrap, topic_factory, tmp_path, extra={"message.max.bytes": "1000"})
    small = dlq_record(stage="decode", code="bad_json", reason="not JSON", original=None, topic="t", partition=0,
                       offset=1, first_seen_ms=1)
    large = {**dlq_record(stage="decode", code="bad_json", reason="not JSON", original=b"x" * 3000, topic="t",
                          partition=0, offset=2, first_seen_ms=1), "payload_redacted": True}
    before = _counter(metrics.DLQ_SPOOLED, code="bad_json")
    _within(60, lambda: dead_letters(settings).send([small, large]))
    on_topic = [record for _p, _o, record in read_topic(kafka_bootstrap, settings.kafka.dlq_topic, decode_dlq,
                                                        timeout_s=20)]
    assert [r["offset"] for r in on_topic] == [1]
    spooled = [json.loads(line) for line in (tmp_path / "spool.jsonl").read_text().splitlines()]
    assert [r["offset"] for r in spooled] == [2] and "spool_reason" in spooled[0]
    assert _counter(metrics.DLQ_SPOOLED, code="bad_json") == before + 1


def test_an_unredacted_original_never_reaches_the_spool(kafka_bootstrap, topic_factory, tmp_path):
    settings = _settings(kafka_bootstrap, topic_factory, tmp_path, extra={"message.max.bytes": "1000"})
    secret = "alice.smith@example.com " * 100
    record = {**dlq_record(stage="decode", code="bad_json", reason="x" * 1500, original=secret.encode(), topic="t",
                           partition=0, offset=3, first_seen_ms=1)}
    _within(60, lambda: dead_letters(settings).send([record]))
    assert "alice" not in (tmp_path / "spool.jsonl").read_text()


def test_parquet_and_clickhouse_write_the_good_rows_and_dead_letter_the_one_they_refuse(
        kafka_bootstrap, topic_factory, tmp_path):
    settings = _settings(kafka_bootstrap, topic_factory, tmp_path)
    settings = settings.model_copy(update={
        "parquet": settings.parquet.model_copy(update={"root": str(tmp_path / "raw")}),
        "clickhouse": settings.clickhouse.model_copy(update={"url": f"chdb://{tmp_path / 'chdb'}",
                                                             "database": "poison"})})
    # Recent: raw ClickHouse rows older than retention.raw_days are dropped by the table TTL.
    now_ms = int(time.time() * 1000)
    rows = [with_cost({**event(event_id=f"e-{i}", request_id=f"r-{i}", event_time=now_ms - 1000),
                       "classification": "internal", "source_partition": 0, "source_offset": i},
                      settings.pricing) for i in range(5)]
    rows[3]["latency_ms"] = 2**40  # no Avro int, no UInt32 column: Arrow refuses the row
    _within(60, lambda: parquet_writer(settings)([(partition_of(rows[0]), rows)]))
    _within(60, lambda: clickhouse_writer(settings)([(database_of(settings, rows[0]), rows)]))
    stored = ParquetStore(settings.parquet.root).read().column("event_id").to_pylist()
    assert sorted(stored) == ["e-0", "e-1", "e-2", "e-4"]
    (count,), = ClickHouse(settings.clickhouse.url, "poison").rows("SELECT count() FROM poison.events FINAL")
    assert count == 4
    dead = [record for _p, _o, record in read_topic(kafka_bootstrap, settings.kafka.dlq_topic, decode_dlq,
                                                    timeout_s=20)]
    assert sorted((r["stage"], r["code"], r["event_id"]) for r in dead) == [
        ("sink", "sink_rejected", "e-3"), ("sink", "sink_rejected", "e-3")]
    assert {r["reason"].split(" ")[0] for r in dead} == {"parquet", "clickhouse"}


def _server_events(settings, count: int) -> list[dict]:
    now_ms = int(time.time() * 1000)
    # As the flow writes them: classified and counted by the redactor (no NULL in a String column).
    return [with_cost({**event(event_id=f"e-{i}", request_id=f"r-{i}", event_time=now_ms - 1000),
                       "classification": "internal", "pii_entity_counts": {}, "source_partition": 0,
                       "source_offset": i}, settings.pricing) for i in range(count)]


def test_a_clickhouse_server_dead_letters_the_rows_its_columns_cannot_hold_and_writes_the_rest(
        kafka_bootstrap, topic_factory, clickhouse_url, tmp_path):
    settings = _settings(kafka_bootstrap, topic_factory, tmp_path)
    settings = settings.model_copy(update={"clickhouse": settings.clickhouse.model_copy(update={"url": clickhouse_url})})
    database = f"poison_{uuid.uuid4().hex[:8]}"
    ClickHouse(clickhouse_url, database).migrate()
    rows = _server_events(settings, 6)
    # Both pass Arrow (int32 columns) and only the server's column types refuse them.
    rows[1]["status_code"] = 70_000  # UInt16
    rows[4]["latency_ms"] = -1       # UInt32
    before = _counter(metrics.SINK_REJECTED, sink="clickhouse", code="row_rejected")
    _within(60, lambda: clickhouse_writer(settings)([(database, rows)]))
    stored = ClickHouse(clickhouse_url, database).rows(f"SELECT event_id FROM {database}.events FINAL")
    assert sorted(event_id for (event_id,) in stored) == ["e-0", "e-2", "e-3", "e-5"]
    dead = [record for _p, _o, record in read_topic(kafka_bootstrap, settings.kafka.dlq_topic, decode_dlq,
                                                    timeout_s=20)]
    assert sorted(r["event_id"] for r in dead) == ["e-1", "e-4"]
    assert all(r["code"] == "sink_rejected" and r["reason"].startswith("clickhouse") for r in dead)
    assert _counter(metrics.SINK_REJECTED, sink="clickhouse", code="row_rejected") == before + 2


def _raised(work) -> BaseException:
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - the exception is what the test looks at
        return exc
    raise AssertionError("expected the server to refuse")


def test_the_servers_own_errors_are_classified_bad_data_or_outage(clickhouse_url):
    from clickhouse_driver import Client
    from urllib.parse import urlparse

    address = urlparse(clickhouse_url)
    client = Client(host=address.hostname, port=address.port, user=address.username or "default",
                    password=address.password or "")
    database = f"classify_{uuid.uuid4().hex[:8]}"
    client.execute(f"CREATE DATABASE {database}")
    client.execute(f"CREATE TABLE {database}.t (n UInt32, code FixedString(4), at DateTime) "
                   f"ENGINE = MergeTree ORDER BY n")
    insert = f"INSERT INTO {database}.t (n, code, at) VALUES"
    at = datetime.datetime(2026, 1, 1)
    bad_data = {
        "UInt32 given 2^40": _raised(lambda: client.execute(insert, [[2**40], ["ab"], [at]], columnar=True)),
        "FixedString too long": _raised(lambda: client.execute(insert, [[1], ["abcdefgh"], [at]], columnar=True)),
        "DateTime out of range": _raised(lambda: client.execute(
            insert, [[1], ["ab"], [datetime.datetime(2200, 1, 1)]], columnar=True)),
        "too long, converted by the server": _raised(lambda: client.execute(
            f"INSERT INTO {database}.t SELECT 1, 'abcdefgh', now()")),
        "text that is no number": _raised(lambda: client.execute("SELECT toUInt32('twelve')")),
    }
    outages = {
        "table missing": _raised(lambda: client.execute(f"INSERT INTO {database}.nope (n) VALUES", [[1]],
                                                        columnar=True)),
        "memory limit": _raised(lambda: client.execute(
            "SELECT length(groupArray(number)) FROM numbers(10000000)", settings={"max_memory_usage": 1_000_000})),
        "server down": _raised(lambda: Client(host="127.0.0.1", port=svc.free_port(), connect_timeout=1)
                               .execute("SELECT 1")),
    }
    assert {name: refused_for_good(exc) for name, exc in bad_data.items()} == dict.fromkeys(bad_data, True)
    assert {name: refused_for_good(exc) for name, exc in outages.items()} == dict.fromkeys(outages, False)
    assert outages["memory limit"].code == 241  # the server's MEMORY_LIMIT_EXCEEDED, not a guess
    client.execute(f"DROP DATABASE {database}")


def test_a_clickhouse_outage_is_retried_and_nothing_is_dead_lettered(tmp_path):
    def no_dlq():
        raise AssertionError("an outage must not dead-letter rows")

    attempts = []

    def counting_retry(sink, write, **options):
        def counted():
            attempts.append(sink)
            return write()
        return write_with_retries(sink, counted, initial_backoff_s=0.01, max_backoff_s=0.02, max_attempts=3,
                                  **options)

    settings = load_settings(environ={}, use_service_state=False)
    writer = ClickHouseWriter(f"clickhouse://127.0.0.1:{svc.free_port()}", counting_retry,
                              DeadLetters(no_dlq, counting_retry, 4096, str(tmp_path / "spool.jsonl")),
                              raw_days=30, aggregate_days=365, aggregate_interval_s=60, lateness_s=0)
    from clickhouse_driver.errors import NetworkError

    with pytest.raises(NetworkError):
        writer([("nowhere", _server_events(settings, 2))])
    # One call opens the client, then the whole batch is retried until the attempts run out:
    # never halved into single rows for the DLQ.
    assert len(attempts) == 1 + 3
