"""The ways events get in and out of the pipeline's edges: the gateways' producer library
(``producer``, its disk ``spool``, and ``usage``, which maps a provider's usage block to
token counts), the ingestion API (`ingest_api/`), the Kafka
and raw-Parquet sources of the flows, and the quota client gateways ask before calling a
model.

Takes plain values and its own settings sections; never imports `ops` or `dataflows`.
"""
