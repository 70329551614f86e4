"""Where the pipeline's results are written: raw Parquet, ClickHouse, Redis quotas,
billing and DLQ topics, the audit log and the vault, each with its client and retry
policy. Metrics go through the `sinks.metrics` hook, logs through stdlib `logging`; never
imports `ops` or `dataflows`.
"""
