-- Usage aggregates, the long-term store: one row per (hour or day, org, user, model, region,
-- experiment, variant) holding absolute totals recomputed from the deduplicated raw events
-- of that hour (sinks.clickhouse.ClickHouse.refresh_aggregates). A recomputation replaces
-- the previous row of its key (ReplacingMergeTree by computed_at), so a duplicate, a retried
-- batch, a crash or a replay changes no total: the aggregate is a function of the set of
-- distinct events, not of how often they arrived. Raw rows now expire after raw_days.
CREATE TABLE IF NOT EXISTS {db}.usage_hourly
(
    hour DateTime('UTC'),
    org_id LowCardinality(String),
    user_id String,
    model LowCardinality(String),
    region LowCardinality(String),
    experiment_id String,
    variant String,
    requests UInt64,
    errors UInt64,
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_tokens UInt64,
    cache_write_tokens UInt64,
    cost_usd Decimal(38, 9),
    latency_ms_sum UInt64,
    latency_quantiles AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), UInt32),
    classifications Map(String, UInt64),
    policy_flags Map(String, UInt64),
    computed_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(computed_at)
PARTITION BY toYYYYMM(hour)
ORDER BY (org_id, hour, model, user_id, region, experiment_id, variant)
TTL hour + INTERVAL {aggregate_ttl_days} DAY;

CREATE TABLE IF NOT EXISTS {db}.usage_daily
(
    day Date,
    org_id LowCardinality(String),
    user_id String,
    model LowCardinality(String),
    region LowCardinality(String),
    experiment_id String,
    variant String,
    requests UInt64,
    errors UInt64,
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_tokens UInt64,
    cache_write_tokens UInt64,
    cost_usd Decimal(38, 9),
    latency_ms_sum UInt64,
    latency_quantiles AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), UInt32),
    classifications Map(String, UInt64),
    policy_flags Map(String, UInt64),
    computed_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(computed_at)
PARTITION BY toYYYYMM(day)
ORDER BY (org_id, day, model, user_id, region, experiment_id, variant)
TTL day + INTERVAL {aggregate_ttl_days} DAY;

-- How far refresh_aggregates has looked at ingested_at (the newest row per name wins).
CREATE TABLE IF NOT EXISTS {db}.aggregate_progress
(
    name String,
    through DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(through)
ORDER BY name;

ALTER TABLE {db}.events ADD INDEX IF NOT EXISTS ingested_at_minmax ingested_at TYPE minmax GRANULARITY 1;
ALTER TABLE {db}.events MODIFY TTL toDateTime(event_time) + INTERVAL {raw_ttl_days} DAY;

-- The views keep their names and columns but read the aggregates (small, FINAL is cheap there).
DROP VIEW IF EXISTS {db}.daily_metrics;
CREATE VIEW {db}.daily_metrics AS
SELECT
    day, org_id, user_id, model, region,
    sum(d_requests) AS requests,
    sum(d_errors) AS errors,
    sum(d_input) AS input_tokens,
    sum(d_output) AS output_tokens,
    sum(d_cache_read) AS cache_read_tokens,
    sum(d_cache_write) AS cache_write_tokens,
    sum(d_input + d_output + d_cache_read + d_cache_write) AS total_tokens,
    sum(d_cost) AS cost_usd,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(d_latency)[1] AS latency_p50_ms,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(d_latency)[3] AS latency_p99_ms
FROM
(
    SELECT day, org_id, user_id, model, region, requests AS d_requests, errors AS d_errors,
           input_tokens AS d_input, output_tokens AS d_output, cache_read_tokens AS d_cache_read,
           cache_write_tokens AS d_cache_write, cost_usd AS d_cost, latency_quantiles AS d_latency
    FROM {db}.usage_daily FINAL
)
GROUP BY day, org_id, user_id, model, region;

DROP VIEW IF EXISTS {db}.hourly_metrics;
CREATE VIEW {db}.hourly_metrics AS
SELECT
    hour, org_id, model, region,
    sum(h_requests) AS requests,
    sum(h_errors) AS errors,
    sum(h_input) AS input_tokens,
    sum(h_output) AS output_tokens,
    sum(h_cache_read) AS cache_read_tokens,
    sum(h_cache_write) AS cache_write_tokens,
    sum(h_cost) AS cost_usd,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(h_latency)[1] AS latency_p50_ms,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(h_latency)[3] AS latency_p99_ms
FROM
(
    SELECT hour, org_id, model, region, requests AS h_requests, errors AS h_errors, input_tokens AS h_input,
           output_tokens AS h_output, cache_read_tokens AS h_cache_read, cache_write_tokens AS h_cache_write,
           cost_usd AS h_cost, latency_quantiles AS h_latency
    FROM {db}.usage_hourly FINAL
)
GROUP BY hour, org_id, model, region;

DROP VIEW IF EXISTS {db}.experiment_metrics;
CREATE VIEW {db}.experiment_metrics AS
SELECT
    day, experiment, arm, model,
    sum(d_requests) AS requests,
    sum(d_errors) AS errors,
    sum(d_tokens) AS total_tokens,
    sum(d_cost) AS cost_usd,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(d_latency)[1] AS latency_p50_ms,
    quantilesTDigestMerge(0.5, 0.95, 0.99)(d_latency)[3] AS latency_p99_ms
FROM
(
    SELECT day, experiment_id AS experiment, variant AS arm, model, requests AS d_requests, errors AS d_errors,
           input_tokens + output_tokens + cache_read_tokens + cache_write_tokens AS d_tokens,
           cost_usd AS d_cost, latency_quantiles AS d_latency
    FROM {db}.usage_daily FINAL
    WHERE experiment_id != ''
)
GROUP BY day, experiment, arm, model;

-- policy_flags keys are 'classification/flag'.
DROP VIEW IF EXISTS {db}.policy_metrics;
CREATE VIEW {db}.policy_metrics AS
SELECT day, org_id, splitByChar('/', key)[1] AS level, splitByChar('/', key)[2] AS flag, sum(n) AS requests
FROM
(
    SELECT day, org_id, arrayJoin(mapKeys(policy_flags)) AS key, policy_flags[key] AS n
    FROM {db}.usage_daily FINAL
)
GROUP BY day, org_id, level, flag;
