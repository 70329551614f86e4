"""Where unique events go: deduplication, then raw Parquet, ClickHouse, windowed quota
counters and billing events, and the dead-letter queue. Ingest and replay share it."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from functools import lru_cache, partial
from typing import Any, Callable

import bytewax.operators as op
from bytewax.dataflow import Stream
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from dataflows.state import Batcher, DedupeLogic, UserWindows, WindowLogic, bucket_of
from ops import metrics
from ops.audit import hash_key, open_audit
from ops.logs import get_logger
from ops.settings import Settings
from schemas.codec import encode_billing_event, encode_quota_alert
from schemas.dlq import bounded_original, dlq_record, encode_dlq, fitted, safe_for_storage
from sinks.audit_log import audit_row
from sinks.billing import billing_event, with_cost
from sinks.clickhouse import ClickHouse, refresh_aggregates
from sinks.kafka import DeliveryFailed, Rejected, TopicWriter
from sinks.parquet import ParquetStore, partition_of, sample_text
from sinks.quota import TOKEN_KINDS, QuotaStore
from sinks.retry import write_isolating, write_with_retries
from sinks.vault import KeyStore, VaultFiles, seal_event
from sinks.vault import partition_of as vault_partition_of

log = get_logger(__name__)


UNIQUE_EVENTS = metrics.EVENTS.labels(stage="unique")


@lru_cache(maxsize=4096)
def token_counters(model: str) -> tuple:
    """The token counters of a model by kind: looking labels up per event costs more than counting."""
    return tuple((metrics.TOKENS.labels(model=model, kind=kind), f"{kind}_tokens") for kind in TOKEN_KINDS)


def count_unique(event: dict) -> dict:
    UNIQUE_EVENTS.inc()
    for counter, field in token_counters(event["model"]):
        counter.inc(event[field])
    return event


def late_to_dlq(event: dict) -> dict:
    metrics.LATE_EVENTS.labels(policy="dlq").inc()
    return dlq_record(
        stage="window", code="late_event",
        reason="event_time is older than the allowed lateness of the user's newest event",
        original=None, topic=None, partition=event["source_partition"], offset=event["source_offset"],
        first_seen_ms=int(time.time() * 1000), event_id=event["event_id"], request_id=event["request_id"])


def no_storage_to_dlq(event: dict, max_original_bytes: int = 64 * 1024) -> dict:
    """The redacted event as JSON, so `gatewatch dlq replay` can send it back once its
    region has storage (cut to the DLQ's original size, like every original)."""
    payload = json.dumps(event, default=str).encode()
    record = dlq_record(
        stage="route", code="no_region_storage",
        reason=f"region {event['region']!r} has no storage in the residency settings; its events are never "
               "written to another region's storage",
        original=payload, topic=None, partition=event.get("source_partition"),
        offset=event.get("source_offset"), first_seen_ms=int(time.time() * 1000), event_id=event["event_id"],
        request_id=event.get("request_id"))
    return bounded_original(record, payload, "utf-8", max_original_bytes)


def route_by_region(events: Stream[dict], settings: Settings) -> tuple[Stream[dict], list[Stream[dict]]]:
    """(events whose region has storage, [DLQ records of the others])."""
    if not settings.residency:
        return events, []
    routed = op.branch("has_region_storage", events, lambda e: e["region"] in settings.residency)
    to_dlq = partial(no_storage_to_dlq, max_original_bytes=settings.dlq.max_original_bytes)
    return routed.trues, [op.map("no_storage_dlq", routed.falses, to_dlq)]


def database_of(settings: Settings, event: dict) -> str:
    return settings.storage_for(event["region"]).clickhouse_database


# -- sinks: Bytewax shells over the writers in sinks/ -------------------------------------

class _WriterPartition(StatelessSinkPartition):
    def __init__(self, write: Callable[[list], Any]):
        self._write = write

    def write_batch(self, items: list) -> None:
        self._write(items)

    def close(self) -> None:
        # A writer may have work to finish when the flow ends (see clickhouse_writer).
        getattr(self._write, "close", lambda: None)()


class WriterSink(DynamicSink):
    """Builds its writer inside each worker, so connections are never pickled or shared."""

    def __init__(self, make_write: Callable[[], Callable[[list], Any]]):
        self._make_write = make_write

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _WriterPartition:
        return _WriterPartition(self._make_write())


def retrying(settings: Settings):
    return partial(write_with_retries, initial_backoff_s=settings.retry.initial_backoff_s,
                   max_backoff_s=settings.retry.max_backoff_s)


def dead_letter_rows(dead_letters: "DeadLetters", sink: str, rejected: list) -> None:
    """Rows a store refused for good (see write_isolating) to the DLQ, each counted and logged."""
    refused = [Rejected(row, "row_rejected", f"{type(exc).__name__} writing the row") for row, exc in rejected]
    note_rejected(sink, refused)
    dead_letters.send_rejected(sink, refused)


def parquet_writer(settings: Settings):
    retry = retrying(settings)
    stores: dict[str, ParquetStore] = {}
    dead_letters = DeadLetters(settings)

    def store_of(region: str) -> ParquetStore:
        root = settings.storage_for(region).parquet_root
        if root not in stores:
            stores[root] = settings.parquet.store(root)
        return stores[root]

    def write(batches: list[tuple[str, list[dict]]]) -> None:
        for partition, events in batches:
            # A partition is one event_date and region, so one store takes the whole batch.
            store = store_of(events[0]["region"])
            rejected = write_isolating("parquet", partial(store.write, partition), events, retry)
            dead_letter_rows(dead_letters, "parquet", rejected)
            metrics.SINK_ROWS.labels(sink="parquet").inc(len(events) - len(rejected))
    return write


def clickhouse_writer(settings: Settings, table: str = "events"):
    """Writes batches keyed by database (see database_of)."""
    retry = retrying(settings)
    clients: dict[str, ClickHouse] = {}
    sink = "clickhouse" if table == "events" else f"clickhouse_{table}"
    dead_letters = DeadLetters(settings)

    def client_of(database: str) -> ClickHouse:
        if database not in clients:
            client = retry("clickhouse", lambda: ClickHouse(settings.clickhouse.url, database))
            if client.embedded:
                # Nobody else can reach an embedded database to migrate it.
                client.migrate(settings.retention.raw_days, settings.retention.aggregate_days)
            clients[database] = client
        return clients[database]

    refreshed_at = {"s": time.monotonic()}

    def refresh(force: bool = False) -> None:
        """Recompute the usage aggregates of the hours written since the last refresh."""
        if table != "events" or not (force or time.monotonic() - refreshed_at["s"] >= settings.clickhouse.aggregate_interval_s):
            return
        for client in clients.values():
            retry("clickhouse_aggregates", lambda: refresh_aggregates(client, settings.retention.raw_days))
        refreshed_at["s"] = time.monotonic()

    def write(batches: list[tuple[str, list[dict]]]) -> None:
        for database, rows in batches:
            client = client_of(database)
            insert = client.insert_events if table == "events" else client.insert_feedback
            rejected = write_isolating(sink, insert, rows, retry)
            dead_letter_rows(dead_letters, sink, rejected)
            metrics.SINK_ROWS.labels(sink=sink).inc(len(rows) - len(rejected))
            observe_freshness(sink, [row["event_time"] for row in rows], settings.windows.allowed_lateness_s)
        refresh()

    write.close = partial(refresh, force=True)
    return write


def audit_writer(settings: Settings):
    """One audit row per unique event; the store ignores rows it already holds, so a
    retried batch or a replay adds nothing."""
    retry = retrying(settings)
    key = hash_key(settings)
    store = retry("audit", lambda: open_audit(settings))

    def write(batches: list[tuple[str, list[dict]]]) -> None:
        rows = [audit_row(event, key) for _partition, events in batches for event in events]
        retry("audit", lambda: store.insert_events(rows))
        metrics.SINK_ROWS.labels(sink="audit").inc(len(rows))
        observe_freshness("audit", [row["event_time"] for row in rows], settings.windows.allowed_lateness_s)
    return write


class VaultSealer:
    """Seals each decoded event's original text with its user's data key; the key store
    is opened in the worker that first needs it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.retry = retrying(settings)
        self.keys: KeyStore | None = None
        self.key = hash_key(settings)

    def __call__(self, event: dict) -> dict:
        if self.keys is None:
            vault = self.settings.vault
            self.keys = KeyStore(vault.key_store, vault.kek_bytes(), vault.kek_id)
        return self.retry("vault_keys", lambda: seal_event(event, self.keys, self.key))


def vault_writer(settings: Settings):
    retry = retrying(settings)
    files = VaultFiles(settings.vault.root, settings.parquet.s3_endpoint_url)

    def write(batches: list[tuple[str, list[dict]]]) -> None:
        records = [record for _partition, batch in batches for record in batch]
        retry("vault", lambda: files.write(records))
        metrics.SINK_ROWS.labels(sink="vault").inc(len(records))
    return write


def vault_out(events: Stream[dict], settings: Settings) -> None:
    """Original text to the vault, sealed before anything holds it (batches and their
    recovery snapshots only ever see ciphertext)."""
    sealed = op.map("vault_seal", events, VaultSealer(settings))
    batches = op.stateful("vault_batches", op.key_on("vault_by_partition", sealed, vault_partition_of),
                          lambda resume: Batcher(settings.vault.max_rows, settings.vault.max_age_s, resume))
    op.output("vault_out", batches, WriterSink(partial(vault_writer, settings)))


def quota_writer(settings: Settings):
    retry = retrying(settings)
    quota = settings.quota
    windows = settings.windows
    store = QuotaStore(settings.redis.url, quota.default_tier, tuple(quota.alert_thresholds),
                       window_ttl_s=2 * (windows.allowed_lateness_s + windows.length_s + windows.flush_interval_s))
    retry("quota", lambda: store.publish_tiers(quota.tiers))
    alerts = TopicWriter(settings.kafka.bootstrap, settings.kafka.quota_alerts_topic, encode_quota_alert,
                         "alert_id", settings.kafka.extra)
    dead_letters = DeadLetters(settings)

    def deliver_alerts() -> None:
        # Alerts stay pending in Redis until the broker has them: a crash in between
        # delivers them again (with the same alert_id) rather than never.
        pending = store.pending_alerts()
        if pending:
            dead_letters.send_rejected("quota_alerts", alerts.send(pending))
            store.ack_alerts([alert["alert_id"] for alert in pending])
            metrics.QUOTA_ALERTS.inc(len(pending))

    retry("quota_alerts", deliver_alerts)

    def write(batches: list[list[dict]]) -> None:
        totals = [total for batch in batches for total in batch]
        retry("quota", lambda: store.apply(totals))
        metrics.SINK_ROWS.labels(sink="quota").inc(len(totals))
        observe_freshness("quota", [t["window_start_ms"] + t["window_length_ms"] for t in totals],
                          settings.windows.allowed_lateness_s)
        retry("quota_alerts", deliver_alerts)
    return write


def send_all(sink: str, writer: TopicWriter, records: list[dict], retry) -> list[Rejected]:
    """Every record delivered, retrying (only the undelivered ones) while the broker is
    out; the records refused for good, each counted and logged by its key."""
    pending, rejected = records, []

    def attempt() -> None:
        nonlocal pending
        try:
            rejected.extend(writer.send(pending))
            pending = []
        except DeliveryFailed as failed:
            rejected.extend(failed.rejected)
            pending = failed.undelivered
            raise

    if pending:
        retry(sink, attempt)
    note_rejected(sink, rejected)
    return rejected


def note_rejected(sink: str, rejected: list[Rejected]) -> None:
    """Count and log every row a sink refused for good, by its id (never its content)."""
    for refused in rejected:
        metrics.SINK_REJECTED.labels(sink=sink, code=refused.code).inc()
        log.error("sink refused a row for good; it goes to the DLQ", extra={
            "sink": sink, "code": refused.code, "reason": refused.reason, "row": row_key(refused.record),
            "request_id": refused.record.get("request_id")})


def row_key(row: dict) -> str:
    """The id a log line names a row by, bounded (an id may be absurdly long)."""
    for name in ("billing_id", "alert_id", "dlq_id", "update_id", "event_id"):
        if row.get(name):
            value = str(row[name])
            return value if len(value) <= 200 else f"{value[:160]}…({len(value)} chars)"
    return "?"


def rejected_to_dlq(sink: str, refused: Rejected, max_original_bytes: int) -> dict:
    """A DLQ record for a row a sink refused: the row as JSON (it has passed redaction
    already), cut to the configured size with its size and hash."""
    row = refused.record
    record = dlq_record(
        stage="sink", code="sink_rejected", reason=f"{sink} refused the row for good ({refused.code}): {refused.reason}",
        original=None, topic=None, partition=row.get("source_partition"), offset=row.get("source_offset"),
        first_seen_ms=int(time.time() * 1000), event_id=row_key(row), request_id=row.get("request_id"))
    payload = json.dumps(row, default=str, ensure_ascii=False).encode("utf-8", "replace")
    return {**bounded_original(record, payload, "utf-8", max_original_bytes), "dlq_id": f"sink:{sink}:{row_key(row)}"}


class DeadLetters:
    """The DLQ topic, with a local spool file for records the broker refuses for good
    (never a retry loop): each spooled record is counted (gatewatch_dlq_spooled, alert on
    any) and logged."""

    _spool_lock = threading.Lock()

    def __init__(self, settings: Settings):
        self.settings = settings
        self.retry = retrying(settings)
        self._writer: TopicWriter | None = None

    @property
    def writer(self) -> TopicWriter:
        # Made on first use: most sinks never refuse a row, and need no producer for it.
        if self._writer is None:
            k = self.settings.kafka
            self._writer = TopicWriter(k.bootstrap, k.dlq_topic, encode_dlq, "event_id", k.extra)
        return self._writer

    def send(self, records: list[dict]) -> None:
        if not records:
            return
        for refused in send_all("dlq", self.writer, records, self.retry):
            self.spool(refused)
        for record in records:
            metrics.DLQ_RECORDS.labels(stage=record["stage"], code=record["code"]).inc()
            log.warning("event sent to the DLQ", extra={
                "request_id": record.get("request_id"), "event_id": record.get("event_id"),
                "stage": record["stage"], "code": record["code"], "reason": record["reason"],
                "source": f"{record.get('topic')}/{record.get('partition')}/{record.get('offset')}"})

    def send_rejected(self, sink: str, rejected: list[Rejected]) -> None:
        if rejected:
            self.send([rejected_to_dlq(sink, refused, self.settings.dlq.max_original_bytes) for refused in rejected])

    def spool(self, refused: Rejected) -> None:
        record = fitted(safe_for_storage(refused.record))
        original = record.get("original")
        line = json.dumps({**record, "original": base64.b64encode(original).decode() if original else None,
                           "spool_reason": refused.reason}, default=str)
        path = self.settings.dlq.spool_path
        with self._spool_lock, open(path, "a", encoding="utf-8") as spool:
            spool.write(line + "\n")
        metrics.DLQ_SPOOLED.labels(code=str(record.get("code"))).inc()
        log.error("DLQ record refused by the broker, appended to the local spool", extra={
            "dlq_id": row_key(record), "code": record.get("code"), "reason": refused.reason,
            "spool_path": os.path.abspath(path), "request_id": record.get("request_id")})


def billing_writer(settings: Settings):
    retry = retrying(settings)
    producer = TopicWriter(settings.kafka.bootstrap, settings.kafka.billing_topic, encode_billing_event,
                           "billing_id", settings.kafka.extra)
    dead_letters = DeadLetters(settings)

    def write(batches: list[list[dict]]) -> None:
        events = [billing_event(total, settings.pricing) for batch in batches for total in batch]
        rejected = send_all("billing", producer, events, retry)
        dead_letters.send_rejected("billing", rejected)
        metrics.SINK_ROWS.labels(sink="billing").inc(len(events) - len(rejected))
    return write


def dlq_writer(settings: Settings):
    return DeadLetters(settings).send


def observe_freshness(sink: str, times_ms: list[int], lateness_s: float) -> None:
    """Seconds from event time (or window end) until the sink acknowledged the write.

    Events the gateway sent later than the allowed lateness are counted as late events
    instead: their age says nothing about the pipeline's own delay."""
    now_ms = time.time() * 1000
    histogram = metrics.FRESHNESS_SECONDS.labels(sink=sink)
    for at_ms in times_ms:
        age_s = max(0.0, (now_ms - at_ms) / 1000)
        if age_s <= lateness_s:
            histogram.observe(age_s)


def deduplicate(events: Stream[dict], settings: Settings) -> Stream[dict]:
    """The first sighting of every org/event_id within the dedupe horizon.

    Keyed by the user's bucket, not the event id's: a user's events then keep their
    partition order through the dedupe, which the windows' lateness decisions rely on
    (a redelivered event carries the same user as the original)."""
    buckets = settings.dedupe.buckets
    by_user = op.key_on("dedupe_by_user", events, lambda e: bucket_of(f"{e['org_id']}/{e['user_id']}", buckets))
    seen = op.stateful_batch("dedupe", by_user, partial(DedupeLogic.build, settings.dedupe.horizon_s))

    def first_only(item: tuple[str, tuple[bool, dict]]) -> dict | None:
        first, event = item[1]
        if first:
            return count_unique(event)
        metrics.DEDUPE_DROPS.inc()
        return None

    return op.filter_map("drop_duplicates", seen, first_only)


def window_totals(unique: Stream[dict], settings: Settings) -> tuple[Stream[dict], Stream[list[dict]]]:
    """(late events, batches of window totals) of the per-user event-time windows."""
    windows = settings.windows
    buckets = settings.dedupe.buckets

    def empty() -> UserWindows:
        return UserWindows(int(windows.length_s * 1000), int(windows.allowed_lateness_s * 1000), windows.late_policy)

    build_windows = partial(WindowLogic.build, empty, windows.flush_interval_s,
                            windows.allowed_lateness_s + windows.length_s + windows.flush_interval_s)
    by_user = op.key_on("by_user", unique, lambda e: bucket_of(f"{e['org_id']}/{e['user_id']}", buckets))
    outputs = op.key_rm("window_out", op.stateful_batch("windows", by_user, build_windows))
    late_or_totals = op.branch("is_late", outputs, lambda out: out[0] == "late")
    late = op.map("late_event", late_or_totals.trues, lambda out: out[1])
    totals = op.map("totals", late_or_totals.falses, lambda out: out[1])
    return late, totals


def fan_out(unique: Stream[dict], dlq_streams: list[Stream[dict]], settings: Settings) -> None:
    """Write unique events to every configured sink, and DLQ records to the DLQ topic."""
    sinks = set(settings.sinks)
    unique, unstorable = route_by_region(unique, settings)
    dlq_streams = [*dlq_streams, *unstorable]
    unique = op.map("price", unique, partial(with_cost, pricing=settings.pricing))
    stored = unique
    if settings.parquet.text_sample_rate < 1:
        stored = op.map("sample_text", unique, partial(sample_text, sample_rate=settings.parquet.text_sample_rate))
    if "parquet" in sinks:
        batches = op.stateful("parquet_batches", op.key_on("by_partition", stored, partition_of),
                              lambda resume: Batcher(settings.parquet.max_rows, settings.parquet.max_age_s, resume))
        op.output("parquet_out", batches, WriterSink(partial(parquet_writer, settings)))
    if "clickhouse" in sinks:
        batches = op.stateful("clickhouse_batches", op.key_on("by_database", stored, partial(database_of, settings)),
                              lambda resume: Batcher(settings.clickhouse.max_rows, settings.clickhouse.max_age_s, resume))
        op.output("clickhouse_out", batches, WriterSink(partial(clickhouse_writer, settings)))
    if "audit" in sinks:
        by_partition = op.key_on("audit_by_partition", unique, lambda e: str(e.get("source_partition")))
        batches = op.stateful("audit_batches", by_partition,
                              lambda resume: Batcher(settings.audit.max_rows, settings.audit.max_age_s, resume))
        op.output("audit_out", batches, WriterSink(partial(audit_writer, settings)))
    if sinks & {"quota", "billing"}:
        late, totals = window_totals(unique, settings)
        dlq_streams = [*dlq_streams, op.map("late_dlq", late, late_to_dlq)]
        if "quota" in sinks:
            op.output("quota_out", totals, WriterSink(partial(quota_writer, settings)))
        if "billing" in sinks:
            op.output("billing_out", totals, WriterSink(partial(billing_writer, settings)))
    if "dlq" in sinks and dlq_streams:
        op.output("dlq_out", op.merge("all_dlq", *dlq_streams), WriterSink(partial(dlq_writer, settings)))
