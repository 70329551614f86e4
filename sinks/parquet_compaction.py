"""Compaction of raw Parquet partitions: one copy of every event, fewer small files.

A crash between a file's upload and the flow's next recovery snapshot makes the resumed
flow write the same events again, batched differently, so under another file name: a
plain `SELECT count()` over raw storage then counts them twice. Compaction reads only the
(org_id, event_id) columns of a partition's files to find the copies, rewrites the files
that hold a copy already kept by an earlier file (in name order), and merges files smaller
than small_rows into one.

Crash-safe and idempotent: every new file is complete (ParquetStore.put) and named from
the events it holds (sinks.parquet.file_name) before any source is deleted, and a source
is never deleted when it is also a target of the same pass. A crash in between leaves
copies that the next pass removes the same way, and a pass over a compact partition
changes nothing. Text stays sealed: files are opened with the store's keys and written
with its current key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from sinks.parquet import ParquetStore, file_name

SMALL_ROWS = 10_000
"""Files with fewer rows than this are merged (the flow rolls files by rows or seconds, so a
quiet partition collects many small ones)."""


@dataclass
class Compaction:
    partition: str
    files_before: int = 0
    files_after: int = 0
    rows_before: int = 0
    rows_after: int = 0
    written: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def partitions(store: ParquetStore) -> dict[str, list[str]]:
    """Files by partition directory (relative to the store's root), in name order."""
    grouped: dict[str, list[str]] = {}
    for path in store.files():
        grouped.setdefault(path[len(store.root) + 1:].rpartition("/")[0], []).append(path)
    return grouped


def plan_partition(keys_by_file: dict[str, list[tuple[str, str]]], small_rows: int = SMALL_ROWS
                   ) -> tuple[dict[str, list[int]], list[str]]:
    """(rows to keep by file for the files that change, files to merge): a pure function of
    each file's (org_id, event_id) keys. The first file in name order keeps an event; a file
    that loses rows is rewritten; files left with fewer than small_rows rows are merged."""
    seen: set[tuple[str, str]] = set()
    keep: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    for path in sorted(keys_by_file):
        rows = []
        for index, key in enumerate(keys_by_file[path]):
            if key not in seen:
                seen.add(key)
                rows.append(index)
        if len(rows) < len(keys_by_file[path]):
            keep[path] = rows
        sizes[path] = len(rows)
    small = [path for path in sorted(keys_by_file) if 0 < sizes[path] < small_rows]
    return keep, small if len(small) > 1 else []


def compact_partition(store: ParquetStore, partition: str, files: list[str], small_rows: int = SMALL_ROWS
                      ) -> Compaction:
    result = Compaction(partition, files_before=len(files))
    keys_by_file = {path: _keys(store, path) for path in files}
    result.rows_before = sum(len(keys) for keys in keys_by_file.values())
    keep, merge = plan_partition(keys_by_file, small_rows)
    tables: dict[str, pa.Table] = {}
    for path in sorted(set(keep) | set(merge)):
        table = store.read_file(path)
        tables[path] = table.take(pa.array(keep[path], pa.int64())) if path in keep else table
    outputs = [tables[path] for path in tables if path not in merge and tables[path].num_rows]
    if merge:
        outputs.append(pa.concat_tables(tables[path] for path in merge))
    targets = set()
    for table in outputs:
        target = f"{store.root}/{partition}/{file_name(_events(table))}"
        store.put(target, table)
        targets.add(target)
        result.written.append(target)
    # Only now that every output is whole: the sources (never one that is also a target).
    for path in sorted(set(tables) - targets):
        store.fs.rm(path)
        result.deleted.append(path)
    result.files_after = len(files) - len(result.deleted) + len(targets - set(files))
    result.rows_after = result.rows_before - sum(len(keys_by_file[p]) - len(rows) for p, rows in keep.items())
    return result


def compact(store: ParquetStore, only: str | None = None, small_rows: int = SMALL_ROWS) -> list[Compaction]:
    """Compact every partition (or those whose path starts with only); return what changed."""
    done = []
    for partition, files in sorted(partitions(store).items()):
        if only is None or partition.startswith(only):
            done.append(compact_partition(store, partition, files, small_rows))
    return done


def _keys(store: ParquetStore, path: str) -> list[tuple[str, str]]:
    table = pq.read_table(pa.BufferReader(store.fs.cat_file(path)), columns=["org_id", "event_id"])
    return list(zip(table.column("org_id").to_pylist(), table.column("event_id").to_pylist()))


def _events(table: pa.Table) -> list[dict]:
    return table.select(["org_id", "event_id"]).to_pylist()
