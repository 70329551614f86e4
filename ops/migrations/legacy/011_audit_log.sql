-- One audit row per event, written in the same insert as the event itself (a materialized
-- view fires on every block inserted into events), so an event can never be stored
-- without its audit row (sinks.clickhouse.ClickHouse.events_without_audit checks it).
CREATE TABLE IF NOT EXISTS {db}.audit_log
(
    event_id String,
    request_id String,
    org_id String,
    user_id String,
    event_time DateTime('UTC'),
    classification String,
    policy_flags Array(String),
    
    logged_at DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree(logged_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (org_id, event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.audit_log_writer TO {db}.audit_log AS
SELECT event_id, request_id, org_id, user_id, event_time, classification, policy_flags, now() AS logged_at
FROM {db}.events;
