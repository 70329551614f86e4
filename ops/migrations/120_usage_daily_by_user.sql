-- The month bases' copy of usage_daily: each user's daily rows, sorted by (org, user, day), with
-- only the columns sinks.clickhouse.month_usage_before reads. usage_daily is sorted by (org,
-- day, ...), so a look-up of 100 users read every user's rows of the org's days of the month:
-- 0.3-0.7 CPU s with 5 days stored, 1.7-2.6 s with 20, at a million users in 7 orgs. Here it
-- reads the granules that hold the users asked, about one per user and part: 0.04-0.2 s
-- once merged, 0.2-0.6 s while merges run, whatever the day (ops/bench/FINDINGS.md, last
-- section).
-- A table filled by a materialized view rather than a projection on usage_daily: the two read
-- alike at the same granularity, but a table takes its own index_granularity on every server
-- that runs the aggregates (21 and newer), where a projection's WITH SETTINGS is new (only
-- checked on chdb 4.4) and without it a look-up reads 8,192 rows per user and part (0.4 s at
-- 20 days); and a projection on a ReplacingMergeTree needs deduplicate_merge_projection_mode,
-- which servers before 24.8 do not know. The price: every insert into usage_daily writes a
-- second, narrow part (~10% more time per refresh), and gatewatch forget deletes the user here
-- too (ops.privacy.gdpr.AGGREGATE_TABLES).
-- Rows replace each other as in usage_daily (the same key and version), and expire with them.
CREATE TABLE IF NOT EXISTS {db}.usage_daily_by_user
(
    day Date,
    org_id LowCardinality(String),
    user_id String,
    model LowCardinality(String),
    region LowCardinality(String),
    experiment_id String,
    variant String,
    requests UInt64,
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_tokens UInt64,
    cache_write_tokens UInt64,
    computed_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(computed_at)
PARTITION BY toYYYYMM(day)
-- Indexed by the prefix a look-up filters on; granules of 1,024 rows, as a user has a few rows per part.
PRIMARY KEY (org_id, user_id, day)
ORDER BY (org_id, user_id, day, model, region, experiment_id, variant)
TTL day + INTERVAL {aggregate_ttl_days} DAY
SETTINGS index_granularity = 1024;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_daily_by_user_mv TO {db}.usage_daily_by_user AS
SELECT day, org_id, user_id, model, region, experiment_id, variant, requests, input_tokens, output_tokens,
    cache_read_tokens, cache_write_tokens, computed_at
FROM {db}.usage_daily;

-- Existing deployments: every row usage_daily holds, after the view exists, so that a row
-- written meanwhile is copied by one or both (the same key and version: one row once merged).
-- A one-time copy of the whole table (a year of a million users' daily rows is hundreds of
-- millions of narrow rows): a release with this migration starts its flows a while later.
INSERT INTO {db}.usage_daily_by_user
SELECT day, org_id, user_id, model, region, experiment_id, variant, requests, input_tokens, output_tokens,
    cache_read_tokens, cache_write_tokens, computed_at
FROM {db}.usage_daily;

-- A refresh (of a writer still on the previous release, in a rolling upgrade) that began
-- inserting before the view existed and committed while the copy above read: the view never
-- saw it and the copy read before it was visible. Its rows were stamped shortly before the
-- view was created, in the days a refresh writes (the raw retention): copied again here (the
-- same key and version, so never counted twice). One still running after this statement is
-- not: run `gatewatch migrate` between refreshes (or with the flows stopped) for an exact copy;
-- otherwise such a key is right again at its user's next refresh.
INSERT INTO {db}.usage_daily_by_user
SELECT day, org_id, user_id, model, region, experiment_id, variant, requests, input_tokens, output_tokens,
    cache_read_tokens, cache_write_tokens, computed_at
FROM {db}.usage_daily
WHERE day >= today() - INTERVAL {raw_ttl_days} DAY
  AND computed_at >= (SELECT max(metadata_modification_time) FROM system.tables
                      WHERE database = '{db}' AND name = 'usage_daily_by_user_mv') - INTERVAL 10 MINUTE;
