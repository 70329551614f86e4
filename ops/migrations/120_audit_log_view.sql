-- Each event's audit row is read from events itself. The audit_log table copied eight of
-- its columns at every insert (a materialized view) and ClickHouse merged them again: ~10 µs
-- of CPU per event (ops/bench/FINDINGS.md) for rows that were stored, deduplicated, expired
-- and erased exactly as the events they copied. The compliance trail (append-only, keyed
-- user hashes) is the audit store, sinks/audit_log.py, not this table.
-- FINAL is inside: a reader's `FROM audit_log FINAL` does not reach through a view.
DROP TABLE IF EXISTS {db}.audit_log_writer;
DROP TABLE IF EXISTS {db}.audit_log;
CREATE VIEW IF NOT EXISTS {db}.audit_log AS
SELECT event_id, request_id, org_id, user_id, event_time, classification, policy_flags, pii_entity_counts,
       ingested_at AS logged_at
FROM {db}.events FINAL;
