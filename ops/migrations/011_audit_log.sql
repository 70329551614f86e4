-- One audit row per event, written in the same insert as the event itself (a materialized
-- view fires on every block inserted into events), so an event can never be stored
-- without its audit row (sinks.clickhouse.ClickHouse.events_without_audit checks it).
CREATE TABLE IF NOT EXISTS {db}.audit_log
(
    event_id String,
    request_id String,
    org_id LowCardinality(String),
    user_id String,
    event_time DateTime64(3, 'UTC'),
    classification LowCardinality(String),
    policy_flags Array(LowCardinality(String)),
    pii_entity_counts Map(LowCardinality(String), UInt32),
    logged_at DateTime64(3, 'UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree(logged_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (org_id, event_id)
TTL toDateTime(event_time) + INTERVAL {aggregate_ttl_days} DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.audit_log_writer TO {db}.audit_log AS
SELECT event_id, request_id, org_id, user_id, event_time, classification, policy_flags, pii_entity_counts, now() AS logged_at
FROM {db}.events;
