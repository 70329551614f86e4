-- A user's thumbs up/down on one response, joined to events by request_id. Comments are
-- redacted like prompts and expire with them; ratings live as long as aggregates.
CREATE TABLE IF NOT EXISTS {db}.feedback
(
    event_id String,
    request_id String,
    event_time DateTime64(3, 'UTC'),
    user_id String,
    org_id LowCardinality(String),
    region LowCardinality(String),
    rating LowCardinality(String),
    comment Nullable(String) TTL toDateTime(event_time) + INTERVAL {raw_ttl_days} DAY CODEC(ZSTD(3)),
    conversation_id Nullable(String),
    experiment_id Nullable(String),
    variant Nullable(String),
    policy_flags Array(LowCardinality(String)),
    classification LowCardinality(String),
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (org_id, request_id, event_id)
TTL toDateTime(event_time) + INTERVAL {aggregate_ttl_days} DAY;

-- Ratings per day, model and experiment variant: the A/B question "which variant do users prefer".
CREATE VIEW IF NOT EXISTS {db}.feedback_metrics AS
SELECT
    toDate(f.event_time) AS day,
    e.model AS model,
    ifNull(e.experiment_id, '') AS experiment_id,
    ifNull(e.variant, '') AS variant,
    countIf(f.rating = 'THUMBS_UP') AS thumbs_up,
    countIf(f.rating = 'THUMBS_DOWN') AS thumbs_down
FROM {db}.feedback AS f FINAL
INNER JOIN (SELECT request_id, model, experiment_id, variant FROM {db}.events FINAL) AS e ON e.request_id = f.request_id
GROUP BY day, model, experiment_id, variant;
