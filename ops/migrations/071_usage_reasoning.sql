-- Reasoning tokens (see 070) in the usage aggregates, the store that outlives raw rows.
-- Rows computed before read 0, as no event carried reasoning tokens then. A flow of an older
-- release (inserting by position, without column names) fails its aggregate refresh against
-- these tables and retries until it is replaced: upgrade flows together with this migration.
ALTER TABLE {db}.usage_hourly ADD COLUMN IF NOT EXISTS reasoning_tokens UInt64 DEFAULT 0;
ALTER TABLE {db}.usage_daily ADD COLUMN IF NOT EXISTS reasoning_tokens UInt64 DEFAULT 0;
