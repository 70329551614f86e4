-- Merges of events keep less in memory: a merged part past 32 MiB and 25,000 rows is Wide,
-- and merges of 16,384 rows or more go column by column (ClickHouse's vertical merge, which
-- only writes Wide parts) instead of reading every column of every part at once. Horizontal
-- merges of Compact parts held ~300 MB in the chdb host, its peak (ops/bench/FINDINGS.md,
-- issue 17): the host peaked at 566-658 MB with this against 716-733 MB without, flow
-- processes embedding chdb 40-85 MB lower, at the same CPU in the host and ~2-3 µs per event
-- more of merging in a flow process. Inserts stay Compact (migration 100): the flow's are at
-- most clickhouse.max_rows (20,000) rows.
-- Servers before 20.3 have neither MODIFY SETTING nor these settings (sinks.legacy_sql.LEGACY_SKIPPED).
ALTER TABLE {db}.events MODIFY SETTING min_bytes_for_wide_part = 33554432, min_rows_for_wide_part = 25000,
    vertical_merge_algorithm_min_rows_to_activate = 16384;
