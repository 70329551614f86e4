-- Who read or changed stored data through the CLI: append-only, one row when a command
-- starts and one when it ends (same command_id), never updated and never expired.
CREATE TABLE IF NOT EXISTS {db}.access_audit
(
    at DateTime('UTC'),
    command_id String,
    actor String,
    command String,
    scope String,
    outcome String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (at, command_id);
