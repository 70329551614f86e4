-- Hourly metrics, A/B experiment metrics and policy-flag counts, all read through FINAL.
CREATE VIEW IF NOT EXISTS {db}.hourly_metrics AS
SELECT
    hour, org_id, model, region,
    count() AS requests,
    countIf(status >= 400) AS errors,
    sum(t_input) AS input_tokens,
    sum(t_output) AS output_tokens,
    sum(t_cache_read) AS cache_read_tokens,
    sum(t_cache_write) AS cache_write_tokens,
    sum(cost) AS cost_usd,
    quantile(0.5)(latency) AS latency_p50_ms,
    quantile(0.99)(latency) AS latency_p99_ms
FROM
(
    SELECT
        toStartOfHour(event_time) AS hour, org_id, model, region, status_code AS status,
        input_tokens AS t_input, output_tokens AS t_output, cache_read_tokens AS t_cache_read,
        cache_write_tokens AS t_cache_write, cost_usd AS cost, latency_ms AS latency
    FROM {db}.events FINAL
)
GROUP BY hour, org_id, model, region;

CREATE VIEW IF NOT EXISTS {db}.experiment_metrics AS
SELECT
    day, experiment, arm, model,
    count() AS requests,
    countIf(status >= 400) AS errors,
    sum(tokens) AS total_tokens,
    sum(cost) AS cost_usd,
    quantile(0.5)(latency) AS latency_p50_ms,
    quantile(0.99)(latency) AS latency_p99_ms
FROM
(
    SELECT
        toDate(event_time) AS day, assumeNotNull(experiment_id) AS experiment, ifNull(variant, '') AS arm, model,
        status_code AS status, input_tokens + output_tokens + cache_read_tokens + cache_write_tokens AS tokens,
        cost_usd AS cost, latency_ms AS latency
    FROM {db}.events FINAL
    WHERE experiment_id IS NOT NULL
)
GROUP BY day, experiment, arm, model;

CREATE VIEW IF NOT EXISTS {db}.policy_metrics AS
SELECT day, org_id, level, flag, count() AS requests
FROM
(
    SELECT toDate(event_time) AS day, org_id, classification AS level, arrayJoin(policy_flags) AS flag
    FROM {db}.events FINAL
)
GROUP BY day, org_id, level, flag;
