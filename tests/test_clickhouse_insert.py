"""The embedded (chdb) insert path: events go in as Arrow IPC bytes that ClickHouse parses
itself, and every column type comes back as it went in."""

import random
from decimal import Decimal

import pyarrow as pa

from ops.dev.loadgen import make_event
from ops.settings import PricingSettings
from sinks.billing import with_cost
from sinks.clickhouse import ClickHouse, arrow_stream_bytes, arrow_stream_size, close_chdb, write_arrow_stream
from sinks.parquet import to_table

PRICING = PricingSettings()


def events(count: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for n in range(count):
        event, _pii = make_event(rng, 1_795_000_000_000 + n, 20, 0.0)
        rows.append(with_cost({
            **event, "classification": "internal", "source_partition": n % 3, "source_offset": n,
            "pii_entity_counts": {"EMAIL_ADDRESS": n % 4, "PERSON": 1} if n % 2 else {},
            "safety_decisions": ["allowed"] if n % 5 == 0 else [],
            "policy_flags": ["pii_redacted", f"pii:{n % 3}"] if n % 3 else [],
            "model_version": None if n % 2 else "2026-01-01",
            "prompt": f"café №{n} <EMAIL_ADDRESS> 你好" if n % 7 else None,
        }, PRICING))
    return rows


def test_arrow_stream_bytes_hold_the_table():
    table = to_table(events(20))
    assert pa.ipc.open_stream(arrow_stream_bytes(table)).read_all().equals(table)


def test_an_arrow_stream_written_in_pieces_is_the_same_stream():
    table = pa.concat_tables([to_table(events(3000)), to_table(events(50))]).combine_chunks()
    pieces = []
    write_arrow_stream(table, lambda piece: pieces.append(bytes(piece)))
    whole = arrow_stream_bytes(table)
    assert b"".join(pieces) == whole
    assert arrow_stream_size(table) == len(whole)
    # The large buffers (the texts) go on by themselves; the small writes are gathered.
    assert len(pieces) < 40 and max(map(len, pieces)) > 65536


def test_chdb_stores_every_column_as_given(tmp_path):
    batch = events(300)
    clickhouse = ClickHouse(f"chdb://{tmp_path / 'chdb'}", "inserts")
    try:
        clickhouse.migrate()
        clickhouse.insert_events(batch)
        clickhouse.insert_events(batch[:100])  # a retried batch changes nothing read FINAL
        stored = clickhouse.rows(
            "SELECT event_id, toUnixTimestamp64Milli(event_time), model_version, safety_decisions, policy_flags, "
            "pii_entity_counts, cost_usd, prompt, source_partition, source_offset, input_tokens "
            "FROM inserts.events FINAL ORDER BY source_offset")
    finally:
        close_chdb()
    assert len(stored) == len(batch)
    for row, event in zip(stored, batch):
        event_id, at_ms, version, decisions, flags, counts, cost, prompt, partition, offset, tokens = row
        assert (event_id, at_ms, version, prompt) == (event["event_id"], event["event_time"],
                                                      event["model_version"], event["prompt"])
        assert (list(decisions), list(flags)) == (event["safety_decisions"], event["policy_flags"])
        assert dict(counts) == event["pii_entity_counts"]
        assert Decimal(cost) == event["cost_usd"]
        assert (partition, offset, tokens) == (event["source_partition"], event["source_offset"],
                                               event["input_tokens"])

