-- A bloom-filter skip index on events.trace_id, so "the stored record of this trace" (a
-- trace id copied from Jaeger/Tempo) reads a few granules instead of the whole table: trace
-- ids are random, so the sort key (org, day, ...) cannot help. 1% false positives; one filter
-- per 4 granules (32k rows) keeps it small. Parts written before this migration get the index
-- when they merge: no MATERIALIZE INDEX here, a mutation that rewrites every part of a large
-- table belongs to an operator's maintenance window, not to `gatewatch migrate`.
-- Servers before 19.8 have no bloom_filter index (sinks.legacy_sql.LEGACY_SKIPPED).
ALTER TABLE {db}.events ADD INDEX IF NOT EXISTS trace_id_bloom trace_id TYPE bloom_filter(0.01) GRANULARITY 4;
