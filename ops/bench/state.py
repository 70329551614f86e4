"""`gatewatch bench state`: memory of the dedupe state per remembered event id, and
throughput of the dedupe + window operators in a real Bytewax flow for many active users;
with --replay-windows, the windows a replay holds under each forgetting rule instead."""

from __future__ import annotations

import json
import pickle
import random
import tempfile
import time
import tracemalloc
import uuid
from functools import partial

import bytewax.operators as op
import click
import pyarrow as pa
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from connectors.parquet_source import file_floor, file_horizons
from dataflows.state import (HORIZON_FIELD, MS_PER_DAY, NO_LATER_WINDOW_MS, DedupeLogic, ReplayWindowFloor, SeenIds,
                             UserWindows, WindowLogic, WindowTotals, bucket_of, counted_window_floor)
from sinks.parquet import ParquetStore

BUCKETS = 256


def dedupe_bytes_per_key(keys: int) -> tuple[float, float]:
    """(resident bytes, snapshot bytes) per remembered org/event_id, the key string included
    (the flow builds it per event, so the state is what keeps it alive)."""
    ids = [str(uuid.uuid4()) for _ in range(keys)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    seen = SeenIds(horizon_s=7200)
    now = time.time()
    for i, event_id in enumerate(ids):
        seen.first(f"org-{i % 7:02d}/{event_id}", now)
    resident = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return resident / keys, len(pickle.dumps(seen.frozen())) / keys


def events_for(users: int, count: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    return [{"event_id": str(uuid.UUID(int=rng.getrandbits(128))), "org_id": f"org-{u % 7}", "user_id": f"user-{u}",
             "model": "gpt-4o", "event_time": now_ms + i, "input_tokens": 10, "output_tokens": 5,
             "cache_read_tokens": 0, "cache_write_tokens": 0}
            for i, u in enumerate(rng.randrange(users) for _ in range(count))]


def flow_events_per_s(events: list[dict]) -> tuple[float, int]:
    """Events/s through key -> dedupe -> windows (flushed at EOF) in Bytewax; windows emitted."""
    flow = Dataflow("bench_state")
    stream = op.input("in", flow, TestingSource(events, batch_size=1000))
    keyed = op.key_on("by_user", stream, lambda e: bucket_of(f"{e['org_id']}/{e['user_id']}", BUCKETS))
    seen = op.stateful_batch("dedupe", keyed, partial(DedupeLogic.build, 7200))
    unique = op.filter_map("first", seen, lambda item: item[1][1] if item[1][0] else None)
    rekeyed = op.key_on("by_user_again", unique, lambda e: bucket_of(f"{e['org_id']}/{e['user_id']}", BUCKETS))
    windows = op.stateful_batch("windows", rekeyed, partial(WindowLogic.build,
                                                            lambda: UserWindows(60_000, 3_600_000, "dlq"), 2, 3600))
    out: list = []
    op.output("out", op.key_rm("unkey", windows), TestingSink(out))
    started = time.perf_counter()
    run_main(flow)
    seconds = time.perf_counter() - started
    return len(events) / seconds, sum(len(totals) for kind, totals in out if kind == "totals")


# -- the windows a replay holds --------------------------------------------------------

WINDOW_MS, LATENESS_MS, FILE_SPAN_MS, BATCH = 60_000, 600_000, 30_000, 1000
"""The default windows; a raw file per date and 30 s of arrivals (parquet max_age_s: at the
measured rates max_rows never closes one first); a flush per 1,000 rows."""


def arrivals(users: int, rows: int, days: int, late_share: float = 0.02, seed: int = 3) -> list[dict]:
    """Events uniform over `days` UTC days in arrival order: most arrive as they happen, a
    late_share up to 15 minutes late (past the 10-minute lateness for a third of those)."""
    rng = random.Random(seed)
    start = 1_900_000_000_000 - 1_900_000_000_000 % MS_PER_DAY
    events = []
    for i in range(rows):
        at = start + rng.randrange(days * MS_PER_DAY)
        late = rng.randrange(900_000) if rng.random() < late_share else 0
        events.append({"event_id": f"e{i}", "org_id": "org-1", "user_id": f"user-{rng.randrange(users)}",
                       "model": "gpt-4o", "event_time": at, "arrival": at + late, "input_tokens": 10,
                       "output_tokens": 5, "cache_read_tokens": 0, "cache_write_tokens": 0})
    return sorted(events, key=lambda e: e["arrival"])


def window_logic(clock) -> WindowLogic:
    return WindowLogic(UserWindows(WINDOW_MS, LATENESS_MS, "adjust"), 2, LATENESS_MS / 1000 + 62, clock=clock,
                       record_decisions=True)


def run_windows(batches: list[list[dict]], clocks: list[float]) -> tuple[int, float]:
    """(peak windows held, CPU seconds of on_batch + on_notify) of one WindowLogic (every user
    in one key) over the batches, flushed after each at the batch's clock."""
    now = [0.0]
    logic = window_logic(lambda: now[0])
    peak, cpu = 0, 0.0
    for batch, clock in zip(batches, clocks):
        now[0] = clock
        started = time.process_time()
        logic.on_batch(batch)
        cpu += time.process_time() - started
        peak = max(peak, sum(len(user.windows) for user in logic.state.users.values()))
        started = time.process_time()
        logic.on_notify()
        cpu += time.process_time() - started
    return peak, cpu


def raw_files(decided: list[dict]) -> list[list[dict]]:
    """The decided events as the raw sink writes them: a file per event date and 30 s of
    arrivals, in the replay's read order (date, then write time)."""
    files: dict[tuple[int, int], list[dict]] = {}
    for event in decided:
        files.setdefault((event["event_time"] // MS_PER_DAY, event["arrival"] // FILE_SPAN_MS), []).append(event)
    return [files[key] for key in sorted(files)]


def decision_table(rows: list[dict]) -> pa.Table:
    return pa.table({"event_time": pa.array([r["event_time"] for r in rows], pa.timestamp("ms", tz="UTC")),
                     "window_outcome": [r["window_outcome"] for r in rows],
                     "window_start_ms": pa.array([r["window_start_ms"] for r in rows], pa.int64())})


def in_batches(rows: list[dict]) -> list[list[dict]]:
    return [rows[i:i + BATCH] for i in range(0, len(rows), BATCH)]


def floor_seconds_per_file(files: list[list[dict]], sample: int) -> tuple[float, float]:
    """(wall seconds to read one file's floor from local Parquet: a file of the run's size, a
    10,000-row file) averaged over `sample` files (file_floor, as the replay's source does)."""
    floor = ReplayWindowFloor(WINDOW_MS)
    with tempfile.TemporaryDirectory() as root:
        store = ParquetStore(root)
        out = []
        for rows in (files[:sample], [[row for rows in files for row in rows][:10_000]] * max(1, sample // 20)):
            # Every column of the raw schema (the texts empty): the floor reads three of them.
            paths = [store.write(f"event_date=2030-03-17/region=us/n{i}", r) for i, r in enumerate(rows)]
            started = time.perf_counter()
            for path in paths:
                file_floor(store, path, floor)
            out.append((time.perf_counter() - started) / len(paths))
    return out[0], out[1]


def bytes_per_window(count: int = 100_000) -> float:
    """Resident bytes of one (start, model) -> totals entry of a user's windows."""
    totals = WindowTotals(WINDOW_MS, LATENESS_MS)
    event = {"model": "gpt-4o", "event_time": 0, "input_tokens": 10, "output_tokens": 5, "cache_read_tokens": 0,
             "cache_write_tokens": 0}
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(count):
        totals._count(i * WINDOW_MS, event)
    totals.dirty.clear()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held / count


def replay_window_state(users: int, rows: int, days: int, progress=lambda step: None, floor_sample: int = 200) -> dict:
    """Peak windows held and CPU per row of the windows under the live rule (as the live flow
    decides, clock = arrival), the replay's midnight rule alone (rows with the live decisions,
    read by date and write order, no horizon) and midnight + the source's horizons; progress
    is told each step as it starts; the floor's cost is averaged over floor_sample files."""
    events = arrivals(users, rows, days)
    live_batches = in_batches(events)
    progress("live rule")
    live_peak, live_cpu = run_windows(live_batches, [batch[-1]["arrival"] / 1000 for batch in live_batches])
    files = raw_files(events)  # the live run wrote its decisions into these dicts
    floors = [counted_window_floor(decision_table(rows_of), WINDOW_MS) for rows_of in files]
    horizons = file_horizons(floors, NO_LATER_WINDOW_MS)
    replay_rows = [{k: v for k, v in row.items() if k != "arrival"} for rows_of in files for row in rows_of]
    bounded_rows = [{**row, HORIZON_FIELD: horizon} for rows_of, horizon in zip(files, horizons)
                    for row in rows_of]
    fast_clock = [i * 0.1 for i in range(len(replay_rows) // BATCH + 1)]  # a replay's pace: 10,000 rows/s
    progress("midnight rule")
    midnight_peak, midnight_cpu = run_windows(in_batches(replay_rows), fast_clock)
    progress("midnight + horizon")
    horizon_peak, horizon_cpu = run_windows(in_batches(bounded_rows), fast_clock)
    progress("window floor per file")
    small_file_s, big_file_s = floor_seconds_per_file(files, floor_sample)
    return {"rules": {"live": (live_peak, live_cpu), "midnight": (midnight_peak, midnight_cpu),
                      "midnight+horizon": (horizon_peak, horizon_cpu)},
            "files": len(files), "rows_per_file": rows / len(files), "floor_s_per_file": small_file_s,
            "floor_s_per_10k_row_file": big_file_s, "bytes_per_window": bytes_per_window()}


def report_replay_window_state(users: int, rows: int, days: int) -> None:
    measured = replay_window_state(users, rows, days, lambda step: click.echo(f"measuring: {step}", err=True))
    click.echo(f"{users:,} users, {rows:,} rows over {days} days, {measured['files']:,} raw files "
               f"({measured['rows_per_file']:.0f} rows each), 1-minute windows, a flush per {BATCH:,} rows")
    click.echo(f"{'rule':>18}{'peak windows':>14}{'CPU µs/row':>12}")
    result = {}
    for rule, (peak, cpu) in measured["rules"].items():
        click.echo(f"{rule:>18}{peak:>14,}{cpu / rows * 1e6:>12.1f}")
        result[rule] = {"peak_windows": peak, "cpu_us_per_row": round(cpu / rows * 1e6, 2)}
    click.echo(f"window floor per file (local Parquet): {measured['floor_s_per_file'] * 1e3:.2f} ms at "
               f"{measured['rows_per_file']:.0f} rows, {measured['floor_s_per_10k_row_file'] * 1e3:.2f} ms at "
               f"10,000 rows; {measured['bytes_per_window']:.0f} bytes per window held")
    click.echo(json.dumps({**result, **{k: measured[k] for k in ("files", "floor_s_per_file",
                                                                  "floor_s_per_10k_row_file", "bytes_per_window")}}))


@click.command("state")
@click.option("--events", default=200_000, show_default=True, type=click.IntRange(1000))
@click.option("--keys", default=200_000, show_default=True, type=click.IntRange(1000),
              help="Event ids remembered when measuring dedupe memory.")
@click.option("--replay-windows", is_flag=True,
              help="Measure instead the windows a replay holds (live rule, midnight rule, midnight + horizon).")
@click.option("--users", default=10_000, show_default=True, type=click.IntRange(1), help="With --replay-windows.")
@click.option("--rows", default=300_000, show_default=True, type=click.IntRange(BATCH), help="With --replay-windows.")
@click.option("--days", default=2, show_default=True, type=click.IntRange(1), help="With --replay-windows.")
def state(events: int, keys: int, replay_windows: bool, users: int, rows: int, days: int) -> None:
    """Dedupe bytes per key, and dedupe + window throughput for 10k and 100k active users."""
    if replay_windows:
        report_replay_window_state(users, rows, days)
        return
    resident, snapshot = dedupe_bytes_per_key(keys)
    click.echo(f"dedupe state: {resident:.0f} bytes/key resident, {snapshot:.0f} bytes/key in a snapshot "
               f"({keys:,} keys)")
    result = {"dedupe_bytes_per_key": round(resident, 1), "dedupe_snapshot_bytes_per_key": round(snapshot, 1)}
    click.echo(f"{'active users':>14}{'events':>10}{'events/s':>12}{'window totals':>15}")
    for users in (10_000, 100_000):
        rate, totals = flow_events_per_s(events_for(users, events))
        click.echo(f"{users:>14,}{events:>10,}{rate:>12,.0f}{totals:>15,}")
        result[f"window_events_per_s_{users}_users"] = round(rate)
    click.echo(json.dumps(result))
