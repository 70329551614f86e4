"""The feedback dataflow: users' ratings of responses from the feedback topic -> validated,
comment redacted -> the ClickHouse feedback table (joinable to events by request_id);
bad input -> DLQ topic.

Run it with `gatewatch run feedback` or `python -m bytewax.run ops.launch:feedback`.
The table is a ReplacingMergeTree keyed by event_id, so redeliveries change nothing.
"""

from __future__ import annotations

from functools import partial

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from dataflows.ingest import validated_and_redacted
from dataflows.outputs import Settings, batched_out, clickhouse_writer, database_of, dead_letters, route_by_region
from redaction import Redactor
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings
from sinks.base import WriterSink


def build_flow(settings: Settings) -> Dataflow:
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation, schema="feedback_event")
    flow = Dataflow("gatewatch_feedback")
    clean, dlq_streams = validated_and_redacted(flow, settings, settings.kafka.feedback_topic, codec,
                                                Redactor(settings.redaction))
    clean, unstorable = route_by_region(clean, settings)
    batched_out("feedback", clean, partial(database_of, settings), settings.clickhouse.max_rows,
                settings.clickhouse.max_age_s, partial(clickhouse_writer, settings, "feedback"))
    op.output("dlq_out", op.merge("all_dlq", *dlq_streams, *unstorable), WriterSink(partial(dead_letters, settings)))
    return flow
