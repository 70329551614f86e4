"""The cheaper embedded insert of issue 17. Migration 100 keeps the events table's parts
Compact past ClickHouse's 10 MB default (one data file instead of ~160 per insert): only the
parts' format changes. Inserts no longer collapse a block's duplicates as they write it
(EMBEDDED_INSERT_SETTINGS); the merges and FINAL do. Duplicates within one insert and across
inserts still read once with FINAL, the latest version winning, before and after merging."""

import random
import time

from ops.dev.loadgen import make_event
from sinks.clickhouse import ClickHouse, close_chdb

CLICKHOUSE_DEFAULT_MIN_BYTES_FOR_WIDE_PART = 10 * 1024 * 1024


def events_with_texts(count: int, offset_base: int) -> list[dict]:
    """Events of ~3 KB of text each, like the flow's: a few thousand make a part past 10 MB."""
    rng = random.Random(11)
    words = [f"w{n}" for n in range(5000)]
    rows = []
    for n in range(count):
        event, _pii = make_event(rng, 1_795_000_000_000 + n, 50, 0.0)
        rows.append({**event, "classification": "internal", "source_partition": 0, "source_offset": offset_base + n,
                     "prompt": " ".join(rng.choices(words, k=200)), "response": " ".join(rng.choices(words, k=300)),
                     "safety_decisions": [], "policy_flags": [], "pii_entity_counts": {}})
    return rows


def test_events_parts_are_compact_and_duplicates_read_once_with_final(tmp_path):
    first = events_with_texts(4000, offset_base=0)
    # One insert holding an event twice (the second copy wins within a block), then a retry
    # of 500 events re-read from later offsets: the later insert's rows win.
    first.append({**first[10], "source_offset": 99_999})
    retried = [{**event, "source_offset": 10_000 + n} for n, event in enumerate(first[1000:1500])]
    clickhouse = ClickHouse(f"chdb://{tmp_path / 'chdb'}", "compact")
    try:
        assert "100_events_compact_parts" in clickhouse.migrate()
        clickhouse.execute("SYSTEM STOP MERGES compact.events")
        clickhouse.insert_events(first)
        time.sleep(0.01)  # ingested_at (ms) is the version: the retry's rows are strictly newer
        clickhouse.insert_events(retried)
        parts = clickhouse.rows("SELECT part_type, data_uncompressed_bytes FROM system.parts "
                                "WHERE database = 'compact' AND table = 'events' AND active ORDER BY rows DESC")

        def stored_final() -> dict[str, int]:
            return dict(clickhouse.rows("SELECT event_id, source_offset FROM compact.events FINAL"))

        before_merge = stored_final()
        (rows_stored,), = clickhouse.rows("SELECT count() FROM compact.events")
        clickhouse.execute("SYSTEM START MERGES compact.events")
        clickhouse.execute("OPTIMIZE TABLE compact.events FINAL")
        after_merge = stored_final()
        (rows_merged,), = clickhouse.rows("SELECT count() FROM compact.events")
        merged_parts = clickhouse.rows("SELECT part_type FROM system.parts "
                                       "WHERE database = 'compact' AND table = 'events' AND active")
    finally:
        close_chdb()
    assert len(parts) == 2 and parts[0][1] > CLICKHOUSE_DEFAULT_MIN_BYTES_FOR_WIDE_PART, parts
    assert [kind for kind, _bytes in parts] == ["Compact", "Compact"]
    expected = {event["event_id"]: event["source_offset"] for event in first}
    expected.update({event["event_id"]: event["source_offset"] for event in retried})
    assert expected[first[10]["event_id"]] == 99_999 and len(expected) == 4000
    # optimize_on_insert = 0 (sinks.clickhouse.EMBEDDED_INSERT_SETTINGS): the insert keeps
    # both copies of the event it held twice; FINAL and the merge collapse them.
    assert rows_stored == len(first) + len(retried) and before_merge == expected
    assert after_merge == expected and rows_merged == 4000
    assert merged_parts == [("Compact",)]


def test_inserts_stay_compact_and_a_large_merge_writes_a_wide_part(tmp_path):
    """Migration 110: the flow's inserts (at most clickhouse.max_rows) stay Compact, and a merge
    past 32 MiB and 25,000 rows writes Wide, which ClickHouse may merge column by column."""
    blocks = [events_with_texts(10_000, offset_base=n * 10_000) for n in range(3)]
    for n, block in enumerate(blocks):
        for m, event in enumerate(block):
            event["event_id"] = f"wide-{n}-{m}"
    clickhouse = ClickHouse(f"chdb://{tmp_path / 'chdb'}", "wide")
    try:
        assert "110_events_vertical_merges" in clickhouse.migrate()
        clickhouse.execute("SYSTEM STOP MERGES wide.events")
        for block in blocks:
            clickhouse.insert_events(block)
        inserted = clickhouse.rows("SELECT part_type FROM system.parts "
                                   "WHERE database = 'wide' AND table = 'events' AND active")
        clickhouse.execute("SYSTEM START MERGES wide.events")
        clickhouse.execute("OPTIMIZE TABLE wide.events FINAL")
        merged = clickhouse.rows("SELECT part_type, rows FROM system.parts "
                                 "WHERE database = 'wide' AND table = 'events' AND active")
        (distinct,), = clickhouse.rows("SELECT count() FROM wide.events FINAL")
    finally:
        close_chdb()
    assert inserted == [("Compact",)] * 3
    assert merged == [("Wide", 30_000)] and distinct == 30_000
