"""The Bytewax dataflows: `ingest` (events to every sink), `feedback` (ratings) and
`replay` (raw Parquet back through dedupe, windows and the sinks), with the keyed state
they keep. A flow only wires steps of the lower packages together; `ops.launch` starts it.
"""
