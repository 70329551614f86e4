"""One Arrow table per batch, shared by the Parquet and ClickHouse sinks (sinks/parquet.py
EventBlock): the same rows and file names as the per-sink tables it replaces, batches that
count rows, and event dicts (a snapshot's, or rows Arrow refuses) still written."""

from __future__ import annotations

import io
import pickle
import random
from contextlib import contextmanager
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ops.settings import ModelPrice, PricingSettings
from schemas.pricing import with_cost
from schemas.vocabulary import TOKEN_FIELDS
from sinks.clickhouse import ClickHouse, ClickHouseWriter, arrow_stream_bytes, close_chdb
from sinks.parquet import (ARROW_SCHEMA, COLUMNS_SINCE, BlockBatcher, EventBlock, NanoPrices, ParquetStore,
                           ParquetWriter, TableRows, blocks_and_events, event_blocks, events_of, file_name,
                           file_name_of_table, partition_of, priced_table, to_table)
from sinks.retry import retry_policy
from tests.test_chdb_session import running_in_background
from tests.test_clickhouse_insert import events


class NoDeadLetters:
    def __init__(self):
        self.refused = []

    def send_refused_rows(self, sink, rejected):
        self.refused.extend((sink, row) for row, _exc in rejected)


def as_stored(event: dict) -> dict:
    """An event as to_table stores it: the schema's fields, those since v2 defaulted."""
    return {name: COLUMNS_SINCE[name] if event.get(name) is None and name in COLUMNS_SINCE else event.get(name)
            for name in ARROW_SCHEMA.names}


def spread(count: int) -> list[dict]:
    """Events over two days and two regions: four partitions."""
    rows = events(count)
    for n, event in enumerate(rows):
        event["region"] = "eu" if n % 2 else "us"
        event["event_time"] += (n % 3 == 0) * 86_400_000
    return rows


def test_blocks_hold_each_partitions_events_as_the_sinks_own_tables_did():
    rows = spread(60)
    blocks = event_blocks(rows)
    assert [block.partition for block in blocks] == list(dict.fromkeys(map(partition_of, rows)))
    assert sum(block.table.num_rows for block in blocks) == len(rows)
    for block in blocks:
        mine = [event for event in rows if partition_of(event) == block.partition]
        assert block.table.equals(to_table(mine))
        assert block.region == mine[0]["region"]
        assert file_name_of_table(block.table) == file_name(mine), "a replay must rewrite the same file"
        assert events_of(block.table) == list(map(as_stored, mine))


def test_a_partition_arrow_refuses_stays_dicts_for_the_sinks_to_isolate():
    rows = spread(8)
    rows[2]["latency_ms"] = 2**40  # no int32
    items = event_blocks(rows)
    bad = partition_of(rows[2])
    assert [item for item in items if isinstance(item, dict)] == [e for e in rows if partition_of(e) == bad]
    assert all(item.partition != bad for item in items if isinstance(item, EventBlock))


def test_the_batcher_counts_rows_and_resumes_from_a_snapshot_of_dicts_or_blocks():
    block, = event_blocks([dict(event, region="eu") for event in events(30)])
    batcher = BlockBatcher(50, 60)
    assert batcher.on_item(block) == ([], BlockBatcher.RETAIN)
    emitted, state = batcher.on_item(block)
    assert state == BlockBatcher.DISCARD and emitted == [[block, block]] and batcher.rows == 0
    assert BlockBatcher(50, 60, pickle.loads(pickle.dumps([block, *events(3)]))).rows == 33
    old = BlockBatcher(4, 60, events(3))  # a snapshot of the per-event batcher
    assert old.on_item(events(1)[0])[1] == BlockBatcher.DISCARD


def test_both_writers_store_a_batch_of_blocks_and_dicts_and_share_its_tables(tmp_path):
    rows = [dict(event, region="eu") for event in events(40)]
    partition = partition_of(rows[0])
    assert {partition_of(event) for event in rows} == {partition}
    blocks = event_blocks(rows[:30])
    batch = [*blocks, *rows[30:]]  # a resumed snapshot's dicts after the new blocks
    table, dicts = blocks_and_events(batch)
    assert len(table) == 30 and dicts == rows[30:]

    dead = NoDeadLetters()
    ParquetWriter(lambda region: str(tmp_path / "raw" / region), ParquetStore, retry_policy(0.01, 0.01), dead)(
        [(partition, batch)])
    stored = ParquetStore(str(tmp_path / "raw" / "eu")).read()
    assert sorted(stored.column("event_id").to_pylist()) == sorted(e["event_id"] for e in rows)
    assert len(ParquetStore(str(tmp_path / "raw" / "eu")).files()) == 2  # the blocks' file and the dicts'

    writer = ClickHouseWriter(f"chdb://{tmp_path / 'chdb'}", retry_policy(0.01, 0.01), dead, raw_days=30,
                              aggregate_days=365, aggregate_interval_s=3600, lateness_s=60)
    try:
        writer([("blocks", batch)])
        writer([("blocks", blocks)])  # the same blocks again (a retry) change nothing read FINAL
        (count,), = ClickHouse(writer.url, "blocks").rows("SELECT count() FROM blocks.events FINAL")
    finally:
        close_chdb()
    assert count == len(rows) and dead.refused == []


def test_a_row_arrow_refuses_is_dead_lettered_and_the_rest_written(tmp_path):
    rows = [dict(event, region="eu") for event in events(6)]
    rows[4]["latency_ms"] = 2**40
    dead = NoDeadLetters()
    writer = ParquetWriter(lambda region: str(tmp_path / region), ParquetStore, retry_policy(0.01, 0.01), dead)
    writer([(partition_of(rows[0]), event_blocks(rows))])
    stored = ParquetStore(str(tmp_path / "eu")).read().column("event_id").to_pylist()
    assert sorted(stored) == sorted(e["event_id"] for n, e in enumerate(rows) if n != 4)
    assert [(sink, row["event_id"]) for sink, row in dead.refused] == [("parquet", rows[4]["event_id"])]


def test_table_rows_halve_as_tables_and_give_one_row_as_its_event():
    rows = events(5)
    block = TableRows(to_table(rows))
    assert len(block[1:4]) == 3 and block[1:4].table.equals(to_table(rows[1:4]))
    assert block[2] == as_stored(rows[2])


def test_partition_of_names_the_utc_day_of_the_event_time_at_every_boundary():
    def day(ms: int) -> str:
        return partition_of({"event_time": ms, "region": "eu"})

    assert day(0) == day(86_399_999) == "event_date=1970-01-01/region=eu"
    assert day(86_400_000) == "event_date=1970-01-02/region=eu"
    assert day(-1) == "event_date=1969-12-31/region=eu"
    leap_end = 1_709_251_199_999  # 2024-02-29T23:59:59.999Z
    assert day(leap_end) == "event_date=2024-02-29/region=eu"
    assert day(leap_end + 1) == "event_date=2024-03-01/region=eu"


def priced_rows(pricing, count: int = 400) -> list[dict]:
    """Events of every priced model and one unpriced, with token counts from 0 to millions."""
    rng = random.Random(3)
    models = [*pricing.models, "model-without-price"]
    rows = [dict(event, region="eu") for event in events(count)]
    for n, event in enumerate(rows):
        event["model"] = models[n % len(models)]
        for field in TOKEN_FIELDS:
            event[field] = rng.choice([0, 1, 3, 7, rng.randint(0, 5000), rng.randint(0, 10_000_000)])
    return rows


def price(**prices: str) -> ModelPrice:
    return ModelPrice(**{kind: Decimal(value) for kind, value in prices.items()})


@pytest.mark.parametrize("pricing", [
    PricingSettings(),  # the shipped table: two decimals
    PricingSettings(version="odd", default=price(input="1.000005", output="0", cache_read="0.25", cache_write="2.5"),
                    models={"gpt-4o": price(input="0.000125", output="3.141593", cache_read="0.5",
                                            cache_write="0.0000005")}),
    PricingSettings(version="halves", models={"gpt-4o": price(input="0.0005", output="0.0015", cache_read="0.0025",
                                                              cache_write="0")}),  # exact half nano-dollars
], ids=["shipped", "seven-decimals-and-default", "half-nanos"])
def test_blocks_are_priced_on_their_columns_as_with_cost_prices_each_event(pricing):
    rows = priced_rows(pricing)
    prices = NanoPrices(pricing)
    assert prices.nanos(to_table(rows)) is not None, "these counts and prices take the vectorized path"
    block, = event_blocks(rows, prices)
    assert block.table.equals(to_table([with_cost(event, pricing) for event in rows]))


def test_costs_beyond_int64_are_priced_one_by_one_and_beyond_the_column_refused_as_before():
    pricing = PricingSettings(models={"gpt-4o": price(input="12345.123456789123", output="1", cache_read="1",
                                                      cache_write="1")})
    rows = [dict(event, model="gpt-4o") for event in priced_rows(pricing, 20)]
    rows[0]["input_tokens"] = 10_000_000  # ~$123k: in decimal128(18, 9), beyond int64 at 12 decimals
    prices = NanoPrices(pricing)
    assert prices.nanos(to_table(rows)) is None
    assert priced_table(to_table(rows), prices).equals(to_table([with_cost(event, pricing) for event in rows]))
    rows[1]["input_tokens"] = 10**14  # a cost past decimal128(18, 9): Arrow refuses the partition
    items = event_blocks(rows, prices)
    assert items == [with_cost(event, pricing) for event in rows]


def blocks_before_integer_grouping(rows: list[dict], pricing) -> list[tuple[str, pa.Table]]:
    """event_blocks as it was built before: grouped by partition_of, each group's table of
    with_cost rows, built row by row (the definition the column pricing and building are held to)."""
    groups: dict[str, list[dict]] = {}
    for event in rows:
        groups.setdefault(partition_of(event), []).append(event)
    return [(partition, per_event_table([with_cost(event, pricing) for event in group]))
            for partition, group in groups.items()]


def parquet_bytes(table: pa.Table) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out, compression="zstd")
    return out.getvalue()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), count=st.integers(1, 120), days=st.integers(1, 3),
       regions=st.lists(st.sampled_from(["eu", "us", "apac", "eu-west-1"]), min_size=1, max_size=3, unique=True))
def test_blocks_give_the_parquet_bytes_and_clickhouse_stream_of_the_per_event_path(seed, count, days, regions):
    rng = random.Random(seed)
    rows = priced_rows(PricingSettings(), count)
    for event in rows:  # partitions interleaved, as a batch of many users' events
        event["region"] = rng.choice(regions)
        event["event_time"] += rng.randrange(days) * 86_400_000 - 43_200_000
    blocks = event_blocks(rows, NanoPrices(PricingSettings()))
    before = blocks_before_integer_grouping(rows, PricingSettings())
    assert [block.partition for block in blocks] == [partition for partition, _table in before]
    for block, (_partition, table) in zip(blocks, before):
        assert block.table.equals(table)
        assert parquet_bytes(block.table) == parquet_bytes(table)
        assert arrow_stream_bytes(block.table) == arrow_stream_bytes(table)
    rows_of_batch, _dicts = blocks_and_events(blocks, one_chunk=True)
    assert arrow_stream_bytes(rows_of_batch.table) == arrow_stream_bytes(pa.concat_tables(t for _p, t in before)
                                                                          .combine_chunks())


def per_event_table(rows: list[dict]) -> pa.Table:
    """The table pyarrow builds row by row (pa.Table.from_pylist), the definition to_table's
    columns are held to."""
    return pa.Table.from_pylist([as_stored(event) for event in rows], schema=ARROW_SCHEMA)


ARROW_POOLS = [pa.system_memory_pool(), pa.mimalloc_memory_pool()]
"""to_table builds the texts apart on the system pool (a flow process's) and with the other
fields on a pool that keeps its pages: both paths are held to from_pylist."""


@contextmanager
def default_pool(pool: pa.MemoryPool):
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


TEXTS = st.one_of(st.none(), st.text(max_size=40), st.text(alphabet="ab <>\n", min_size=200, max_size=3000),
                  st.sampled_from(["", "café №1 你好 🙂", "<EMAIL_ADDRESS> and <PERSON>"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(st.tuples(TEXTS, TEXTS), min_size=1, max_size=40), seed=st.integers(0, 2**16),
       priced=st.booleans())
def test_to_table_builds_the_tables_parquet_and_arrow_stream_of_from_pylist(texts, seed, priced):
    rows = [dict(event, prompt=prompt, response=response)
            for event, (prompt, response) in zip(events(len(texts), seed), texts)]
    if not priced:  # the flow's events: no cost yet (priced on the table's columns)
        rows = [{name: value for name, value in event.items() if name not in ("cost_usd", "price_version")}
                for event in rows]
    expected = per_event_table(rows)
    for pool in ARROW_POOLS:
        with default_pool(pool):
            table = to_table(rows)
        assert table.equals(expected), pool.backend_name
        assert parquet_bytes(table) == parquet_bytes(expected)
        assert arrow_stream_bytes(table) == arrow_stream_bytes(expected)


@pytest.mark.parametrize("pool", ARROW_POOLS, ids=lambda pool: pool.backend_name)
def test_events_that_differ_in_fields_get_the_nulls_from_pylist_gives(pool):
    rows = events(6)
    rows[0].pop("model_version")  # missing in the first row, present after it
    rows[3].pop("latency_ms")  # present in the first row, missing after it
    rows[5].pop("cost_usd")
    with default_pool(pool):
        assert to_table(rows).equals(per_event_table(rows))
        assert to_table([{"event_id": "only-one-field"}]).equals(per_event_table([{"event_id": "only-one-field"}]))
        assert to_table([]).equals(ARROW_SCHEMA.empty_table())


ODD_VALUES = [("prompt", 7), ("prompt", b"bytes are text to Arrow"), ("response", b"\xff not UTF-8"),
              ("prompt", "\ud800 a lone surrogate"), ("latency_ms", "12"), ("latency_ms", 1.5), ("latency_ms", 2**40),
              ("event_time", 2**70), ("policy_flags", "not a list"), ("policy_flags", [1, 2]),
              ("pii_entity_counts", {"PERSON": "x"}), ("pii_entity_counts", [("PERSON", 1)]), ("streaming", 3),
              ("region", 5), ("status_code", 2**31)]


@pytest.mark.parametrize("pool", ARROW_POOLS, ids=lambda pool: pool.backend_name)
@pytest.mark.parametrize("field, value", ODD_VALUES)
def test_a_value_of_another_type_gives_what_from_pylist_gives(field, value, pool):
    """The same table, or the same error: the sinks dead-letter a partition's rows for Arrow's
    errors only (sinks.retry.row_error), and any other would stop the flow."""
    rows = events(3)
    rows[1][field] = value
    try:
        expected = per_event_table(rows)
    except Exception as refused:  # noqa: BLE001 - the same refusal is expected below
        with default_pool(pool), pytest.raises(type(refused)):
            to_table(rows)
    else:
        with default_pool(pool):
            assert to_table(rows).equals(expected)


def test_inserts_go_on_while_a_periodic_refresh_runs_and_close_waits_for_it(tmp_path, monkeypatch):
    import threading
    import time

    import sinks.clickhouse as clickhouse

    now_ms = int(time.time() * 1000)
    rows = [dict(event, event_id=f"bg-{n}", event_time=now_ms - n) for n, event in enumerate(events(40))]
    release, refreshing = threading.Event(), threading.Event()
    real_refresh = clickhouse.refresh_aggregates

    def held_refresh(client, *args, **kwargs):
        refreshing.set()
        release.wait()
        return real_refresh(client, *args, **kwargs)

    monkeypatch.setattr(clickhouse, "refresh_aggregates", held_refresh)
    writer = ClickHouseWriter(f"chdb://{tmp_path / 'chdb'}", retry_policy(0.01, 0.01), NoDeadLetters(), raw_days=30,
                              aggregate_days=365, aggregate_interval_s=0, lateness_s=60)
    try:
        for batch in (rows[:20], rows[20:]):  # the first starts the refresh, the second comes during it
            writing = threading.Thread(target=writer, args=([("bg", event_blocks(batch))],))
            writing.start()
            writing.join(30)
            assert not writing.is_alive(), "a batch waited for the refresh"
            assert refreshing.wait(30)
        (stored,), = ClickHouse(writer.url, "bg").rows("SELECT count() FROM bg.events FINAL")
        assert stored == 40 and not writer.refresh_idle.is_set()
        release.set()
        writer.close()  # waits for the periodic refresh, then refreshes what came after it
        assert writer.refresh_idle.is_set()
        (requests,), = ClickHouse(writer.url, "bg").rows("SELECT sum(requests) FROM bg.usage_daily FINAL")
    finally:
        release.set()
        close_chdb()
    assert requests == 40


def test_a_refresh_asked_for_while_one_runs_follows_it_with_no_later_batch(tmp_path, monkeypatch):
    """The quiet stream's tick (an empty batch) comes while a long refresh runs, after that
    refresh read its rows: the rows of the batch before the tick are aggregated once it ends,
    with no batch or close after them."""
    import threading
    import time

    import sinks.clickhouse as clickhouse

    now_ms = int(time.time() * 1000)
    rows = [dict(event, event_id=f"tick-{n}", event_time=now_ms - n) for n, event in enumerate(events(40))]
    release, refreshed, calls = threading.Event(), threading.Event(), []
    real_refresh = clickhouse.refresh_aggregates

    def refresh_held_after_reading(client, *args, **kwargs):
        calls.append(real_refresh(client, *args, **kwargs))
        refreshed.set()
        release.wait()
        return calls[-1]

    monkeypatch.setattr(clickhouse, "refresh_aggregates", refresh_held_after_reading)
    writer = ClickHouseWriter(f"chdb://{tmp_path / 'chdb'}", retry_policy(0.01, 0.01), NoDeadLetters(), raw_days=30,
                              aggregate_days=365, aggregate_interval_s=0, lateness_s=60)
    try:
        writer([("tick", event_blocks(rows[:20]))])  # starts the refresh, which reads these 20
        assert refreshed.wait(30)
        writer([("tick", event_blocks(rows[20:]))])  # asks for one while it runs
        writer([("tick", [])])  # the tick, the stream's last call
        release.set()
        assert writer.refresh_idle.wait(30)  # idle once the refresh that follows has ended too
        (requests,), = ClickHouse(writer.url, "tick").rows("SELECT sum(requests) FROM tick.usage_daily FINAL")
    finally:
        release.set()
        close_chdb()
    assert len(calls) == 2 and requests == 40


def test_each_refresh_that_recomputes_keys_reports_them_and_its_duration(tmp_path, monkeypatch):
    import time

    import sinks.clickhouse as clickhouse
    from sinks import metrics

    class Recorded(metrics.NoOpMetrics):
        def __init__(self):
            self.keys, self.seconds = [], []

        def increment(self, name, value=1, tags=None):
            if name == "gatewatch_aggregate_keys":
                self.keys.append(value)

        def timing(self, name, seconds, tags=None):
            if name == "gatewatch_aggregate_refresh_seconds":
                self.seconds.append(seconds)

    recorded, returned = Recorded(), []
    real_refresh = clickhouse.refresh_aggregates

    def counted_refresh(client, *args, **kwargs):
        returned.append(real_refresh(client, *args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(clickhouse, "refresh_aggregates", counted_refresh)
    monkeypatch.setattr(metrics, "_backend", recorded)
    now_ms = int(time.time() * 1000)
    rows = [dict(event, event_id=f"keys-{n}", event_time=now_ms - n) for n, event in enumerate(events(30))]
    writer = ClickHouseWriter(f"chdb://{tmp_path / 'chdb'}", retry_policy(0.01, 0.01), NoDeadLetters(), raw_days=30,
                              aggregate_days=365, aggregate_interval_s=3600, lateness_s=60)
    try:
        writer([("keys", event_blocks(rows))])
        writer.close()  # the forced refresh
    finally:
        close_chdb()
    distinct = {(row["org_id"], row["event_time"] // 3_600_000, row["user_id"]) for row in rows}
    assert returned and returned[-1] == len(distinct)
    assert recorded.keys == [keys for keys in returned if keys] and len(recorded.seconds) == len(recorded.keys)
    assert all(seconds > 0 for seconds in recorded.seconds)


def test_writers_of_one_database_whose_refreshes_start_together_recompute_its_keys_once(tmp_path, monkeypatch, caplog):
    """Two flows started together refresh together: the second to start finds the first's
    statements in the process list and leaves the keys to it."""
    import threading
    import time

    import sinks.clickhouse as clickhouse

    url, returned, first_held = f"chdb://{tmp_path / 'chdb'}", [], threading.Event()
    real_refresh = clickhouse.refresh_aggregates
    caplog.set_level("INFO", logger="sinks.clickhouse")

    def first_refresh_slow_to_start(client, *args, **kwargs):
        if not first_held.is_set():
            held = running_in_background(client, 5, [])  # the refresh's first statement, on its labelled client
            first_held.set()
            held.join()
        returned.append(real_refresh(client, *args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(clickhouse, "refresh_aggregates", first_refresh_slow_to_start)
    now_ms = int(time.time() * 1000)
    rows = [dict(event, event_id=f"once-{n}", event_time=now_ms - n) for n, event in enumerate(events(40))]
    first, second = (ClickHouseWriter(url, retry_policy(0.01, 0.01), NoDeadLetters(), raw_days=30, aggregate_days=365,
                                      aggregate_interval_s=0, lateness_s=60) for _ in range(2))
    try:
        first([("shared", event_blocks(rows[:20]))])
        assert first_held.wait(30)
        second([("shared", event_blocks(rows[20:]))])
        assert second.refresh_idle.wait(30) and first.refresh_idle.wait(30)
        distinct = {(row["org_id"], row["event_time"] // 3_600_000, row["user_id"]) for row in rows}
        assert returned == [len(distinct)]  # the first's, with the second's rows: they came while it held
        assert "aggregate refresh left to another writer's, running" in caplog.text
        (requests,), = ClickHouse(url, "shared").rows("SELECT sum(requests) FROM shared.usage_daily FINAL")
        assert requests == 40
    finally:
        close_chdb()
