"""The feedback dataflow: users' ratings of responses from the feedback topic -> validated,
comment redacted -> the ClickHouse feedback table (joinable to events by request_id);
bad input -> DLQ topic.

Run it with `gatewatch run feedback` or `python -m bytewax.run dataflows.feedback:flow`.
The table is a ReplacingMergeTree keyed by event_id, so redeliveries change nothing.
"""

from __future__ import annotations

from functools import partial

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from dataflows.ingest import from_environment, validated_and_redacted
from dataflows.outputs import WriterSink, clickhouse_writer, database_of, dlq_writer, route_by_region
from dataflows.state import Batcher
from ops.logs import configure as configure_logs
from ops.settings import Settings, load_settings
from redaction import Redactor
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings


def build_flow(settings: Settings | None = None) -> Dataflow:
    settings = settings or load_settings()
    configure_logs(settings.log_level)
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation, schema="feedback_event")
    flow = Dataflow("gatewatch_feedback")
    clean, dlq_streams = validated_and_redacted(flow, settings, settings.kafka.feedback_topic, codec,
                                                Redactor(settings.redaction))
    clean, unstorable = route_by_region(clean, settings)
    batches = op.stateful("feedback_batches", op.key_on("by_database", clean, partial(database_of, settings)),
                          lambda resume: Batcher(settings.clickhouse.max_rows, settings.clickhouse.max_age_s, resume))
    op.output("clickhouse_out", batches, WriterSink(partial(clickhouse_writer, settings, "feedback")))
    op.output("dlq_out", op.merge("all_dlq", *dlq_streams, *unstorable), WriterSink(partial(dlq_writer, settings)))
    return flow


def __getattr__(name: str) -> Dataflow:
    if name == "flow":
        return from_environment(build_flow)
    raise AttributeError(name)
