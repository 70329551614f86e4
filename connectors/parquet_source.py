"""A Bytewax source over the raw Parquet files of a date range, every region's in one
partition, resumable at (file, row) after a crash.

Files are read by event date, and a date's files in the order they were written (modification
time, then name): every file of a date before any file of a later one, which lets the replay's
windows forget a date's windows once it has moved past that date
(dataflows.state.WindowTotals.forget_before_ms). One partition reads every region: a user may
send through API keys of several regions, and a partition per region could read one region's
files days ahead of another's. Within a date the order may differ from the order of arrival
(S3 keeps modification times to the second and names are content hashes; a copied file is
newer than its rows); the windows do not depend on it. Write order alone would not do: each
date's rows are batched apart, so a newer date's file may be written before an older date's
file holding rows that arrived earlier. The live flow's windows decided each event's fate
(counted in which window, sent as a late adjustment, or to the DLQ) from the order its
user's events arrived in and from how long the user had been idle, neither of which the
files keep: an event dated before midnight that arrived after its user's events of the next
day is stored in the earlier day's file, often read first, and an idle user's windows were
retired on the wall clock. So the live flow stores each decision with the raw row
(window_outcome, window_start_ms; dataflows.outputs.fan_out) and the replay's windows
repeat it (dataflows.state.WindowTotals.decide): the same window totals and adjustments, the
same billing ids and versions as live, whatever the order of the files.

Rows without a decision (files written before it was stored, or by a flow without quota or
billing) are decided again by the replay from the order read, as they always were: for
those, a replay of a range holding such midnight or idle cases may differ from live.

Given a window floor (the earliest window a file's rows may be counted in,
dataflows.state.counted_window_floor), the source reads those columns of every file still
to read when it starts (or resumes) and gives each event its file's horizon: the lowest floor
of that file and every later one (file_horizons). The replay's windows forget what ends by it,
so they hold what the files read together overlap in time, not a whole date per user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from sinks.metrics import get_metrics
from sinks.parquet import ParquetStore

FINISHED = ("", 0)
_PARTITION = re.compile(r"event_date=(\d{4}-\d{2}-\d{2})/region=([^/]+)/")


@dataclass(frozen=True)
class RawFile:
    path: str
    event_date: date
    region: str
    written: float
    rows: int | None = None


def _written(info: dict[str, Any]) -> float:
    stamp = info.get("mtime", info.get("LastModified"))
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    return float(stamp or 0)


def select_files(listing: dict[str, dict], first: date, last: date, region: str | None = None) -> list[RawFile]:
    """The files of event dates first..last (and one region), by date, a date's in the order
    they were written."""
    chosen = []
    for path, info in listing.items():
        found = _PARTITION.search(path)
        if not path.endswith(".parquet") or not found:
            continue
        day, where = date.fromisoformat(found.group(1)), found.group(2)
        if first <= day <= last and region in (None, where):
            chosen.append(RawFile(path, day, where, _written(info)))
    return sorted(chosen, key=read_order)


def read_order(raw: RawFile) -> tuple[date, float, str]:
    return raw.event_date, raw.written, raw.path


def list_files(store: ParquetStore, first: date, last: date, region: str | None = None,
               count_rows: bool = False) -> list[RawFile]:
    store.fs.invalidate_cache(store.root)
    listing = store.fs.find(store.root, detail=True) if store.fs.exists(store.root) else {}
    files = select_files(listing, first, last, region)
    if count_rows:
        files = [RawFile(f.path, f.event_date, f.region, f.written,
                         pq.ParquetFile(store.fs.open(f.path, "rb")).metadata.num_rows) for f in files]
    return files


def rows_to_events(table: pa.Table, extra: dict[str, Any] | None = None) -> list[dict]:
    """Stored rows back into the event dicts the flow's later steps take (with extra's keys)."""
    events = table.to_pylist()
    for event in events:
        event["event_time"] = int(event["event_time"].timestamp() * 1000)
        event["pii_entity_counts"] = dict(event["pii_entity_counts"] or [])
        if extra:
            event.update(extra)
    return events


class WindowFloor(Protocol):
    """The earliest window start the replay's windows may count a row of a table in (None: no
    row), the table holding `columns` (those of them a file has) and event_time; `field` is
    the event key that carries a file's horizon to the windows."""

    columns: tuple[str, ...]
    field: str
    no_later_window_ms: int

    def __call__(self, table: pa.Table) -> int | None: ...


def file_floor(store: ParquetStore, path: str, floor: WindowFloor) -> int | None:
    """floor of one file, read from its event_time and decision columns alone."""
    with store.fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = set(parquet.schema_arrow.names)
        return floor(parquet.read(columns=[name for name in ("event_time", *floor.columns) if name in names]))


def file_horizons(floors: list[int | None], nothing_later: int) -> list[int]:
    """Per file in read order, the lowest floor of it and every file after it (nothing_later
    past the last file with one): no row of file i or of a later file is counted in a window
    starting before horizons[i], i.e. (windows being aligned and floors window starts) in one
    ending at or before it. It depends on the files from i on alone, so a resumed source
    computes the same horizons for the files it has still to read."""
    horizons, lowest = [], nothing_later
    for floor in reversed(floors):
        if floor is not None and floor < lowest:
            lowest = floor
        horizons.append(lowest)
    return horizons[::-1]


ALL_REGIONS = "all"
"""The source's one partition (build_part also takes a region's name: that region's files alone)."""


class _FilesPartition(StatefulSourcePartition[dict, tuple[str, int] | None]):
    def __init__(self, files: list[tuple[ParquetStore, RawFile]], batch_size: int, resume: tuple[str, int] | None,
                 floor: WindowFloor | None = None):
        self._stores = [store for store, _f in files]
        self._paths = [f.path for _s, f in files]
        self._batch_size = batch_size
        self._index, self._offset = 0, 0
        if resume is not None:
            path, offset = resume
            # A path no longer listed (FINISHED, or removed by retention since) ends the partition.
            self._index, self._offset = (self._paths.index(path), offset) if path in self._paths else (len(self._paths), 0)
        self._table: pa.Table | None = None
        self._floor = floor
        self.horizons: list[int | None] = [None] * len(self._paths)
        """Per file, the horizon its events carry (floor's field); None before the resumed file."""
        if floor is not None:
            ahead = range(self._index, len(self._paths))
            floors = [file_floor(self._stores[i], self._paths[i], floor) for i in ahead]
            get_metrics().increment("gatewatch_replay_floor_files", len(floors))
            self.horizons[self._index:] = file_horizons(floors, floor.no_later_window_ms)

    def next_batch(self) -> list[dict]:
        while self._index < len(self._paths):
            if self._table is None:
                self._table = self._stores[self._index].read_file(self._paths[self._index])
            if self._offset < self._table.num_rows:
                batch = self._table.slice(self._offset, self._batch_size)
                self._offset += batch.num_rows
                get_metrics().increment("gatewatch_replay_rows", batch.num_rows)
                horizon = self.horizons[self._index]
                return rows_to_events(batch, None if horizon is None else {self._floor.field: horizon})
            get_metrics().increment("gatewatch_replay_files")
            self._index, self._offset, self._table = self._index + 1, 0, None
        raise StopIteration

    def snapshot(self) -> tuple[str, int]:
        if self._index >= len(self._paths):
            return FINISHED
        return self._paths[self._index], self._offset


class ParquetSource(FixedPartitionedSource[dict, tuple[str, int] | None]):
    """Raw events of event dates first..last from one or more stores (one per region
    storage), in one partition (ALL_REGIONS); with a floor, each carrying its file's horizon."""

    def __init__(self, stores: list[ParquetStore], first: date, last: date, region: str | None = None,
                 batch_size: int = 1000, floor: WindowFloor | None = None):
        self._stores, self._first, self._last, self._region = stores, first, last, region
        self._batch_size = batch_size
        self._floor = floor

    def _files(self) -> list[tuple[ParquetStore, RawFile]]:
        return [(store, f) for store in self._stores for f in list_files(store, self._first, self._last, self._region)]

    def list_parts(self) -> list[str]:
        return [ALL_REGIONS] if self._files() else []

    def build_part(self, step_id: str, for_part: str, resume_state: tuple[str, int] | None) -> _FilesPartition:
        if for_part != ALL_REGIONS:  # a part of an older layout (one per region) in a recovery store
            raise ValueError(f"replay reads one source partition, {ALL_REGIONS!r}, not {for_part!r}")
        files = sorted(self._files(), key=lambda pair: read_order(pair[1]))
        return _FilesPartition(files, self._batch_size, resume_state, self._floor)
