"""Raw, redacted events as Parquet files under hive partitions event_date=/region=.

File names are derived from the event ids they hold, so writing the same batch again
(a retry, a replay after a crash) overwrites the file instead of duplicating rows.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import urlparse

import fsspec
from fsspec.exceptions import FSTimeoutError
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.pricing import price_decimals, scaled_prices, with_cost
from schemas.vocabulary import TOKEN_FIELDS, TOKEN_KINDS, event_key
from sinks.base import Batcher
from sinks.metrics import count_written
from sinks.retry import Retry, row_error, write_isolating
from sinks.text_cipher import KEY_ID_METADATA, TEXT_COLUMNS, open_table, seal_table

if TYPE_CHECKING:
    from sinks.dlq import DeadLetters

S3_PUT_TIMEOUT_S = 60.0
"""Longest an upload of one file may take before the sink retries it (parquet.put_timeout_s)."""

ARROW_SCHEMA = pa.schema([
    ("event_id", pa.string()),
    ("request_id", pa.string()),
    ("schema_version", pa.int32()),
    ("event_time", pa.timestamp("ms", tz="UTC")),
    ("user_id", pa.string()),
    ("org_id", pa.string()),
    ("region", pa.string()),
    ("provider", pa.string()),
    ("endpoint", pa.string()),
    ("model", pa.string()),
    ("model_version", pa.string()),
    ("status_code", pa.int32()),
    ("error_code", pa.string()),
    ("streaming", pa.bool_()),
    ("latency_ms", pa.int32()),
    ("time_to_first_token_ms", pa.int32()),
    ("input_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("cache_read_tokens", pa.int64()),
    ("cache_write_tokens", pa.int64()),
    ("reasoning_tokens", pa.int64()),
    ("prompt", pa.string()),
    ("response", pa.string()),
    ("conversation_id", pa.string()),
    ("trace_id", pa.string()),
    ("span_id", pa.string()),
    ("experiment_id", pa.string()),
    ("variant", pa.string()),
    ("safety_decisions", pa.list_(pa.string())),
    ("policy_flags", pa.list_(pa.string())),
    ("classification", pa.string()),
    ("pii_entity_counts", pa.map_(pa.string(), pa.int32())),
    ("cost_usd", pa.decimal128(18, 9)),
    ("price_version", pa.string()),
    ("source_partition", pa.int32()),
    ("source_offset", pa.int64()),
    # The live flow's windows' decision (dataflows.state.WindowTotals.decide), which a replay
    # repeats; null when no windows ran, or in files written before it was stored.
    ("window_outcome", pa.string()),
    ("window_start_ms", pa.int64()),
])
COLUMNS_SINCE = {"reasoning_tokens": 0, "trace_id": None, "span_id": None}
"""Columns that files written before gateway_event v2 lack, with the value they read as."""
DECISION_COLUMNS = {"window_outcome": None, "window_start_ms": None}
"""Columns that files written before the windows' decisions were stored lack: null, so a
replay decides those events' windows again, as it always did."""


def with_current_columns(table: pa.Table) -> pa.Table:
    """A stored table in ARROW_SCHEMA's columns: an older file's missing ones filled in."""
    for name, value in {**COLUMNS_SINCE, **DECISION_COLUMNS}.items():
        if name not in table.column_names:
            field = ARROW_SCHEMA.field(name)
            table = table.append_column(field, pa.array([value] * table.num_rows, field.type))
    return table.select(ARROW_SCHEMA.names)


def partition_of(event: dict) -> str:
    return partition_name(event["event_time"] // MS_PER_DAY, event["region"])


def partition_name(day_number: int, region: str) -> str:
    """The partition of a UTC day (counted from the epoch) and region."""
    return f"event_date={utc_day(day_number)}/region={region}"


MS_PER_DAY = 86_400_000


@lru_cache(maxsize=4096)
def utc_day(day_number: int) -> str:
    """The UTC date of a day counted from the epoch (floor division, so before 1970 too):
    a datetime per event cost ~2 µs, and a batch's events share a day or two."""
    return datetime.fromtimestamp(day_number * 86_400, tz=timezone.utc).date().isoformat()


def keeps_text(event: dict, sample_rate: float) -> bool:
    """Whether the event's raw text is kept: the same answer for the same event on every
    run, so a replay keeps exactly the texts the live run kept."""
    if sample_rate >= 1:
        return True
    digest = hashlib.blake2b(event_key(event["org_id"], event["event_id"]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < sample_rate


def sample_text(event: dict, sample_rate: float) -> dict:
    if keeps_text(event, sample_rate):
        return event
    return {**event, "prompt": None, "response": None}


def file_name(events: Iterable[dict]) -> str:
    return file_name_of_keys(event_key(e["org_id"], e["event_id"]) for e in events)


def file_name_of_table(table: pa.Table) -> str:
    """file_name of the table's events: the same name for the same events as dicts or as rows."""
    return file_name_of_keys(map(event_key, table.column("org_id").to_pylist(), table.column("event_id").to_pylist()))


def file_name_of_keys(keys: Iterable[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(keys)).encode())
    return f"part-{digest.hexdigest()[:24]}.parquet"


EVENT_FIELDS = pa.struct(list(ARROW_SCHEMA))
NON_TEXT_FIELDS = pa.struct([field for field in ARROW_SCHEMA if field.name not in TEXT_COLUMNS])


def to_table(events: list[dict]) -> pa.Table:
    """The events as an ARROW_SCHEMA table: pa.Table.from_pylist's (a missing field is null),
    built faster. from_pylist walks every event once per column, 38 dict visits per event, each
    cold in a flow process's heap (~40 % of its time in a py-spy profile of a drain); as one
    struct array Arrow reads each event's fields in one visit. On the system pool (a flow
    process's, ops.allocators.FLOW_ALLOCATOR_ENV) the long texts are built apart (text_array)."""
    texts_apart = pa.default_memory_pool().backend_name == "system"
    fields = NON_TEXT_FIELDS if texts_apart else EVENT_FIELDS
    columns = dict(zip(fields.names, pa.array(events, fields).flatten()))
    if texts_apart:
        for name in TEXT_COLUMNS:
            columns[name] = text_array([event.get(name) for event in events])
    table = pa.Table.from_arrays([columns[name] for name in ARROW_SCHEMA.names], schema=ARROW_SCHEMA)
    for name, value in COLUMNS_SINCE.items():
        # Events from before gateway_event v2 (a flow's recovery snapshot) lack the field.
        if value is not None and table.column(name).null_count:
            table = table.set_column(ARROW_SCHEMA.get_field_index(name), ARROW_SCHEMA.field(name),
                                     pc.fill_null(table.column(name), value))
    return table


def text_array(values: list) -> pa.Array:
    """pa.array(values, pa.string()) for long texts, its buffers allocated once at their final
    size: pa.array doubles its data buffer as it goes, and on the system pool with a fixed
    mmap threshold each step past it is a new mapping, copied into and faulted in page by page,
    then one more to shrink it (at a 128 KB threshold ~2 page faults per event for a prompt and
    a response, against ~0.7 here; 2.0-2.6 against 3.1-5.1 µs per event for both; at a flow's
    4 MB, to_table of 1,800 events at 6.1-6.3 against 6.8-7.3 µs per event). On a pool that
    keeps its pages (mimalloc, jemalloc) pa.array is the faster (0.7-0.9 against 1.1-1.5 µs)."""
    try:
        encoded = [b"" if value is None else value.encode() for value in values]
    except (AttributeError, UnicodeEncodeError):  # not text: pa.array raises its own error
        return pa.array(values, pa.string())
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
    if offsets[-1] >= 2**31:  # beyond int32 offsets, pa.array chunks the column
        return pa.array(values, pa.string())
    null_count = values.count(None)
    validity = None
    if null_count:
        valid = np.fromiter((value is not None for value in values), np.bool_, len(encoded))
        validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.string(), len(encoded),
                                 [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))],
                                 null_count=null_count)


def events_of(table: pa.Table) -> list[dict]:
    """The events of an ARROW_SCHEMA table as the flow holds them (to_table's inverse):
    event_time in epoch milliseconds, pii_entity_counts a dict."""
    events = table.to_pylist()
    times = table.column("event_time").cast(pa.int64()).to_pylist()
    for event, millis in zip(events, times):
        event["event_time"] = millis
        counts = event["pii_entity_counts"]
        event["pii_entity_counts"] = None if counts is None else dict(counts)
    return events


@dataclass(frozen=True)
class EventBlock:
    """The events of one Parquet partition in one Arrow table, built once per batch in the
    flow for every sink that stores rows (Parquet and ClickHouse): each used to build its
    own table from the same dicts, and held the dicts, 5 KB each on the Python heap and
    walked by the GC, while they waited for their batch."""

    partition: str
    table: pa.Table

    @property
    def region(self) -> str:
        return self.partition.rsplit("region=", 1)[1]


def event_blocks(events: list[dict], prices: NanoPrices | None = None) -> list[EventBlock | dict]:
    """One block per partition of the events, in the order each partition first appears;
    with prices, every row priced on the table's columns (priced_table). The events of a
    partition Arrow refuses stay dicts (priced one by one): the sinks then isolate and
    dead-letter the rows it refuses, as they do for any batch of dicts (sinks.retry)."""
    by_day_and_region: dict[tuple[int, str], list[dict]] = {}
    for event in events:
        # Named once per group, not per event (partition_of's string cost ~0.3 µs an event).
        by_day_and_region.setdefault((event["event_time"] // MS_PER_DAY, event["region"]), []).append(event)
    out: list[EventBlock | dict] = []
    for (day_number, region), rows in by_day_and_region.items():
        partition = partition_name(day_number, region)
        try:
            table = to_table(rows)
            out.append(EventBlock(partition, table if prices is None else priced_table(table, prices)))
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not row_error(exc):
                raise
            out.extend(rows if prices is None else [with_cost(row, prices.pricing) for row in rows])
    return out


COST_TYPE = ARROW_SCHEMA.field("cost_usd").type


class NanoPrices:
    """A price table as integers, for pricing a table's rows with numpy: each model's four
    prices per million tokens times 10**decimals (decimals: the most any price has), so a
    row's cost in nano-dollars is its tokens times those integers, scaled by 10**(3 -
    decimals) and rounded half to even: schemas.pricing.cost_usd to the nano-dollar, without
    a Decimal and a copy of the event dict per row (13 against 0.6 µs per event)."""

    def __init__(self, pricing):
        self.pricing = pricing
        prices = [*pricing.models.values(), *([pricing.default] if pricing.default is not None else [])]
        self.decimals = max([0, *map(price_decimals, prices)])
        self.models = pa.array(list(pricing.models), pa.string())
        # One row per model, then the default's (zeros: an unpriced model costs 0).
        scaled = [scaled_prices(price, self.decimals) for price in prices]
        if pricing.default is None:
            scaled.append([0] * len(TOKEN_KINDS))
        self.largest_row = max(map(sum, scaled))
        self.scaled = np.array(scaled, dtype=object if self.largest_row >= 2**62 else np.int64)

    def nanos(self, table: pa.Table) -> np.ndarray | None:
        """Each row's cost in nano-dollars, or None when int64 might not hold it."""
        counts = [table.column(name).to_numpy() for name in TOKEN_FIELDS]
        if not table.num_rows:
            return np.zeros(0, np.int64)
        most = max(int(count.max()) for count in counts)
        if min(int(count.min()) for count in counts) < 0 or \
                most * self.largest_row * 10 ** max(0, 3 - self.decimals) >= 2**62:
            return None
        row = pc.index_in(table.column("model"), value_set=self.models).fill_null(len(self.models)).to_numpy()
        units = sum(count * self.scaled[row, kind] for kind, count in enumerate(counts))
        if self.decimals <= 3:
            return units * 10 ** (3 - self.decimals)
        divisor = 10 ** (self.decimals - 3)  # even, so half of it is exact
        quotient, remainder = np.divmod(units, divisor)
        return quotient + ((remainder > divisor // 2) | ((remainder == divisor // 2) & (quotient % 2 == 1)))


def decimal_array(nanos: np.ndarray) -> pa.Array:
    """Non-negative int64 nano-dollars as Arrow decimal128(18, 9), without a Decimal per value:
    a decimal128 value is its unscaled integer in 16 little-endian bytes."""
    limbs = np.zeros((len(nanos), 2), dtype="<i8")
    limbs[:, 0] = nanos
    return pa.Array.from_buffers(COST_TYPE, len(nanos), [None, pa.py_buffer(limbs)])


def priced_table(table: pa.Table, prices: NanoPrices) -> pa.Table:
    """The table with each row's cost_usd and the price table's version (with_cost of every
    row, as columns)."""
    nanos = prices.nanos(table)
    if nanos is None or (len(nanos) and nanos.max() >= 10**18):
        return to_table([with_cost(event, prices.pricing) for event in events_of(table)])
    versions = pa.repeat(pa.scalar(prices.pricing.version, pa.string()), table.num_rows)
    cost_at, version_at = ARROW_SCHEMA.get_field_index("cost_usd"), ARROW_SCHEMA.get_field_index("price_version")
    table = table.set_column(cost_at, ARROW_SCHEMA.field(cost_at), decimal_array(nanos))
    return table.set_column(version_at, ARROW_SCHEMA.field(version_at), versions)


def partition_of_item(item: EventBlock | dict) -> str:
    return item.partition if isinstance(item, EventBlock) else partition_of(item)


def region_of_item(item: EventBlock | dict) -> str:
    return item.region if isinstance(item, EventBlock) else item["region"]


def rows_in(item: Any) -> int:
    return item.table.num_rows if isinstance(item, EventBlock) else 1


class BlockBatcher(Batcher):
    """A Batcher whose max_rows counts the rows of the EventBlocks it holds (an event dict,
    from a recovery snapshot taken before blocks, counts as one); a batch may pass max_rows
    by less than one block (one batch of the source, ~1,000 events)."""

    def __init__(self, max_rows: int, max_age_s: float, items: list | None = None, **kwargs):
        super().__init__(max_rows, max_age_s, items, **kwargs)
        self.rows = sum(map(rows_in, self.items))

    def on_item(self, item):
        if not self.items:
            self.first_at = self.clock()
        self.items.append(item)
        self.rows += rows_in(item)
        if self.rows >= self.max_rows:
            return self._emit()
        return [], Batcher.RETAIN

    def _take(self) -> list:
        self.rows = 0
        return super()._take()


def blocks_and_events(items: list, one_chunk: bool = False) -> tuple[TableRows | None, list[dict]]:
    """(the rows of a batch's EventBlocks as one table, its event dicts): dicts come from a
    snapshot taken before blocks, a caller without blocks, or rows Arrow refused. one_chunk
    copies the blocks into one chunk per column (ClickHouse: chdb then parses one record batch
    instead of one per block, ~15 % less CPU); the Parquet writer takes the chunks as they are
    (a copy of a 50,000-row batch was a process's peak resident memory, ~150 MB)."""
    # A block from a snapshot taken before DECISION_COLUMNS lacks them: Arrow concatenates
    # only tables of one schema.
    tables = [item.table if item.table.num_columns == len(ARROW_SCHEMA) else with_current_columns(item.table)
              for item in items if isinstance(item, EventBlock)]
    events = [item for item in items if not isinstance(item, EventBlock)]
    if not tables:
        return None, events
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    return TableRows(table.combine_chunks() if one_chunk else table), events


class TableRows:
    """A table as the row sequence sinks.retry.write_isolating halves: a slice is a table
    again (zero-copy); one row is its event dict, for the DLQ."""

    def __init__(self, table: pa.Table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, _step = index.indices(len(self))
            return TableRows(self.table.slice(start, max(0, stop - start)))
        return events_of(self.table.slice(index % len(self), 1))[0]


UNIQUE_PER_ROW = ("event_id", "request_id", "prompt", "response", "trace_id", "span_id", "source_offset")
"""Columns whose values hardly ever repeat in a file: a dictionary page would hold every value,
so the writer hashes and copies them all before it falls back to plain encoding (~20 % of
the write's CPU for a 3,800-row file, and the file came out 2 % larger)."""


def dictionary_columns(table: pa.Table) -> list[str]:
    return [name for name in table.column_names if name not in UNIQUE_PER_ROW]


class ParquetStore:
    """Writes and lists raw Parquet files in a local directory or an s3:// prefix."""

    def __init__(self, root: str, s3_endpoint_url: str | None = None, compression: str = "zstd",
                 text_keys: dict[str, bytes] | None = None, text_key_id: str | None = None,
                 put_timeout_s: float = S3_PUT_TIMEOUT_S):
        parsed = urlparse(root)
        self.s3_endpoint_url = s3_endpoint_url
        self.put_timeout_s = put_timeout_s
        if parsed.scheme == "s3":
            self.fs = self._s3()
            self.root = f"{parsed.netloc}{parsed.path}".rstrip("/")
        else:
            self.fs = fsspec.filesystem("file")
            self.root = os.path.abspath(parsed.path if parsed.scheme == "file" else root)
        self.compression = None if compression == "none" else compression
        self.text_keys = text_keys or {}
        self.text_key_id = text_key_id
        if text_key_id is not None and text_key_id not in self.text_keys:
            raise ValueError(f"text key id {text_key_id!r} has no key")

    def _s3(self) -> fsspec.AbstractFileSystem:
        # Fail fast and let the sink's own backoff retry: botocore's retries would hide an
        # outage from the metrics and hold the flow for minutes.
        options = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 30,
                                     "retries": {"max_attempts": 1, "mode": "standard"}},
                   "skip_instance_cache": True}
        if self.s3_endpoint_url:
            options["client_kwargs"] = {"endpoint_url": self.s3_endpoint_url}
        fs = fsspec.filesystem("s3", **options)
        fs.retries = 1
        return fs

    def write(self, partition: str, events: list[dict]) -> str:
        """Write one file for the events of one partition; return its path."""
        return self.write_table(partition, to_table(events))

    def write_table(self, partition: str, table: pa.Table) -> str:
        """Write one file for an ARROW_SCHEMA table of one partition's events; return its path."""
        path = f"{self.root}/{partition}/{file_name_of_table(table)}"
        self.fs.makedirs(f"{self.root}/{partition}", exist_ok=True)
        self.put(path, table)
        return path

    def put(self, path: str, table: pa.Table) -> None:
        """Store a table at path in one piece (its raw text sealed when a key is set)."""
        if self.text_key_id is not None:
            table = seal_table(table, self.text_key_id, self.text_keys[self.text_key_id])
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression=self.compression, use_dictionary=dictionary_columns(table))
        if self.fs.protocol in ("file", ("file", "local")):
            # A reader must never see half a file: write beside it, then rename.
            tmp = path + ".tmp"
            with open(tmp, "wb") as handle:
                handle.write(buffer.getvalue())
            os.replace(tmp, path)
        else:
            try:
                self.fs.pipe_file(path, buffer.getvalue(), timeout=self.put_timeout_s)
            except FSTimeoutError:
                # A server that stops reading the body holds an upload beyond botocore's read
                # timeout, its event loop idle; the next attempt gets a new session.
                self.fs = self._s3()
                raise

    def files(self) -> list[str]:
        self.fs.invalidate_cache(self.root)
        if not self.fs.exists(self.root):
            return []
        return sorted(p for p in self.fs.find(self.root) if p.endswith(".parquet"))

    def read_file(self, path: str) -> pa.Table:
        """One file's rows, raw text decrypted with the key its metadata names."""
        # One GET per file (no HEAD first: an S3 server may list an object it cannot yet HEAD).
        parquet = pq.ParquetFile(pa.BufferReader(self.fs.cat_file(path)))
        table = with_current_columns(parquet.read()).cast(ARROW_SCHEMA)
        key_id = (parquet.schema_arrow.metadata or {}).get(KEY_ID_METADATA)
        if key_id is not None:
            table = open_table(table.replace_schema_metadata({KEY_ID_METADATA: key_id}), self.text_keys)
        return table

    def read(self) -> pa.Table:
        files = self.files()
        if not files:
            return ARROW_SCHEMA.empty_table()
        return pa.concat_tables(self.read_file(f) for f in files)


class ParquetWriter:
    """The raw-Parquet sink's writer: batches keyed by partition (``partition_of``), each
    written as one file to the store of its region; rows the store refuses for good go to
    the DLQ and the rest are written (``write_isolating``)."""

    sink = "parquet"

    def __init__(self, root_of: Callable[[str], str], open_store: Callable[[str], ParquetStore], retry: Retry,
                 dead_letters: DeadLetters):
        self.root_of = root_of
        self.open_store = open_store
        self.retry = retry
        self.dead_letters = dead_letters
        self.stores: dict[str, ParquetStore] = {}

    def store_of(self, region: str) -> ParquetStore:
        root = self.root_of(region)
        if root not in self.stores:
            self.stores[root] = self.open_store(root)
        return self.stores[root]

    def __call__(self, batches: list[tuple[str, list]]) -> None:
        """Batches of EventBlocks (or event dicts) keyed by partition: one file each."""
        for partition, items in batches:
            # A partition is one event_date and region, so one store takes the whole batch.
            store = self.store_of(region_of_item(items[0]))
            rows, events = blocks_and_events(items)
            if rows is not None:
                self.write_rows(rows, lambda part: store.write_table(partition, part.table))
            if events:
                self.write_rows(events, lambda part: store.write(partition, part))

    def write_rows(self, rows: TableRows | list[dict], write: Callable) -> None:
        rejected = write_isolating(self.sink, write, rows, self.retry)
        self.dead_letters.send_refused_rows(self.sink, rejected)
        count_written(self.sink, len(rows) - len(rejected))
