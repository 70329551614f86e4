-- Daily metrics read through FINAL so that a duplicate or a replay never counts twice.
-- The inner query renames the token columns: an aggregate may not share its argument's name.
CREATE VIEW IF NOT EXISTS {db}.daily_metrics AS
SELECT
    day,
    org_id,
    user_id,
    model,
    region,
    count() AS requests,
    countIf(status >= 400) AS errors,
    sum(t_input) AS input_tokens,
    sum(t_output) AS output_tokens,
    sum(t_cache_read) AS cache_read_tokens,
    sum(t_cache_write) AS cache_write_tokens,
    sum(t_input + t_output + t_cache_read + t_cache_write) AS total_tokens,
    sum(cost) AS cost_usd,
    quantile(0.5)(latency) AS latency_p50_ms,
    quantile(0.99)(latency) AS latency_p99_ms
FROM
(
    SELECT
        toDate(event_time) AS day, org_id, user_id, model, region, status_code AS status,
        input_tokens AS t_input, output_tokens AS t_output,
        cache_read_tokens AS t_cache_read, cache_write_tokens AS t_cache_write, latency_ms AS latency,
        cost_usd AS cost
    FROM {db}.events FINAL
)
GROUP BY day, org_id, user_id, model, region;
