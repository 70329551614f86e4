"""The feedback dataflow: users' ratings of responses from the feedback topic -> validated,
comment redacted -> the ClickHouse feedback table (joinable to events by request_id);
bad input -> DLQ topic.

Run it with `gatewatch run feedback` or `python -m bytewax.run dataflows.feedback:flow`.
The table is a ReplacingMergeTree keyed by event_id, so redeliveries change nothing.
"""

from __future__ import annotations

import os
from functools import partial

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSource
from bytewax.dataflow import Dataflow
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END

from dataflows.ingest import OK, decode_batch, redact_batch, redact_dlq_payload
from dataflows.outputs import WriterSink, dlq_writer, retrying
from dataflows.state import Batcher
from ops import metrics
from ops.logs import configure as configure_logs
from ops.settings import Settings, load_settings
from redaction import Redactor
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings
from sinks.clickhouse import ClickHouse


def feedback_writer(settings: Settings):
    retry = retrying(settings)
    client = retry("clickhouse", lambda: ClickHouse(settings.clickhouse.url, settings.clickhouse.database))
    if client.embedded:
        client.migrate()

    def write(batches: list[tuple[str, list[dict]]]) -> None:
        for _key, feedback in batches:
            retry("clickhouse_feedback", lambda: client.insert_feedback(feedback))
            metrics.SINK_ROWS.labels(sink="clickhouse_feedback").inc(len(feedback))
    return write


def build_flow(settings: Settings | None = None) -> Dataflow:
    settings = settings or load_settings()
    configure_logs(settings.log_level)
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation, schema="feedback_event")
    redactor = Redactor(settings.redaction)

    flow = Dataflow("gatewatch_feedback")
    source = KafkaSource(
        settings.kafka.brokers, [settings.kafka.feedback_topic], tail=settings.kafka.tail,
        starting_offset=OFFSET_BEGINNING if settings.kafka.starting_offset == "earliest" else OFFSET_END,
        add_config=settings.kafka.extra, batch_size=settings.kafka.batch_size, raise_on_errors=False)
    messages = op.input("kafka_in", flow, source)
    decoded = op.branch("is_decoded", op.flat_map_batch("decode", messages, partial(decode_batch, codec)),
                        lambda routed: routed[0] == OK)
    feedback = op.map("decoded_feedback", decoded.trues, lambda routed: routed[1])
    redacted = op.branch("is_redacted", op.flat_map_batch("redact", feedback, partial(redact_batch, redactor)),
                         lambda routed: routed[0] == OK)
    clean = op.map("redacted_feedback", redacted.trues, lambda routed: routed[1])

    batches = op.stateful("feedback_batches", op.key_on("one_table", clean, lambda _f: "feedback"),
                          lambda resume: Batcher(settings.clickhouse.max_rows, settings.clickhouse.max_age_s, resume))
    op.output("clickhouse_out", batches, WriterSink(partial(feedback_writer, settings)))

    dlq = op.merge("all_dlq",
                   op.map("redact_undecodable", op.map("decode_dlq", decoded.falses, lambda r: r[1]),
                          partial(redact_dlq_payload, redactor)),
                   op.map("redact_dlq", redacted.falses, lambda routed: routed[1]))
    op.output("dlq_out", dlq, WriterSink(partial(dlq_writer, settings)))
    return flow


def __getattr__(name: str) -> Dataflow:
    if name == "flow":
        settings = load_settings()
        if settings.metrics.port is not None:
            metrics.serve(settings.metrics.port + int(os.environ.get("BYTEWAX_PROCESS_ID", 0)))
        return build_flow(settings)
    raise AttributeError(name)
