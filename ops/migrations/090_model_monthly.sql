-- Per-model monthly rollup: one row per (month, org, model) holding the absolute totals of that
-- org's month, recomputed from usage_model_daily by refresh_aggregates for every (org, month)
-- it touched and replacing the previous row (ReplacingMergeTree by computed_at), exactly once
-- like the daily rollup. "Top models of the month" reads one row per org and model here, the
-- same on the 30th as on the 2nd, instead of one per org, model and day so far this month.
-- No distinct-user count: a month's users are not the sum of its days' users, and counting
-- them from usage_daily would read a row per active user and day on every refresh.
CREATE TABLE IF NOT EXISTS {db}.usage_model_monthly
(
    month Date,
    org_id LowCardinality(String),
    model LowCardinality(String),
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
PARTITION BY toYYYYMM(month)
ORDER BY (month, org_id, model)
-- Kept while the daily rows it sums are: until its last day expires.
TTL toLastDayOfMonth(month) + INTERVAL {aggregate_ttl_days} DAY;

-- Existing deployments: the rollup of every month the daily rollup already holds.
INSERT INTO {db}.usage_model_monthly
SELECT toStartOfMonth(day), org_id, model, sum(requests), sum(errors), sum(input_tokens), sum(output_tokens),
    sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_usd), sum(latency_ms_sum),
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_quantiles), now64(3)
FROM {db}.usage_model_daily FINAL
GROUP BY toStartOfMonth(day), org_id, model;
