-- Who read or changed stored data through the CLI: append-only, one row when a command
-- starts and one when it ends (same command_id), never updated and never expired.
CREATE TABLE IF NOT EXISTS {db}.access_audit
(
    at DateTime64(3, 'UTC'),
    command_id String,
    actor String,
    command LowCardinality(String),
    scope String,
    outcome LowCardinality(String)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (at, command_id);
