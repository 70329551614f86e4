"""`gatewatch compact` on local disk and on an S3 server: after a crash rewrote events under
other file names, one copy of every event per partition, small files merged, text still
sealed, and a compaction that itself crashes is finished by the next one."""

from __future__ import annotations

import base64
import json
import os
import uuid

import pytest
import s3fs
from click.testing import CliRunner

from ops.cli.compact import compact as compact_command
from sinks.parquet import ParquetStore
from sinks.parquet_compaction import compact, partitions, plan_partition
from tests.test_parquet_text import event

KEY = os.urandom(32)
DAY_EU = "event_date=2026-01-01/region=eu"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_endpoint):
    if request.param == "local":
        return ParquetStore(str(tmp_path / "raw"), text_keys={"k1": KEY}, text_key_id="k1")
    bucket = f"compact-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir(bucket)
    return ParquetStore(f"s3://{bucket}/raw", s3_endpoint, text_keys={"k1": KEY}, text_key_id="k1")


def crashed_writes(store: ParquetStore) -> list[dict]:
    """Batches as a flow writes them around a crash: events 40-79 written again in other
    batches after the resume, plus a second partition untouched by the crash."""
    events = [event(n) for n in range(120)]
    for batch in (events[:80], events[40:100], events[100:120], events[60:70]):
        store.write(DAY_EU, batch)
    store.write("event_date=2026-01-01/region=us", [event(n, region="us") for n in range(500, 510)])
    return events


def rows_by_id(store: ParquetStore) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event_id in store.read().column("event_id").to_pylist():
        counts[event_id] = counts.get(event_id, 0) + 1
    return counts


def test_plan_keeps_the_first_copy_and_merges_what_is_small():
    keys = {"a": [("o", "1"), ("o", "2")], "b": [("o", "2"), ("o", "3")], "c": [("o", "1")], "d": [("o", "9")] * 1}
    keep, merge = plan_partition(keys, small_rows=2)
    assert keep == {"b": [1], "c": []}
    assert merge == ["b", "d"]  # a has 2 rows (not small), c is left empty (deleted)
    assert plan_partition({"a": [("o", "1")]}, small_rows=5) == ({}, [])  # one small file stays as it is


def test_a_crash_leaves_copies_that_compaction_removes_once_and_for_all(store):
    events = crashed_writes(store)
    assert sum(rows_by_id(store).values()) == 80 + 60 + 20 + 10 + 10
    done = {c.partition: c for c in compact(store)}
    assert (done[DAY_EU].rows_before, done[DAY_EU].rows_after, done[DAY_EU].files_after) == (170, 120, 1)
    assert done["event_date=2026-01-01/region=us"].deleted == []  # one file, no copy: left alone
    counts = rows_by_id(store)
    assert set(counts.values()) == {1} and len(counts) == 130
    # Text is sealed in the new file and opens to what was written.
    (path,) = partitions(store)[DAY_EU]
    assert b"answer number 7" not in store.fs.cat_file(path)
    table = store.read_file(path)
    responses = dict(zip(table.column("event_id").to_pylist(), table.column("response").to_pylist()))
    assert responses == {e["event_id"]: e["response"] for e in events}
    # Again: nothing to do.
    assert all(not c.written and not c.deleted for c in compact(store))


def test_a_compaction_that_crashes_before_deleting_is_finished_by_the_next(store, monkeypatch):
    crashed_writes(store)

    def crash(path, *a, **k):
        raise OSError("killed before the sources were deleted")
    monkeypatch.setattr(store.fs, "rm", crash)
    with pytest.raises(OSError):
        compact(store, only="event_date=2026-01-01/region=eu")
    monkeypatch.undo()
    assert max(rows_by_id(store).values()) > 1  # the merged file and its sources side by side
    compact(store)
    counts = rows_by_id(store)
    assert set(counts.values()) == {1} and len(counts) == 130
    assert len(partitions(store)[DAY_EU]) == 1


def test_the_cli_compacts_the_configured_root_and_prints_a_summary(tmp_path, monkeypatch):
    store = ParquetStore(str(tmp_path / "raw"), text_keys={"k1": KEY}, text_key_id="k1")
    crashed_writes(store)
    monkeypatch.setenv("GATEWATCH_PARQUET__TEXT_KEYS", json.dumps({"k1": base64.b64encode(KEY).decode()}))
    monkeypatch.setenv("GATEWATCH_PARQUET__TEXT_KEY_ID", "k1")
    result = CliRunner().invoke(compact_command, ["--root", str(tmp_path / "raw")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["partitions"], summary["rows_before"], summary["rows_after"]) == (2, 180, 130)
    assert "compact 1/2 event_date=2026-01-01/region=eu: files 4 -> 1, rows 170 -> 120" in result.stderr
