"""`gatewatch bench stages`: events/s of each pipeline stage on its own, one core, the same
loadgen events for all, so the slowest stage is obvious. The last line is one JSON object."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import click
import pyarrow.parquet as pq

from dataflows.state import SeenIds, WindowLogic, UserWindows
from ops.dev.loadgen import generate
from ops.logs import JsonFormatter
from ops.settings import Settings
from redaction import Redactor
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings
from sinks.parquet import NanoPrices, priced_table, to_table


def timed(run: Callable[[], object], repeat: int, clock: Callable[[], float] = time.perf_counter,
          prepare: Callable[[], object] | None = None) -> float:
    """Best seconds of `repeat` runs on `clock` (wall time unless told otherwise); `prepare`,
    untimed, before each run."""
    best = float("inf")
    for _ in range(repeat):
        if prepare is not None:
            prepare()
        started = clock()
        run()
        best = min(best, clock() - started)
    return best


def messages_for(settings: Settings, count: int, users: int, user_mix: str = "zipf") -> list[bytes]:
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    return [value for _key, value in generate(codec, count, dup_ratio=0, bad_ratio=0, users=users,
                                                mean_words=(150, 250), user_mix=user_mix)]


CORE_STAGES = ("decode (Avro)", "validate", "redact", "dedupe", "window", "Arrow table", "price", "Parquet encode",
               "ClickHouse insert (chdb)")
"""The stages timed before the sinks, the source, the DLQ and the merges were (issue 17): their
sum is `stages_core_us_per_event`, the figure the flow's CPU was first held against."""

MERGED_TABLES = ("events", "audit_log")
"""What an insert into events writes: its rows, and their audit rows (migration 011's view)."""
MERGED_PARTS = 5
"""Parts of one merge in the merge stage: ClickHouse merges about this many parts of a size
at once (its merge_selector_base)."""


def stage_seconds(settings: Settings, messages: list[bytes], repeat: int, chdb_dir: Path,
                  clock: Callable[[], float] = time.perf_counter, services: bool = False) -> dict[str, float]:
    """Best seconds each stage takes over all the messages: CORE_STAGES, and with services the
    work the flow does against Redis and the broker of settings.redis.url / kafka.bootstrap
    too (its Kafka source, quota and billing sinks, and the DLQ of loadgen's share of bad
    messages)."""
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    now_ms = int(time.time() * 1000)
    records = [codec.decode_record(m)[0] for m in messages]
    events = [codec.decode(m, now_ms) for m in messages]
    redactor = Redactor(settings.redaction)
    redactor.redact_events(events[:50])
    redacted = [e for e in redactor.redact_events(events) if isinstance(e, dict)]
    for n, event in enumerate(redacted):
        event.update(source_partition=0, source_offset=n)
    prices = NanoPrices(settings.pricing)

    def window() -> None:
        logic = WindowLogic(UserWindows(60_000, 600_000, "dlq"), 2.0, 3600)
        for start in range(0, len(redacted), 1000):
            logic.on_batch(redacted[start:start + 1000])
        logic.on_notify()

    def dedupe() -> None:
        seen = SeenIds(settings.dedupe.horizon_s)
        now = time.time()
        for event in redacted:
            seen.first(f"{event['org_id']}/{event['event_id']}", now)

    # The flow builds one Arrow table per batch for both sinks and prices it on its columns
    # (sinks.parquet.event_blocks).
    unpriced = to_table(redacted)
    table = priced_table(unpriced, prices)

    def parquet() -> None:
        pq.write_table(table, io.BytesIO(), compression="zstd")

    from sinks.clickhouse import ClickHouse, close_chdb

    clickhouse = ClickHouse(f"chdb://{chdb_dir}", "bench")
    clickhouse.migrate()

    def empty_tables() -> None:
        # Merges stay stopped until the merge stage starts them: the insert stage is the insert alone.
        for name in MERGED_TABLES:
            clickhouse.execute(f"SYSTEM STOP MERGES bench.{name}")
            clickhouse.execute(f"TRUNCATE TABLE bench.{name}")

    def insert(rows: int = 5000) -> None:
        for start in range(0, table.num_rows, rows):
            clickhouse.insert("events", table.slice(start, rows))

    def unmerged_parts() -> None:
        empty_tables()
        insert(math.ceil(table.num_rows / MERGED_PARTS))

    def merge() -> None:
        # Every row of both tables rewritten once: the least a MergeTree does with an inserted
        # row (a flow's rows are merged again as their parts grow).
        for name in MERGED_TABLES:
            clickhouse.execute(f"SYSTEM START MERGES bench.{name}")
            clickhouse.execute(f"OPTIMIZE TABLE bench.{name} FINAL")

    stages = {
        "decode (Avro)": lambda: [codec.decode_record(m) for m in messages],
        "validate": lambda: [codec.validate(r, now_ms) for r in records],
        "redact": lambda: [redactor.redact_events(events[i:i + 1000]) for i in range(0, len(events), 1000)],
        "dedupe": dedupe,
        "window": window,
        "Arrow table": lambda: to_table(redacted),
        "price": lambda: priced_table(unpriced, prices),
        "Parquet encode": parquet,
        "ClickHouse insert (chdb)": insert,
        "ClickHouse merges (chdb)": merge,
    }
    prepare = {"ClickHouse insert (chdb)": empty_tables, "ClickHouse merges (chdb)": unmerged_parts}
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(close_chdb)
        if services:
            stages.update(service_stages(settings, codec, redactor, messages, redacted, chdb_dir, cleanup))
        return {name: timed(run, repeat, clock, prepare.get(name)) for name, run in stages.items()}


SOURCE_TOPIC = "gatewatch_bench_stages_source"


def service_stages(settings: Settings, codec: EventCodec, redactor: Redactor, messages: list[bytes],
                   redacted: list[dict], chdb_dir: Path, cleanup: contextlib.ExitStack
                   ) -> dict[str, Callable[[], object]]:
    """The flow's work against its services, each built as the flow builds it (dataflows.outputs):
    the Kafka source's consume and message tuples over the messages, put on a topic of their
    own first; the quota sink (Redis, Lua, month bases from the chdb aggregates) and the
    billing sink (priced, Avro, produced) over the window totals of the redacted events, the
    quota in a Redis database of its own (15), emptied once, so its best run is a flush of
    windows it has seen (most of a drain's flushes); and the DLQ: loadgen's share of bad
    messages decoded, their payloads redacted, the records produced."""
    import redis
    from confluent_kafka import OFFSET_BEGINNING, Producer, TopicPartition

    from connectors.kafka_source import RestingKafkaSource, SourceMessage
    from dataflows.ingest import DLQ, decode_batch, redact_dlq_payload
    from dataflows.outputs import billing_writer, dead_letters, quota_writer
    from ops.migrate import create_topics

    kafka = settings.kafka
    create_topics(kafka.bootstrap, {SOURCE_TOPIC: 1})
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 5})
    for message in messages:
        producer.produce(SOURCE_TOPIC, message)
    if producer.flush(30):
        raise click.ClickException(f"the broker at {kafka.bootstrap} did not take the stages' messages")

    # One consumer, as the flow keeps one per partition; each run seeks it back to the start.
    source = RestingKafkaSource(kafka.brokers, [SOURCE_TOPIC], tail=False, starting_offset=OFFSET_BEGINNING,
                                add_config=kafka.extra, batch_size=kafka.batch_size, raise_on_errors=False)
    part = source.build_part("bench_stages", f"0-{SOURCE_TOPIC}", None)
    cleanup.callback(part.close)

    def consume() -> None:
        part._inner._consumer.assign([TopicPartition(SOURCE_TOPIC, 0, OFFSET_BEGINNING)])
        part._inner._eof = False
        read = 0
        try:
            while True:
                batch = part.next_batch()
                read += len(batch)
                if not batch:  # rests as Bytewax would until the partition's next_awake
                    time.sleep(kafka.idle_wait_s)
        except StopIteration:
            pass
        if read != len(messages):
            raise click.ClickException(f"the Kafka source read {read:,} of the {len(messages):,} messages")

    batches = window_total_batches(settings, redacted)
    on_own_db = settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"url": redis_database(settings.redis.url, 15)}),
        "clickhouse": settings.clickhouse.model_copy(update={"url": f"chdb://{chdb_dir}"})})
    redis.Redis.from_url(on_own_db.redis.url).flushdb()  # before the writer publishes its tiers there
    quota = quota_writer(on_own_db)
    billing = billing_writer(settings)

    bad_ratio = inspect.signature(generate).parameters["bad_ratio"].default
    bad = [SourceMessage(None, value, SOURCE_TOPIC, [], None, offset, 0, (0, 0)) for offset, (_key, value) in enumerate(
        generate(codec, max(1, round(len(messages) * bad_ratio)), dup_ratio=0, bad_ratio=1.0))]
    dlq = dead_letters(settings)
    # Its one log line per record goes to a file in the flow, not to this terminal.
    dlq_log = logging.getLogger("sinks.dlq")
    cleanup.callback(setattr, dlq_log, "propagate", dlq_log.propagate)
    cleanup.callback(setattr, dlq_log, "handlers", list(dlq_log.handlers))
    dlq_log.handlers[:] = [logging.StreamHandler(cleanup.enter_context(open(os.devnull, "w")))]
    dlq_log.handlers[0].setFormatter(JsonFormatter())
    dlq_log.propagate = False

    def dead_letter() -> None:
        records = [record for route, record in decode_batch(codec, bad) if route == DLQ]
        dlq.send([redact_dlq_payload(redactor, record, settings.dlq.max_original_bytes) for record in records])

    return {"Kafka source": consume, "quota (Redis)": lambda: [quota([batch]) for batch in batches],
            "billing": lambda: billing(batches), "DLQ (bad messages)": dead_letter}


def window_total_batches(settings: Settings, events: list[dict]) -> list[list[dict]]:
    """The window totals the flow's windows step would emit for these events, in its batches."""
    windows = settings.windows
    logic = WindowLogic(UserWindows(int(windows.length_s * 1000), int(windows.allowed_lateness_s * 1000),
                                    windows.late_policy), windows.flush_interval_s, 3600)
    outputs = [item for start in range(0, len(events), 1000) for item in logic.on_batch(events[start:start + 1000])[0]]
    outputs += logic.on_notify()[0]
    return [totals for kind, totals in outputs if kind == "totals"]


def redis_database(url: str, database: int) -> str:
    """The same Redis server's URL with another database number."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@click.command("stages")
@click.option("--events", default=10_000, show_default=True, type=click.IntRange(100))
@click.option("--users", default=10_000, show_default=True, type=click.IntRange(1))
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1), help="Best of this many runs.")
@click.option("--cpu", is_flag=True,
              help="Time on this process's CPU clock (all threads, chdb's too) instead of the wall clock: "
                   "on a shared machine other processes then do not inflate the figures.")
@click.option("--core-only", is_flag=True,
              help="Only the stages without services (no broker or Redis started): the Kafka source, the quota, "
                   "billing and DLQ sinks are left out.")
def stages(events, users, repeat, cpu, core_only) -> None:
    """Per-stage throughput on one core: decode, validate, redact, dedupe, window, Arrow
    table (one for both sinks), price (on its columns), Parquet encode, ClickHouse insert and
    one merge of what it inserted; and, against a local broker and Redis started here, the
    Kafka source, the quota and billing sinks and the DLQ."""
    settings = Settings()
    messages = messages_for(settings, events, users)
    clock = time.process_time if cpu else time.perf_counter
    with tempfile.TemporaryDirectory() as root:
        if core_only:
            seconds = stage_seconds(settings, messages, repeat, Path(root) / "chdb", clock)
        else:
            with local_services(Path(root)) as on_services:
                seconds = stage_seconds(on_services(settings), messages, repeat, Path(root) / "chdb", clock,
                                        services=True)
    slowest = max(seconds, key=seconds.get)
    total = sum(seconds.values())
    core = sum(spent for name, spent in seconds.items() if name in CORE_STAGES)
    click.echo(f"{events:,} loadgen events (prompt ~150, response ~250 words), best of {repeat}, "
               f"{'CPU' if cpu else 'wall'} time", err=True)
    click.echo(f"  {'stage':<26}{'events/s':>12}{'µs/event':>11}{'share':>8}", err=True)
    for name, spent in seconds.items():
        mark = "  <- slowest" if name == slowest else ""
        click.echo(f"  {name:<26}{events / spent:>12,.0f}{spent / events * 1e6:>11.1f}{spent / total:>8.1%}{mark}",
                   err=True)
    click.echo(f"  {'all stages, one core':<26}{events / total:>12,.0f}{total / events * 1e6:>11.1f}", err=True)
    if core != total:
        click.echo(f"  {'core stages (no services)':<26}{events / core:>12,.0f}{core / events * 1e6:>11.1f}", err=True)
    click.echo(json.dumps({"events": events, "clock": "cpu" if cpu else "wall", "slowest": slowest,
                           "events_per_s": {name: round(events / spent, 1) for name, spent in seconds.items()},
                           "all_stages_events_per_s": round(events / total, 1),
                           "core_stages_events_per_s": round(events / core, 1)}))


@contextlib.contextmanager
def local_services(root: Path) -> Iterator[Callable[[Settings], Settings]]:
    """A broker (with the pipeline's topics) and a redis-server under root, as `bench e2e`
    starts them, stopped on leaving (and with this process if it is killed: a bench stopped by
    SIGKILL left its broker and redis-server running); yields what points settings at them."""
    from ops.dev import services
    from ops.migrate import migrate_kafka

    started = []
    try:
        kafka = services.start_kafka(root / "kafka", kind="tansu", die_with_parent=True)
        started.append(kafka)
        redis_server = services.start_redis(root / "redis", die_with_parent=True)
        started.append(redis_server)

        def on_services(settings: Settings) -> Settings:
            return settings.model_copy(update={
                "kafka": settings.kafka.model_copy(update={"bootstrap": kafka.address}),
                "redis": settings.redis.model_copy(update={"url": redis_server.address})})

        migrate_kafka(on_services(Settings()).kafka)
        yield on_services
    finally:
        for service in reversed(started):
            service.stop()
