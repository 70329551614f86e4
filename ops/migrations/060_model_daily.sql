-- Per-model daily rollup: one row per (day, org, model) holding the absolute totals of that
-- org's day, recomputed from usage_daily by refresh_aggregates for every (org, day) it
-- touched and replacing the previous row (ReplacingMergeTree by computed_at), exactly once
-- like usage_daily. Month-wide questions ("top models of the month", cost per model, org
-- totals per day) read a few rows per org and day here instead of one per active user.
CREATE TABLE IF NOT EXISTS {db}.usage_model_daily
(
    day Date,
    org_id LowCardinality(String),
    model LowCardinality(String),
    users UInt64,
    requests UInt64,
    errors UInt64,
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_tokens UInt64,
    cache_write_tokens UInt64,
    cost_usd Decimal(38, 9),
    latency_ms_sum UInt64,
    latency_quantiles AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), UInt32),
    computed_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(computed_at)
PARTITION BY toYYYYMM(day)
ORDER BY (day, org_id, model)
TTL day + INTERVAL {aggregate_ttl_days} DAY;

-- Existing deployments: the rollup of every day the aggregates already hold.
INSERT INTO {db}.usage_model_daily
SELECT day, org_id, model, uniqExact(user_id), sum(requests), sum(errors), sum(input_tokens), sum(output_tokens),
    sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_usd), sum(latency_ms_sum),
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_quantiles), now64(3)
FROM {db}.usage_daily FINAL
GROUP BY day, org_id, model;
