"""The replay dataflow: raw Parquet of a date range -> the ingest flow's steps from the
redacted text onward (dedupe, pricing, windows) -> the chosen sinks.

Every sink write is idempotent, so a replay into a rebuilt ClickHouse gives the live run's
numbers and a second replay changes nothing. Run it with `gatewatch replay`.
"""

from __future__ import annotations

from datetime import date

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from connectors.parquet_source import ParquetSource
from dataflows.outputs import Settings, deduplicate, fan_out

REPLAY_SINKS = ("clickhouse", "quota", "billing", "dlq")


def build_flow(settings: Settings, first: date, last: date, region: str | None = None) -> Dataflow:
    """settings.sinks says where replayed events go; Parquet is the source, never a sink."""
    if "parquet" in settings.sinks:
        raise ValueError("a replay reads the raw Parquet; it cannot also write it")
    flow = Dataflow("gatewatch_replay")
    stores = [settings.parquet.store(storage.parquet_root) for storage in settings.storages()]
    stored = op.input("parquet_in", flow, ParquetSource(stores, first, last, region, settings.kafka.batch_size))
    fan_out(deduplicate(stored, settings), [], settings)
    return flow
