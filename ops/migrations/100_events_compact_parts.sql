-- Parts of events stay Compact (all columns in one data.bin) until 128 MiB uncompressed,
-- about 45,000 loadgen events, instead of ClickHouse's default 10 MB: a flow's insert of a
-- few thousand events (3 KB of text each) otherwise makes a Wide part of ~160 files (a .bin
-- and marks per column and per substream: null maps, string sizes, dictionaries), and
-- creating and later deleting those files was a third of chdb's CPU per inserted row
-- (ext4 inode work in perf). Only the part format changes: the same rows, the same
-- ReplacingMergeTree merges and FINAL results; parts merged past the threshold are Wide.
-- Existing parts keep their format until they merge. Servers before 20.3 have neither
-- MODIFY SETTING nor compact parts (sinks.legacy_sql.LEGACY_SKIPPED).
ALTER TABLE {db}.events MODIFY SETTING min_bytes_for_wide_part = 134217728;
