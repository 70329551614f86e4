-- Override for pre-21 servers (everything else in legacy migrations is generated from
-- ../120_audit_log_view.sql by sinks.legacy_sql.to_legacy): their events have no
-- pii_entity_counts (no Map columns), which the generated view would still name.
CREATE VIEW IF NOT EXISTS {db}.audit_log AS
SELECT event_id, request_id, org_id, user_id, event_time, classification, policy_flags, ingested_at AS logged_at
FROM {db}.events FINAL;
