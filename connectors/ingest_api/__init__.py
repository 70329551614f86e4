"""The ingestion API: `gatewatch serve` (OTLP GenAI spans and JSON events over HTTP -> Kafka).

Modules: ``otlp`` (pure span -> event mapping), ``keys`` (per-org API keys, hashed in
SQLite), ``app`` (the ASGI application and its HTTP semantics). Plain values in, no
``ops`` imports: ops/api.py wires settings into them.
"""
