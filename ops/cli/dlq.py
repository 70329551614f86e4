"""`gatewatch dlq inspect|replay`: read the dead-letter queue and send fixed records back in."""

from __future__ import annotations

import json

import click
from confluent_kafka import Producer

from ops.cli.options import config_option, settings_from
from schemas.dlq import decode_dlq
from sinks.kafka import read_topic


def printable(record: dict) -> dict:
    original = record.get("original")
    return {**record, "original": None if original is None else f"<{len(original)} bytes>"}


def matches(record: dict, code: str | None, stage: str | None) -> bool:
    return (code is None or record.get("code") == code) and (stage is None or record.get("stage") == stage)


@click.group()
def dlq() -> None:
    """Read the dead-letter queue, and send records back once their cause is fixed."""


@dlq.command()
@config_option
@click.option("--code", help="Only records with this code (e.g. bad_json, unknown_region).")
@click.option("--stage", help="Only records from this stage (consume, decode, redact, window).")
@click.option("--limit", type=click.IntRange(1), help="Print at most this many records.")
@click.option("--summary", is_flag=True, help="Print counts by stage and code instead of records.")
def inspect(config, code, stage, limit, summary) -> None:
    """Print DLQ records as JSON lines (payload sizes only, never payloads)."""
    settings = settings_from(config)
    counts: dict[str, int] = {}
    shown = 0
    for partition, offset, record in read_topic(settings.kafka.bootstrap, settings.kafka.dlq_topic, decode_dlq):
        if not matches(record, code, stage):
            continue
        key = f"{record.get('stage')}/{record.get('code')}"
        counts[key] = counts.get(key, 0) + 1
        if not summary and (limit is None or shown < limit):
            click.echo(json.dumps({"dlq_partition": partition, "dlq_offset": offset, **printable(record)}, default=str))
            shown += 1
    if summary:
        click.echo(json.dumps(dict(sorted(counts.items()))))


@dlq.command()
@config_option
@click.option("--code", help="Only records with this code.")
@click.option("--stage", help="Only records from this stage.")
@click.option("--dry-run", is_flag=True, help="Count what would be sent, send nothing.")
def replay(config, code, stage, dry_run) -> None:
    """Produce the original bytes of matching DLQ records back to the events topic.

    Run it after fixing the cause (a schema now registered, a region now configured). A
    record whose text was withheld (or cut to dlq.max_original_bytes) is reported, not replayed. Events
    that were already processed are dropped again by the dedupe and idempotent sinks.
    """
    settings = settings_from(config)
    producer = None if dry_run else Producer({"bootstrap.servers": settings.kafka.bootstrap,
                                              "enable.idempotence": True, "acks": "all"})
    failures: list[str] = []
    sent = withheld = 0
    for _partition, _offset, record in read_topic(settings.kafka.bootstrap, settings.kafka.dlq_topic, decode_dlq):
        if not matches(record, code, stage):
            continue
        if record.get("original") is None or record.get("original_truncated"):
            withheld += 1  # a cut original would only come back to the DLQ
            continue
        sent += 1
        if producer is not None:
            producer.produce(settings.kafka.events_topic, record["original"],
                             on_delivery=lambda err, _m: err and failures.append(str(err)))
            producer.poll(0)
    if producer is not None and (producer.flush(30) or failures):
        raise click.ClickException(f"replay delivery failed: {failures[:3]}")
    verb = "would send" if dry_run else "sent"
    click.echo(f"{verb} {sent} records to {settings.kafka.events_topic}; {withheld} without payload skipped")


