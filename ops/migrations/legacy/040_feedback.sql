-- A user's thumbs up/down on one response, joined to events by request_id (pre-21 servers:
-- no DateTime64 or column TTL).
CREATE TABLE IF NOT EXISTS {db}.feedback
(
    event_id String,
    request_id String,
    event_time DateTime('UTC'),
    user_id String,
    org_id String,
    region String,
    rating String,
    comment Nullable(String),
    conversation_id Nullable(String),
    experiment_id Nullable(String),
    variant Nullable(String),
    policy_flags Array(String),
    classification String,
    ingested_at DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (org_id, request_id, event_id);

CREATE VIEW IF NOT EXISTS {db}.feedback_metrics AS
SELECT
    toDate(event_time) AS day,
    model,
    ifNull(experiment_id, '') AS experiment_id,
    ifNull(variant, '') AS variant,
    countIf(rating = 'THUMBS_UP') AS thumbs_up,
    countIf(rating = 'THUMBS_DOWN') AS thumbs_down
FROM (SELECT request_id, event_time, rating FROM {db}.feedback FINAL)
ANY INNER JOIN (SELECT request_id, model, experiment_id, variant FROM {db}.events FINAL) USING request_id
GROUP BY day, model, experiment_id, variant;
