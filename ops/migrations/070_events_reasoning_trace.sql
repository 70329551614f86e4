-- Gateway event schema v2: reasoning tokens, shown apart (they are the part of output_tokens
-- the model spent reasoning, already counted and priced there: never add them), and the
-- gateway's trace context, so a stored row joins the user's own traces (Tempo, Jaeger and
-- ClickHouse's otel_traces keep TraceId/SpanId as the same lowercase hex). Rows written
-- before read 0 and NULL.
ALTER TABLE {db}.events
    ADD COLUMN IF NOT EXISTS reasoning_tokens UInt64 DEFAULT 0 CODEC(T64, ZSTD(1)) AFTER cache_write_tokens;
ALTER TABLE {db}.events ADD COLUMN IF NOT EXISTS trace_id Nullable(String) AFTER conversation_id;
ALTER TABLE {db}.events ADD COLUMN IF NOT EXISTS span_id Nullable(String) AFTER trace_id;
