"""`gatewatch bench stages`: events/s of each pipeline stage on its own, one core, the same
loadgen events for all, so the slowest stage is obvious. The last line is one JSON object."""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import click
import pyarrow.parquet as pq

from dataflows.state import SeenIds, WindowLogic, UserWindows
from ops.dev.loadgen import generate
from ops.settings import Settings
from redaction import Redactor
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings
from sinks.parquet import NanoPrices, priced_table, to_table


def timed(run: Callable[[], object], repeat: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Best seconds of `repeat` runs on `clock` (wall time unless told otherwise)."""
    best = float("inf")
    for _ in range(repeat):
        started = clock()
        run()
        best = min(best, clock() - started)
    return best


def messages_for(settings: Settings, count: int, users: int, user_mix: str = "zipf") -> list[bytes]:
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    return [value for _key, value in generate(codec, count, dup_ratio=0, bad_ratio=0, users=users,
                                                mean_words=(150, 250), user_mix=user_mix)]


def stage_seconds(settings: Settings, messages: list[bytes], repeat: int, chdb_dir: Path,
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Best seconds each stage takes over all the messages."""
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

    def insert() -> None:
        for start in range(0, table.num_rows, 5000):
            clickhouse.insert("events", table.slice(start, 5000))

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
    }
    try:
        return {name: timed(run, repeat, clock) for name, run in stages.items()}
    finally:
        close_chdb()


@click.command("stages")
@click.option("--events", default=10_000, show_default=True, type=click.IntRange(100))
@click.option("--users", default=10_000, show_default=True, type=click.IntRange(1))
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1), help="Best of this many runs.")
@click.option("--cpu", is_flag=True,
              help="Time on this process's CPU clock (all threads, chdb's too) instead of the wall clock: "
                   "on a shared machine other processes then do not inflate the figures.")
def stages(events, users, repeat, cpu) -> None:
    """Per-stage throughput on one core: decode, validate, redact, dedupe, window, Arrow
    table (one for both sinks), price (on its columns), Parquet encode, ClickHouse insert."""
    settings = Settings()
    messages = messages_for(settings, events, users)
    with tempfile.TemporaryDirectory() as chdb_dir:
        seconds = stage_seconds(settings, messages, repeat, Path(chdb_dir),
                                time.process_time if cpu else time.perf_counter)
    slowest = max(seconds, key=seconds.get)
    total = sum(seconds.values())
    click.echo(f"{events:,} loadgen events (prompt ~150, response ~250 words), best of {repeat}, "
               f"{'CPU' if cpu else 'wall'} time", err=True)
    click.echo(f"  {'stage':<26}{'events/s':>12}{'µs/event':>11}{'share':>8}", err=True)
    for name, spent in seconds.items():
        mark = "  <- slowest" if name == slowest else ""
        click.echo(f"  {name:<26}{events / spent:>12,.0f}{spent / events * 1e6:>11.1f}{spent / total:>8.1%}{mark}",
                   err=True)
    click.echo(f"  {'all stages, one core':<26}{events / total:>12,.0f}{total / events * 1e6:>11.1f}", err=True)
    click.echo(json.dumps({"events": events, "clock": "cpu" if cpu else "wall", "slowest": slowest,
                           "events_per_s": {name: round(events / spent, 1) for name, spent in seconds.items()},
                           "all_stages_events_per_s": round(events / total, 1)}))
