"""A replay's windows forget what no file still to read can grow (the source's horizons), so
they hold the overlap of files in time rather than a whole date per user, and its quota
counters stay the live run's to the token."""

from __future__ import annotations

import os
import random
from datetime import date, datetime, timezone

import pyarrow as pa

from connectors.parquet_source import ALL_REGIONS, ParquetSource, file_horizons
from dataflows.state import (ADJUSTED, COUNTED, DEAD_LETTERED, HORIZON_FIELD, NO_LATER_WINDOW_MS, ReplayWindowFloor,
                             UserWindows, WindowLogic, counted_window_floor)
from ops.settings import Settings
from sinks.parquet import ParquetStore
from sinks.quota import QuotaStore
from tests.test_replay import counted_row, gateway_event, replay_windows_into_quota

DAY = date(2031, 3, 8)  # counters' expiry times never fall in the real past
MIDNIGHT_MS = int(datetime(2031, 3, 8, tzinfo=timezone.utc).timestamp() * 1000)
MINUTE = 60_000
WINDOWS = Settings().windows


def quota_db(redis_url: str, db: int) -> QuotaStore:
    quota = QuotaStore(redis_url.rsplit("/", 1)[0] + f"/{db}", month_bases=False,
                       clock=lambda: MIDNIGHT_MS / 1000 + 36 * 3600)
    quota.redis.flushdb()
    return quota


def usage_counters(quota: QuotaStore) -> dict:
    return {key: quota.redis.hgetall(key) for key in quota.redis.scan_iter(match="gw:usage:*", count=1000)}


def raw_event(user: str, at_ms: int, input_tokens: int, offset: int) -> dict:
    return {**gateway_event(user, at_ms, input_tokens, input_tokens // 10), "classification": "internal",
            "pii_entity_counts": {}, "source_partition": 0, "source_offset": offset}


def live_windows(events: list[dict], quota: QuotaStore) -> list[dict]:
    """The live flow's windows over events in arrival order, a flush every 50 events and a
    second of wall clock apart: their totals into quota; the events with their decisions, as
    the raw Parquet sink stores them."""
    now = [0.0]
    logic = WindowLogic(UserWindows(int(WINDOWS.length_s * 1000), int(WINDOWS.allowed_lateness_s * 1000),
                                    WINDOWS.late_policy), WINDOWS.flush_interval_s,
                        WINDOWS.allowed_lateness_s + WINDOWS.length_s + WINDOWS.flush_interval_s,
                        clock=lambda: now[0], record_decisions=True)
    stored = []
    for start in range(0, len(events), 50):
        outputs = logic.on_batch(events[start:start + 50])[0]
        now[0] += 1
        outputs += logic.on_notify()[0]
        stored += [event for kind, decided in outputs if kind == "decided" for event in decided]
        quota.apply([total for kind, totals in outputs if kind == "totals" for total in totals])
    quota.apply([total for _kind, totals in logic.on_eof()[0] for total in totals])
    return stored


def write_files(raw: ParquetStore, files: list[list[dict]], written: list[int]) -> list[str]:
    """Each file's rows in the date's partition with its modification time; their paths."""
    paths = []
    for rows, stamp in zip(files, written):
        path = raw.write(f"event_date={DAY}/region=us", rows)
        os.utime(path, (stamp, stamp))
        paths.append(path)
    return paths


def windows_held(logic: WindowLogic) -> dict[str, list[int]]:
    return {user: sorted(start for start, _model in totals.windows) for user, totals in logic.state.users.items()
            if totals.windows}


def test_windows_split_over_overlapping_files_are_forgotten_by_the_horizon_and_count_as_live(redis_url, tmp_path):
    rng = random.Random(7)
    start_ms = MIDNIGHT_MS + 8 * 3600 * 1000
    events = []
    for i in range(1500):
        at = start_ms + i * 7_000 + rng.randrange(30_000)
        if rng.random() < 0.04:
            at -= 20 * MINUTE  # past the 600 s lateness: a late adjustment
        events.append(raw_event(f"u{rng.randrange(30)}", at, rng.randrange(1, 500), i))
    live = quota_db(redis_url, 5)
    stored = live_windows(events, live)
    assert {event["window_outcome"] for event in stored} == {COUNTED, ADJUSTED}

    # Files of 100 arrivals each; two pairs written in the other order (a newer file listed first).
    files = [stored[i:i + 100] for i in range(0, len(stored), 100)]
    written = list(range(1000, 1000 + len(files)))
    for k in (3, 8):
        written[k], written[k + 1] = written[k + 1], written[k]
    write_files(ParquetStore(str(tmp_path / "raw")), files, written)
    read_order = [rows for _stamp, rows in sorted(zip(written, files), key=lambda pair: pair[0])]
    # Brute force: the lowest counted window of each file and every later one.
    expected_horizons = [min(row["window_start_ms"] for rows in read_order[i:] for row in rows
                             if row["window_outcome"] == COUNTED) for i in range(len(read_order))]

    horizons_seen, peak = [], 0
    length_ms = int(WINDOWS.length_s * 1000)

    def after_flush(logic: WindowLogic) -> None:
        nonlocal peak
        horizon = logic.state.horizon_ms
        horizons_seen.append(horizon)
        held = windows_held(logic)
        assert all(start + length_ms > horizon for starts in held.values() for start in starts)
        peak = max(peak, sum(map(len, held.values())))

    replayed = quota_db(redis_url, 6)
    replay_windows_into_quota(ParquetStore(str(tmp_path / "raw")), DAY, DAY, replayed, 0, after_flush)

    assert horizons_seen == expected_horizons
    day_windows = {(row["user_id"], row["window_start_ms"]) for row in stored if row["window_outcome"] == COUNTED}
    # The midnight rule alone would hold every window of the day by the last file.
    assert len(day_windows) > 500 and peak < len(day_windows) / 4, (peak, len(day_windows))
    live_counters = usage_counters(live)
    assert len(live_counters) > 30 and usage_counters(replayed) == live_counters


def boundary_files(tmp_path) -> tuple[ParquetStore, list[str], int, list[dict]]:
    """(store, paths in read order, T, rows) of four files of one date: u1's window T+1m split
    over files 1, 2 and 4, file 3 holding only an adjustment and a dead-lettered row dated
    before every window, u2 seen in file 1 alone."""
    t = MIDNIGHT_MS + 10 * 3600 * 1000
    adjusted = {**raw_event("u1", t - 30 * MINUTE, 70, 6), "window_outcome": ADJUSTED, "window_start_ms": None}
    dead = {**raw_event("u1", t - 40 * MINUTE, 80, 7), "window_outcome": DEAD_LETTERED, "window_start_ms": None}
    files = [[counted_row("u1", t + 10_000, 100, 1), counted_row("u1", t + MINUTE + 10_000, 200, 2),
              counted_row("u2", t + 20_000, 300, 3)],
             [counted_row("u1", t + MINUTE + 20_000, 400, 4), counted_row("u1", t + 2 * MINUTE + 5_000, 500, 5)],
             [adjusted, dead],
             [counted_row("u1", t + MINUTE + 30_000, 600, 8)]]
    raw = ParquetStore(str(tmp_path / "raw"))
    return raw, write_files(raw, files, [1000, 1001, 1002, 1003]), t, [row for rows in files for row in rows]


def test_a_window_ending_at_the_horizon_is_forgotten_and_a_file_without_counted_rows_lowers_no_horizon(
        redis_url, tmp_path):
    raw, _paths, t, rows = boundary_files(tmp_path)
    source = ParquetSource([raw], DAY, DAY, floor=ReplayWindowFloor(MINUTE))
    # File 3's rows are dated before every window, yet none of them is counted.
    assert source.build_part("in", ALL_REGIONS, None).horizons == [t, t + MINUTE, t + MINUTE, t + MINUTE]

    held_after_file = []
    quota = quota_db(redis_url, 7)
    replay_windows_into_quota(raw, DAY, DAY, quota, 0, lambda logic: held_after_file.append(windows_held(logic)))

    assert held_after_file[0] == {"org-midnight/u1": [t, t + MINUTE], "org-midnight/u2": [t]}
    # Horizon t+1m: the windows ending exactly at it go, u2's too though it was not seen again;
    # the window starting at it stays open for file 4.
    assert held_after_file[1] == held_after_file[2] == {"org-midnight/u1": [t + MINUTE, t + 2 * MINUTE]}
    for user in ("u1", "u2"):
        counted = quota.usage("user", f"org-midnight/{user}", t)["day"]
        mine = [row for row in rows if row["user_id"] == user and row["window_outcome"] != DEAD_LETTERED]
        assert (counted["requests"], counted["input"], counted["output"]) == (
            len(mine), sum(r["input_tokens"] for r in mine), sum(r["output_tokens"] for r in mine))


def test_a_resumed_source_computes_the_same_horizons_for_the_files_still_to_read(tmp_path):
    raw, paths, t, _rows = boundary_files(tmp_path)
    source = ParquetSource([raw], DAY, DAY, batch_size=1, floor=ReplayWindowFloor(MINUTE))
    fresh = source.build_part("in", ALL_REGIONS, None).horizons
    resumed = source.build_part("in", ALL_REGIONS, (paths[2], 1))
    assert resumed.horizons == [None, None, *fresh[2:]]
    assert [event[HORIZON_FIELD] for event in resumed.next_batch()] == [t + MINUTE]
    # Retention may delete files already read: the horizons of the rest depend on them not.
    raw.fs.rm(paths[0])
    assert source.build_part("in", ALL_REGIONS, (paths[2], 1)).horizons == [None, *fresh[2:]]
    # A source without a floor leaves the events as they were stored.
    plain = ParquetSource([raw], DAY, DAY).build_part("in", ALL_REGIONS, None)
    assert all(HORIZON_FIELD not in event for event in plain.next_batch())


def test_the_floor_of_rows_decided_again_is_their_own_window():
    at = pa.array([MIDNIGHT_MS + 125_000, MIDNIGHT_MS + 61_000, MIDNIGHT_MS + 190_000, MIDNIGHT_MS + 5_000],
                  pa.timestamp("ms", tz="UTC"))
    table = pa.table({"event_time": at, "window_outcome": [COUNTED, ADJUSTED, COUNTED, "unknown"],
                      "window_start_ms": pa.array([MIDNIGHT_MS + 180_000, None, None, None], pa.int64())})
    # A count without its window and an unknown outcome are decided again, at the earliest in their own window.
    assert counted_window_floor(table, MINUTE) == MIDNIGHT_MS
    assert counted_window_floor(table.slice(0, 3), MINUTE) == MIDNIGHT_MS + 180_000
    assert counted_window_floor(table.slice(1, 1), MINUTE) is None
    # A file written before decisions were stored: every row decided again.
    assert counted_window_floor(table.select(["event_time"]).slice(0, 3), MINUTE) == MIDNIGHT_MS + MINUTE
    assert file_horizons([None, 5, None, 3, None], NO_LATER_WINDOW_MS) == [3, 3, 3, 3, NO_LATER_WINDOW_MS]


def test_the_replay_window_bench_holds_fewer_windows_with_the_horizon_than_by_date_alone():
    from ops.bench.state import replay_window_state

    steps = []
    measured = replay_window_state(users=300, rows=6000, days=1, progress=steps.append, floor_sample=20)
    peaks = {rule: peak for rule, (peak, _cpu) in measured["rules"].items()}
    assert steps == ["live rule", "midnight rule", "midnight + horizon", "window floor per file"]
    # By date alone the replay holds the day's windows; the horizon keeps it near the live flow's.
    assert peaks["midnight"] > 3 * peaks["midnight+horizon"] and peaks["midnight+horizon"] < 2 * peaks["live"]
    assert measured["floor_s_per_file"] > 0 and measured["bytes_per_window"] > 0
