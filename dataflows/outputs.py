"""Where unique events go: deduplication, then raw Parquet, ClickHouse, windowed quota
counters and billing events, the audit log, the vault and the dead-letter queue. Ingest,
feedback and replay share it.

Wiring only: each sink (writer, retry policy, metrics) lives in ``sinks/<store>.py``; here
each is built from the settings the launcher passes in, inside the worker that uses it.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from operator import itemgetter
from typing import Any, Callable

import bytewax.operators as op
from bytewax.dataflow import Stream
from bytewax.operators import KeyedStream

from dataflows.state import HORIZON_FIELD, DedupeLogic, UserWindows, WindowLogic, bucket_of
from schemas.records import encode_billing_event, encode_quota_alert
from schemas.dlq import bounded_original, event_dlq_record
from schemas.vocabulary import TOKEN_FIELDS, TOKEN_KINDS, user_key
from sinks.audit_log import AuditWriter, load_hash_key, open_migrated
from sinks.base import Batcher, Writer, WriterSink
from sinks.billing import BillingWriter
from sinks.clickhouse import (REFRESH_MARGIN_S, ClickHouse, ClickHouseWriter, migrate_embedded, month_usage_before,
                              org_month_usage_before)
from sinks.dlq import DeadLetters
from sinks.kafka import TopicWriter
from sinks.metrics import get_metrics
from sinks.parquet import (BlockBatcher, EventBlock, NanoPrices, ParquetWriter, event_blocks, partition_of_item,
                           region_of_item, sample_text)
from sinks.quota import QuotaStore, QuotaWriter, keep_month_bases
from sinks.retry import Retry, retry_policy
from sinks.vault import KeyStore, VaultFiles, VaultSealer, VaultWriter
from sinks.vault import partition_of as vault_partition_of

log = logging.getLogger(__name__)

Settings = Any
"""``ops.settings.Settings``, passed in by the launcher: flows read it, never import ops."""


def count_unique(events: list[dict]) -> None:
    """Unique events and their tokens by model and kind, counted once per batch (a label
    look-up per event costs more than the counting)."""
    get_metrics().increment("gatewatch_events", len(events), tags={"stage": "unique"})
    tokens_by_model: dict[str, list[tuple[int, ...]]] = {}
    for event in events:
        # One C call per event for its four counts (a loop over the kinds was ~1 µs per event).
        tokens_by_model.setdefault(event["model"], []).append(tokens_of(event))
    for model, rows in tokens_by_model.items():
        for kind, count in zip(TOKEN_KINDS, map(sum, zip(*rows))):
            get_metrics().increment("gatewatch_tokens", count, tags={"model": model, "kind": kind})


tokens_of = itemgetter(*TOKEN_FIELDS)


def late_to_dlq(event: dict) -> dict:
    get_metrics().increment("gatewatch_late_events", tags={"policy": "dlq"})
    return event_dlq_record(event, stage="window", code="late_event",
                            reason="event_time is older than the allowed lateness of the user's newest event")


def no_storage_to_dlq(event: dict, max_original_bytes: int = 64 * 1024) -> dict:
    """The redacted event as JSON, so `gatewatch dlq replay` can send it back once its
    region has storage (cut to the DLQ's original size, like every original). A replay's
    window horizon is the replay's bookkeeping, not the event's: left out."""
    payload = json.dumps({name: value for name, value in event.items() if name != HORIZON_FIELD}, default=str).encode()
    record = event_dlq_record(
        event, stage="route", code="no_region_storage", original=payload,
        reason=f"region {event['region']!r} has no storage in the residency settings; its events are never "
               "written to another region's storage")
    return bounded_original(record, payload, "utf-8", max_original_bytes)


# -- batch-level plumbing: one Python call per batch instead of one per item ----------------
# Every per-item Bytewax step (map, key_on, branch) calls Python once per event and allocates
# a tuple or a closure frame per event, which the GC then walks; the same work over the whole
# batch that timely hands a step is one call.

def keyed_batch(key: Callable[[Any], str], items: list) -> list[tuple[str, Any]]:
    return [(key(item), item) for item in items]


def keyed(step_id: str, stream: Stream, key: Callable[[Any], str]) -> KeyedStream:
    """``op.key_on`` over whole batches; ``key`` returns a str, as every stateful step needs."""
    return op.flat_map_batch(step_id, stream, partial(keyed_batch, key))


def routed_of(kind: str, routed: list[tuple[str, Any]]) -> list:
    return [item for item_kind, item in routed if item_kind == kind]


def routed_other_than(kind: str, routed: list[tuple[str, Any]]) -> list:
    return [item for item_kind, item in routed if item_kind != kind]


def split_routed(step_id: str, routed: Stream[tuple[str, Any]], kind: str) -> tuple[Stream, Stream]:
    """(items routed as ``kind``, every other item) of a stream of (kind, item), both unwrapped:
    ``op.branch`` and a ``map`` per side, in two batch filters."""
    return (op.flat_map_batch(f"{step_id}_{kind}", routed, partial(routed_of, kind)),
            op.flat_map_batch(f"{step_id}_not_{kind}", routed, partial(routed_other_than, kind)))


def route_by_region(events: Stream[dict], settings: Settings) -> tuple[Stream[dict], list[Stream[dict]]]:
    """(events whose region has storage, [DLQ records of the others])."""
    if not settings.residency:
        return events, []
    routed = op.flat_map_batch("has_region_storage", events, partial(
        routed_by_region, settings.residency, settings.dlq.max_original_bytes))
    stored, unstorable = split_routed("region", routed, STORED)
    return stored, [unstorable]


STORED = "stored"


def routed_by_region(residency, max_original_bytes: int, events: list[dict]) -> list[tuple[str, dict]]:
    """("stored", event) where the event's region has storage, else ("dlq", its DLQ record)."""
    return [(STORED, event) if event["region"] in residency else ("dlq", no_storage_to_dlq(event, max_original_bytes))
            for event in events]


def database_of(settings: Settings, event: dict) -> str:
    return settings.storage_for(event["region"]).clickhouse_database


def database_of_item(settings: Settings, item: EventBlock | dict) -> str:
    """database_of an EventBlock's events, or of one event."""
    return settings.storage_for(region_of_item(item)).clickhouse_database


# -- sinks, built from the settings ---------------------------------------------------------

def retry_of(settings: Settings) -> Retry:
    return retry_policy(settings.retry.initial_backoff_s, settings.retry.max_backoff_s)


def dead_letters(settings: Settings) -> DeadLetters:
    kafka, dlq = settings.kafka, settings.dlq
    return DeadLetters.to_topic(kafka.bootstrap, kafka.dlq_topic, kafka.extra, retry_of(settings),
                                dlq.max_original_bytes, dlq.spool_path)


def parquet_writer(settings: Settings) -> ParquetWriter:
    return ParquetWriter(lambda region: settings.storage_for(region).parquet_root, settings.parquet.store,
                         retry_of(settings), dead_letters(settings))


def clickhouse_writer(settings: Settings, table: str = "events") -> ClickHouseWriter:
    """Writes batches keyed by database (see database_of)."""
    return ClickHouseWriter(
        settings.clickhouse.url, retry_of(settings), dead_letters(settings), raw_days=settings.retention.raw_days,
        aggregate_days=settings.retention.aggregate_days, aggregate_interval_s=settings.clickhouse.aggregate_interval_s,
        lateness_s=settings.windows.allowed_lateness_s, table=table)


def audit_hash_key(settings: Settings) -> bytes:
    secret = settings.audit.hash_key
    return load_hash_key(secret.get_secret_value() if secret is not None else None, settings.audit.hash_key_file)


def audit_writer(settings: Settings) -> AuditWriter:
    return AuditWriter(partial(open_migrated, settings.audit.url, settings.audit.app_role), audit_hash_key(settings),
                       retry_of(settings), settings.windows.allowed_lateness_s)


def quota_writer(settings: Settings) -> QuotaWriter:
    quota, windows, kafka = settings.quota, settings.windows, settings.kafka
    clients = aggregate_clients(settings) if quota.month_bases else []
    month_bases = quota.month_bases and not any(map(has_no_aggregates, clients))
    store = QuotaStore(settings.redis.url, quota.default_tier, tuple(quota.alert_thresholds),
                       window_ttl_s=2 * (windows.allowed_lateness_s + windows.length_s + windows.flush_interval_s),
                       month_bases=month_bases, counts_from_ms=quota.replay_counts_from_ms)
    keep_bases = None
    if month_bases:  # a user's month before yesterday comes from the daily aggregates
        keep_bases = partial(keep_month_bases, store, partial(summed_totals, clients, month_usage_before),
                             partial(summed_totals, clients, org_month_usage_before))
    alerts = TopicWriter(kafka.bootstrap, kafka.quota_alerts_topic, encode_quota_alert, "alert_id", kafka.extra)
    return QuotaWriter(store, quota.tiers, alerts, retry_of(settings), dead_letters(settings),
                       windows.allowed_lateness_s, keep_bases)


def has_no_aggregates(client: ClickHouse) -> bool:
    """A pre-21 server has no daily aggregates to hold the month bases: the quota keeps a month
    counter per user then. A server that cannot be asked now is taken for a modern one (the
    bases step then fails and retries without stopping the quota)."""
    try:
        legacy = client.legacy
    except Exception as exc:  # noqa: BLE001 - an outage at start must not stop the flow
        log.warning("cannot ask ClickHouse its version for the quota's month bases",
                    extra={"sink": "quota", "error": f"{type(exc).__name__}: {exc}"})
        return False
    if legacy:
        log.warning("quota month bases need the usage aggregates (ClickHouse 21 or newer): month counters kept instead",
                    extra={"sink": "quota"})
    return legacy


def summed_totals(clients: list[ClickHouse], totals_before: Callable, subjects: list, month: str, cutoff: str) -> dict:
    """A month's totals before cutoff of users or orgs (month_usage_before or
    org_month_usage_before) over every storage's aggregates: a user's region is one of them."""
    summed: dict = {}
    for client in clients:
        for subject, values in totals_before(client, subjects, month, cutoff).items():
            held = summed.setdefault(subject, {})
            for name, value in values.items():
                held[name] = held.get(name, 0) + value
    return summed


def aggregate_clients(settings: Settings) -> list[ClickHouse]:
    """A ClickHouse client per storage, for the quota's month bases."""
    clients = [ClickHouse(settings.clickhouse.url, storage.clickhouse_database) for storage in settings.storages()]
    for client in clients:
        migrate_embedded(client, retry_of(settings), settings.retention.raw_days, settings.retention.aggregate_days)
    return clients


def billing_writer(settings: Settings) -> BillingWriter:
    kafka = settings.kafka
    producer = TopicWriter(kafka.bootstrap, kafka.billing_topic, encode_billing_event, "billing_id", kafka.extra)
    return BillingWriter(producer, settings.pricing, retry_of(settings), dead_letters(settings))


def batched_out(name: str, stream: Stream[dict], key: Callable[[dict], str], max_rows: int, max_age_s: float,
                make_writer: Callable[[], Writer], batcher: type[Batcher] = Batcher,
                quiet_tick_s: float | None = None) -> None:
    """Items keyed by ``key`` into batches of max_rows or max_age_s, each batch to the writer
    (and an empty one quiet_tick_s after a key's last, see Batcher)."""
    batches = op.stateful(f"{name}_batches", keyed(f"{name}_by_key", stream, key),
                          lambda resume: batcher(max_rows, max_age_s, resume, quiet_tick_s=quiet_tick_s))
    op.output(f"{name}_out", batches, WriterSink(make_writer))


def vault_out(events: Stream[dict], settings: Settings) -> None:
    """Original text to the vault, sealed before anything holds it (batches and their
    recovery snapshots only ever see ciphertext)."""
    vault = settings.vault
    sealer = VaultSealer(lambda: KeyStore(vault.key_store, vault.kek_bytes(), vault.kek_id), audit_hash_key(settings),
                         retry_of(settings))
    sealed = op.map("vault_seal", events, sealer)
    batched_out("vault", sealed, vault_partition_of, vault.max_rows, vault.max_age_s,
                lambda: VaultWriter(VaultFiles(vault.root, settings.parquet.s3_endpoint_url), retry_of(settings)))


# -- the steps ------------------------------------------------------------------------------

def text_sampled(sample_rate: float, events: list[dict]) -> list[dict]:
    return [sample_text(event, sample_rate) for event in events]


def first_sightings(seen: list[tuple[str, tuple[bool, dict]]]) -> list[dict]:
    unique = [event for _bucket, (first, event) in seen if first]
    count_unique(unique)
    if len(unique) < len(seen):
        get_metrics().increment("gatewatch_dedupe_drops", len(seen) - len(unique))
    return unique


def user_bucket(buckets: int, event: dict) -> str:
    return bucket_of(user_key(event["org_id"], event["user_id"]), buckets)


def unkeyed(keyed_items: list[tuple[str, Any]]) -> list:
    return [item for _key, item in keyed_items]


def deduplicate(events: Stream[dict], settings: Settings) -> Stream[dict]:
    """The first sighting of every org/event_id within the dedupe horizon.

    Keyed by the user's bucket, not the event id's: a user's events then keep their
    partition order through the dedupe, which the windows' lateness decisions rely on
    (a redelivered event carries the same user as the original)."""
    buckets = settings.dedupe.buckets
    by_user = keyed("dedupe_by_user", events, partial(user_bucket, buckets))
    seen = op.stateful_batch("dedupe", by_user, partial(DedupeLogic.build, settings.dedupe.horizon_s))
    return op.flat_map_batch("drop_duplicates", seen, first_sightings)


def window_totals(unique: Stream[dict], settings: Settings, record_decisions: bool = False
                  ) -> tuple[Stream[dict], Stream[list[dict]], Stream[dict] | None]:
    """(late events, batches of window totals, and with record_decisions every event with
    the windows' decision on it, else None) of the per-user event-time windows."""
    windows = settings.windows
    buckets = settings.dedupe.buckets

    def empty() -> UserWindows:
        return UserWindows(int(windows.length_s * 1000), int(windows.allowed_lateness_s * 1000), windows.late_policy)

    build_windows = partial(WindowLogic.build, empty, windows.flush_interval_s,
                            windows.allowed_lateness_s + windows.length_s + windows.flush_interval_s,
                            record_decisions=record_decisions)
    outputs = op.stateful_batch("windows", keyed("by_user", unique, partial(user_bucket, buckets)), build_windows)
    routed = op.flat_map_batch("window_out", outputs, unkeyed)
    if not record_decisions:
        return (*split_routed("window_out", routed, "late"), None)
    late = op.flat_map_batch("window_out_late", routed, partial(routed_of, "late"))
    totals = op.flat_map_batch("window_out_totals", routed, partial(routed_of, "totals"))
    return late, totals, op.flat_map_batch("window_out_decided", routed, decided_events)


def decided_events(routed: list[tuple[str, Any]]) -> list[dict]:
    return [event for kind, events in routed if kind == "decided" for event in events]


def fan_out(unique: Stream[dict], dlq_streams: list[Stream[dict]], settings: Settings) -> None:
    """Write unique events to every configured sink, and DLQ records to the DLQ topic.

    With raw Parquet and windows both on, the stored rows come out of the windows with their
    decision (counted in which window, late adjustment, DLQ): a replay of raw storage then
    repeats the live flow's decisions, which it could not remake (they hang on the order of
    arrival across files and on how long a user was idle, dataflows.state.WindowTotals.decide)."""
    sinks = set(settings.sinks)
    unique, unstorable = route_by_region(unique, settings)
    dlq_streams = [*dlq_streams, *unstorable]
    stored = unique
    if sinks & {"quota", "billing"}:
        late, totals, decided = window_totals(unique, settings, record_decisions="parquet" in sinks)
        stored = decided or unique
        dlq_streams = [*dlq_streams, op.map("late_dlq", late, late_to_dlq)]
        if "quota" in sinks:
            op.output("quota_out", totals, WriterSink(partial(quota_writer, settings)))
        if "billing" in sinks:
            op.output("billing_out", totals, WriterSink(partial(billing_writer, settings)))
    if settings.parquet.text_sample_rate < 1:
        stored = op.flat_map_batch("sample_text", stored, partial(text_sampled, settings.parquet.text_sample_rate))
    if sinks & {"parquet", "clickhouse"}:
        # One Arrow table per partition of each batch, shared by both sinks and priced on its
        # columns (only these sinks store a cost; billing prices window totals); the step ids of
        # their batchers are unchanged, so a snapshot's event dicts still resume (blocks_and_events).
        blocks = op.flat_map_batch("event_blocks", stored, partial(event_blocks, prices=NanoPrices(settings.pricing)))
    if "parquet" in sinks:
        batched_out("parquet", blocks, partition_of_item, settings.parquet.max_rows, settings.parquet.max_age_s,
                    partial(parquet_writer, settings), BlockBatcher)
    if "clickhouse" in sinks:
        # The tick comes when the last batch's refresh is due: an interval after it, and the
        # refresh's margin more, so that a refresh whose watermark fell just after the batch
        # (its insert still running) does not count as one that covered it (refresh_aggregates).
        interval_s = settings.clickhouse.aggregate_interval_s
        batched_out("clickhouse", blocks, partial(database_of_item, settings), settings.clickhouse.max_rows,
                    settings.clickhouse.max_age_s, partial(clickhouse_writer, settings), BlockBatcher,
                    quiet_tick_s=interval_s + REFRESH_MARGIN_S if interval_s else None)
    if "audit" in sinks:
        batched_out("audit", unique, lambda e: str(e.get("source_partition")), settings.audit.max_rows,
                    settings.audit.max_age_s, partial(audit_writer, settings))
    if "dlq" in sinks and dlq_streams:
        op.output("dlq_out", op.merge("all_dlq", *dlq_streams), WriterSink(partial(dead_letters, settings)))
