"""Issue 14, sink side, against the real broker: a row refused for good goes to the DLQ and
the sink carries on (no retry loop); a DLQ record the broker refuses goes to the spool."""

from __future__ import annotations

import json
import threading
import time

import pytest

from dataflows.outputs import billing_writer, clickhouse_writer, database_of, dead_letters, parquet_writer
from ops import metrics
from ops.settings import load_settings
from schemas.records import decode_billing_event, encode_billing_event
from schemas.dlq import decode_dlq, dlq_record
from schemas.pricing import with_cost
from sinks.billing import billing_event
from sinks.kafka import TopicWriter, read_topic
from sinks.clickhouse import ClickHouse
from sinks.parquet import ParquetStore, partition_of
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
                       "source_partition": 0, "source_offset": i},
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
