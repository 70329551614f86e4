"""The ingest dataflow: Kafka gateway events -> validated, redacted, deduplicated events
-> raw Parquet, ClickHouse, per-user quota counters in Redis; bad input -> DLQ topic.

Run it with `gatewatch run ingest` or `python -m bytewax.run dataflows.ingest:flow`; the
settings come from the environment (see ops/settings.py).
"""

from __future__ import annotations

import atexit
import os
import time
from functools import partial
from typing import Any, Callable

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaError, KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END

from dataflows.state import Batcher, DedupeLogic, SeenIds, UserWindows, WindowLogic, bucket_of
from ops import metrics
from ops.logs import configure as configure_logs
from ops.logs import get_logger
from ops.settings import Settings, load_settings
from redaction import RedactionError, Redactor
from schemas.codec import EventCodec, InvalidEvent
from schemas.dlq import dlq_record, encode_dlq
from schemas.registry import registry_from_settings
from sinks.clickhouse import ClickHouse
from sinks.kafka import TopicWriter
from sinks.parquet import ParquetStore, partition_of
from sinks.quota import TOKEN_KINDS, QuotaStore
from sinks.retry import write_with_retries

log = get_logger(__name__)
OK, DLQ = "ok", "dlq"


# -- steps: plain functions over batches, called by the flow and by tests -----------------

def decode_batch(codec: EventCodec, messages: list) -> list[tuple[str, dict]]:
    """Kafka messages -> ("ok", event) or ("dlq", record); the event remembers its source."""
    now_ms = int(time.time() * 1000)
    out = []
    for msg in messages:
        if isinstance(msg, KafkaError):
            source = msg.msg
            out.append((DLQ, dlq_record(
                stage="consume", code="kafka_error", reason=str(msg.err), original=source.value,
                topic=source.topic, partition=source.partition, offset=source.offset, first_seen_ms=now_ms)))
            continue
        try:
            event = codec.decode(msg.value, now_ms)
        except InvalidEvent as exc:
            out.append((DLQ, dlq_record(
                stage="decode", code=exc.code, reason=exc.reason, original=msg.value, topic=msg.topic,
                partition=msg.partition, offset=msg.offset, schema_id=exc.schema_id, first_seen_ms=now_ms)))
            continue
        event["source_partition"] = msg.partition
        event["source_offset"] = msg.offset
        out.append((OK, event))
    metrics.EVENTS.labels(stage="decoded").inc(sum(1 for kind, _ in out if kind == OK))
    return out


def redact_bytes(redactor: Redactor, data: bytes | None) -> bytes | None:
    """Undecodable input may still hold PII: redact it as latin-1 text, which maps every
    byte to one character, so the bytes around a redacted span survive unchanged."""
    if data is None:
        return None
    return redactor.redact(data.decode("latin-1")).text.encode("latin-1", errors="replace")


def redact_dlq_payload(redactor: Redactor, record: dict) -> dict:
    try:
        return {**record, "original": redact_bytes(redactor, record.get("original")), "payload_redacted": True}
    except RedactionError:
        return {**record, "original": None, "text_withheld": True}


def redact_batch(redactor: Redactor, events: list[dict]) -> list[tuple[str, dict]]:
    """Redact prompts and responses; an event that cannot be redacted goes to the DLQ
    without its text (fail closed)."""
    started = time.perf_counter()
    results = redactor.redact_events(events)
    metrics.REDACTION_SECONDS.observe(time.perf_counter() - started)
    out = []
    now_ms = int(time.time() * 1000)
    for event, result in zip(events, results):
        if isinstance(result, RedactionError):
            out.append((DLQ, dlq_record(
                stage="redact", code="redaction_failed", reason=str(result), original=None,
                topic=None, partition=event["source_partition"], offset=event["source_offset"],
                first_seen_ms=now_ms, event_id=event["event_id"], request_id=event["request_id"])))
            continue
        for entity, count in result.get("pii_entity_counts", {}).items():
            metrics.PII_ENTITIES.labels(entity=entity).inc(count)
        out.append((OK, result))
    return out


def count_unique(event: dict) -> dict:
    metrics.EVENTS.labels(stage="unique").inc()
    for kind in TOKEN_KINDS:
        metrics.TOKENS.labels(model=event["model"], kind=kind).inc(event[f"{kind}_tokens"])
    return event


def late_to_dlq(event: dict) -> dict:
    metrics.LATE_EVENTS.labels(policy="dlq").inc()
    return dlq_record(
        stage="window", code="late_event",
        reason="event_time is older than the allowed lateness of the user's newest event",
        original=None, topic=None, partition=event["source_partition"], offset=event["source_offset"],
        first_seen_ms=int(time.time() * 1000), event_id=event["event_id"], request_id=event["request_id"])


# -- sinks: Bytewax shells over the writers in sinks/ -------------------------------------

class _WriterPartition(StatelessSinkPartition):
    def __init__(self, write: Callable[[list], Any]):
        self._write = write

    def write_batch(self, items: list) -> None:
        self._write(items)


class WriterSink(DynamicSink):
    """Builds its writer inside each worker, so connections are never pickled or shared."""

    def __init__(self, make_write: Callable[[], Callable[[list], Any]]):
        self._make_write = make_write

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _WriterPartition:
        return _WriterPartition(self._make_write())


def parquet_writer(settings: Settings):
    store = ParquetStore(settings.parquet.root, settings.parquet.s3_endpoint_url, settings.parquet.compression)

    def write(batches: list[tuple[str, list[dict]]]) -> None:
        for partition, events in batches:
            write_with_retries("parquet", lambda: store.write(partition, events))
            metrics.SINK_ROWS.labels(sink="parquet").inc(len(events))
    return write


def clickhouse_writer(settings: Settings):
    client = write_with_retries("clickhouse", lambda: ClickHouse(settings.clickhouse.url, settings.clickhouse.database))
    if client.embedded:
        # Nobody else can reach an embedded database to migrate it.
        client.migrate()

    def write(batches: list[tuple[str, list[dict]]]) -> None:
        for _key, events in batches:
            write_with_retries("clickhouse", lambda: client.insert_events(events))
            metrics.SINK_ROWS.labels(sink="clickhouse").inc(len(events))
            now = time.time()
            for event in events:
                metrics.FRESHNESS_SECONDS.labels(sink="clickhouse").observe(max(0.0, now - event["event_time"] / 1000))
    return write


def quota_writer(settings: Settings):
    store = QuotaStore(settings.redis.url)

    def write(items: list[tuple[str, list[dict]]]) -> None:
        totals = [total for _key, batch in items for total in batch]
        write_with_retries("quota", lambda: store.apply(totals))
        metrics.SINK_ROWS.labels(sink="quota").inc(len(totals))
    return write


def dlq_writer(settings: Settings):
    producer = TopicWriter(settings.kafka.bootstrap, settings.kafka.dlq_topic, encode_dlq, "event_id",
                           settings.kafka.extra)

    def write(records: list[dict]) -> None:
        write_with_retries("dlq", lambda: producer.send(records))
        for record in records:
            metrics.DLQ_RECORDS.labels(stage=record["stage"], code=record["code"]).inc()
    return write


# -- the flow ---------------------------------------------------------------------------

def build_flow(settings: Settings | None = None) -> Dataflow:
    settings = settings or load_settings()
    configure_logs(settings.log_level)
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    redactor = Redactor(settings.redaction)
    sinks = set(settings.sinks)

    flow = Dataflow("gatewatch_ingest")
    source = KafkaSource(
        settings.kafka.brokers, [settings.kafka.events_topic], tail=settings.kafka.tail,
        starting_offset=OFFSET_BEGINNING if settings.kafka.starting_offset == "earliest" else OFFSET_END,
        add_config=settings.kafka.extra, batch_size=settings.kafka.batch_size, raise_on_errors=False)
    messages = op.input("kafka_in", flow, source)

    decoded = op.branch("is_decoded", op.flat_map_batch("decode", messages, partial(decode_batch, codec)),
                        lambda routed: routed[0] == OK)
    events = op.map("decoded_event", decoded.trues, lambda routed: routed[1])
    redacted = op.branch("is_redacted", op.flat_map_batch("redact", events, partial(redact_batch, redactor)),
                         lambda routed: routed[0] == OK)
    clean = op.map("redacted_event", redacted.trues, lambda routed: routed[1])

    buckets = settings.dedupe.buckets
    by_event_id = op.key_on("by_event_id", clean, lambda e: bucket_of(f"{e['org_id']}/{e['event_id']}", buckets))
    seen = op.stateful_batch("dedupe", by_event_id,
                             lambda resume: DedupeLogic(resume or SeenIds(settings.dedupe.horizon_s)))

    def first_only(item: tuple[str, tuple[bool, dict]]) -> dict | None:
        first, event = item[1]
        if first:
            return count_unique(event)
        metrics.DEDUPE_DROPS.inc()
        return None

    unique = op.filter_map("drop_duplicates", seen, first_only)

    dlq_streams = [
        op.map("redact_undecodable", op.map("decode_dlq", decoded.falses, lambda r: r[1]),
               partial(redact_dlq_payload, redactor)),
        op.map("redact_dlq", redacted.falses, lambda routed: routed[1]),
    ]

    if "parquet" in sinks:
        batches = op.stateful("parquet_batches", op.key_on("by_partition", unique, partition_of),
                              lambda resume: Batcher(settings.parquet.max_rows, settings.parquet.max_age_s, resume))
        op.output("parquet_out", batches, WriterSink(partial(parquet_writer, settings)))
    if "clickhouse" in sinks:
        batches = op.stateful("clickhouse_batches", op.key_on("one_table", unique, lambda _e: "events"),
                              lambda resume: Batcher(settings.clickhouse.max_rows, settings.clickhouse.max_age_s, resume))
        op.output("clickhouse_out", batches, WriterSink(partial(clickhouse_writer, settings)))
    if "quota" in sinks:
        windows = settings.windows

        def build_windows(resume: UserWindows | None) -> WindowLogic:
            state = resume or UserWindows(int(windows.length_s * 1000), int(windows.allowed_lateness_s * 1000),
                                          windows.late_policy)
            return WindowLogic(state, windows.flush_interval_s,
                               idle_s=windows.allowed_lateness_s + windows.length_s + windows.flush_interval_s)

        by_user = op.key_on("by_user", unique, lambda e: bucket_of(f"{e['org_id']}/{e['user_id']}", buckets))
        outputs = op.key_rm("window_out", op.stateful_batch("windows", by_user, build_windows))
        late_or_totals = op.branch("is_late", outputs, lambda out: out[0] == "late")
        dlq_streams.append(op.map("late_dlq", late_or_totals.trues, lambda out: late_to_dlq(out[1])))
        op.output("quota_out", late_or_totals.falses, WriterSink(partial(quota_writer, settings)))
    if "dlq" in sinks:
        op.output("dlq_out", op.merge("all_dlq", *dlq_streams), WriterSink(partial(dlq_writer, settings)))
    return flow


def __getattr__(name: str) -> Dataflow:
    # `python -m bytewax.run dataflows.ingest:flow` builds the flow from the environment
    # only when asked, so importing this module for its steps costs nothing.
    if name == "flow":
        settings = load_settings()
        if settings.metrics.port is not None:
            metrics.serve(settings.metrics.port + int(os.environ.get("BYTEWAX_PROCESS_ID", 0)))
        if settings.metrics.dump_path:
            atexit.register(metrics.dump_counters, settings.metrics.dump_path)
        return build_flow(settings)
    raise AttributeError(name)
