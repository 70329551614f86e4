-- Daily metrics read through FINAL so that a duplicate or a replay never counts twice.
CREATE VIEW IF NOT EXISTS {db}.daily_metrics AS
SELECT
    toDate(event_time) AS day,
    org_id,
    user_id,
    model,
    region,
    count() AS requests,
    countIf(status_code >= 400) AS errors,
    sum(e.input_tokens) AS input_tokens,
    sum(e.output_tokens) AS output_tokens,
    sum(e.cache_read_tokens) AS cache_read_tokens,
    sum(e.cache_write_tokens) AS cache_write_tokens,
    sum(e.input_tokens + e.output_tokens + e.cache_read_tokens + e.cache_write_tokens) AS total_tokens,
    quantile(0.5)(latency_ms) AS latency_p50_ms,
    quantile(0.99)(latency_ms) AS latency_p99_ms
FROM {db}.events AS e FINAL
GROUP BY day, org_id, user_id, model, region;
