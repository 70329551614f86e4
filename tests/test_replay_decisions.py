"""A replay repeats the live windows' decisions stored with the raw rows: events of windows
retired while their user was idle, and late events dated before a midnight, bill as they did
live, whatever order the replay reads the files in. Rows of files written before the
decisions were stored are decided again, as they always were.

The live flow here is the windows' logic on a clock the test moves (idleness is wall-clock
time); the raw rows go through real Parquet files and the replay's source."""

from __future__ import annotations

import os
from datetime import date, datetime, timezone
from decimal import Decimal

import pyarrow.parquet as pq

from connectors.parquet_source import ALL_REGIONS, ParquetSource
from dataflows.state import ADJUSTED, COUNTED, DEAD_LETTERED, UserWindows, WindowLogic, WindowTotals
from ops.settings import Settings
from sinks.billing import billing_event, latest_versions
from sinks.parquet import ARROW_SCHEMA, DECISION_COLUMNS, EventBlock, ParquetStore, blocks_and_events, to_table

DAY = date(2026, 3, 1)
MIDNIGHT_MS = int(datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp() * 1000)
MINUTE = 60_000
LATENESS_MS = 10 * MINUTE
IDLE_S = 30


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def event(event_id: str, user: str, at_ms: int, input_tokens: int) -> dict:
    return {"event_id": event_id, "org_id": "o1", "user_id": user, "region": "us", "model": "gpt-4o",
            "event_time": at_ms, "input_tokens": input_tokens, "output_tokens": 7, "cache_read_tokens": 0,
            "cache_write_tokens": 0, "safety_decisions": [], "policy_flags": [], "pii_entity_counts": {}}


def windows(clock: Clock, record_decisions: bool) -> WindowLogic:
    return WindowLogic(UserWindows(MINUTE, LATENESS_MS, "adjust"), flush_interval_s=2, idle_s=IDLE_S, clock=clock,
                       record_decisions=record_decisions)


def live_run() -> tuple[list[dict], list[dict]]:
    """(billing events, events with their decisions) of a live run: u1's and u2's windows are
    retired while they are idle, then an event of u1's retired window arrives; u3's late
    event dated before midnight arrives after its event of the next day."""
    clock = Clock()
    logic = windows(clock, record_decisions=True)
    noon = MIDNIGHT_MS - 12 * 60 * MINUTE
    outputs = []

    def arrive(events: list[dict]) -> None:
        outputs.extend(logic.on_batch(events)[0])
        clock.now += 2
        outputs.extend(logic.on_notify()[0])

    arrive([event("a", "u1", noon + 10_000, 100), event("b", "u1", noon + 20_000, 200),
            event("x", "u2", noon + 30_000, 300), event("p", "u3", MIDNIGHT_MS - 30 * MINUTE, 400)])
    clock.now += IDLE_S + 1
    outputs.extend(logic.on_notify()[0])  # u1's and u2's windows retired, u3's too
    arrive([event("c", "u1", noon + 40_000, 500), event("y", "u2", noon + 5 * MINUTE, 600),
            event("q", "u3", MIDNIGHT_MS + 15 * MINUTE, 700)])
    arrive([event("r", "u3", MIDNIGHT_MS - 5 * MINUTE, 800)])
    decided = [e for kind, events in outputs if kind == "decided" for e in events]
    return bills(outputs), decided


def bills(outputs: list[tuple[str, object]]) -> list[dict]:
    pricing = Settings().pricing
    return [billing_event(total, pricing) for kind, totals in outputs if kind == "totals" for total in totals]


def replayed_bills(store: ParquetStore) -> list[dict]:
    """The billing events of the replay's windows over everything the source reads."""
    source = ParquetSource([store], DAY, date(2026, 3, 2), batch_size=2)
    part = source.build_part("in", ALL_REGIONS, None)
    logic = windows(Clock(), record_decisions=False)
    outputs = []
    while True:
        try:
            outputs.extend(logic.on_batch(part.next_batch())[0])
        except StopIteration:
            break
    return bills(outputs + logic.on_eof()[0])


def write_day_before_first(store_root, decided: list[dict], drop_decisions: bool = False) -> ParquetStore:
    """The raw rows in one file per event date, the day before midnight's written first: a
    replay reads u3's late event before its event of the next day."""
    store = ParquetStore(str(store_root))
    for written, day in enumerate(("2026-03-01", "2026-03-02")):
        rows = [e for e in decided if datetime.fromtimestamp(e["event_time"] / 1000, timezone.utc).date().isoformat()
                == day]
        path = store.write(f"event_date={day}/region=us", rows)
        if drop_decisions:
            pq.write_table(to_table(rows).drop_columns(list(DECISION_COLUMNS)), path)
        os.utime(path, (100 + written, 100 + written))
    return store


def billed(events: list[dict]) -> Decimal:
    return sum((Decimal(e["cost_usd"]) for e in latest_versions(events).values()), Decimal(0))


def test_the_live_windows_decisions_travel_with_the_events():
    _bills, decided = live_run()
    outcomes = {e["event_id"]: (e["window_outcome"], e["window_start_ms"]) for e in decided}
    noon = MIDNIGHT_MS - 12 * 60 * MINUTE
    assert outcomes == {
        "a": (COUNTED, noon), "b": (COUNTED, noon), "x": (COUNTED, noon),
        "p": (COUNTED, MIDNIGHT_MS - 30 * MINUTE),
        "c": (ADJUSTED, None),  # its window was retired while u1 was idle
        "y": (COUNTED, noon + 5 * MINUTE), "q": (COUNTED, MIDNIGHT_MS + 15 * MINUTE),
        "r": (ADJUSTED, None),  # 20 minutes before u3's newest: late
    }


def test_a_replay_of_retired_windows_and_a_late_event_before_midnight_bills_as_live(tmp_path):
    live_bills, decided = live_run()
    replayed = replayed_bills(write_day_before_first(tmp_path / "raw", decided))
    assert {(b["billing_id"], b["version"]) for b in latest_versions(replayed).values()} == {
        (b["billing_id"], b["version"]) for b in latest_versions(live_bills).values()}
    # A billing consumer that holds the live bills gains nothing from the replay's.
    assert billed(live_bills + replayed) == billed(live_bills)
    tokens = sum(100 * n for n in range(1, 9))
    assert sum(b["input_tokens"] for b in latest_versions(live_bills).values()) == tokens


def test_rows_written_before_the_decisions_were_stored_are_decided_again(tmp_path):
    """An older file's rows carry no decision: the replay decides from the order it reads and
    no idleness, as it always did, so it counts c and r in their windows (where the live run
    sent adjustments) and a consumer holding the live bills bills them twice."""
    live_bills, decided = live_run()
    store = write_day_before_first(tmp_path / "raw", decided, drop_decisions=True)
    assert set(store.read().column("window_outcome").to_pylist()) == {None}
    replayed = replayed_bills(store)
    assert not any("/late/" in b["billing_id"] for b in replayed)
    adjustments = [b for b in live_bills if "/late/" in b["billing_id"]]
    assert sorted(b["input_tokens"] for b in adjustments) == [500, 800]
    assert billed(live_bills + replayed) - billed(live_bills) == billed(adjustments)


def test_a_stored_decision_is_followed_whatever_the_replays_policy_and_order():
    totals = WindowTotals(MINUTE, LATENESS_MS, late_policy="adjust")
    newest = {**event("n", "u1", 50 * MINUTE, 1), "window_outcome": COUNTED, "window_start_ms": 50 * MINUTE}
    # Counted live in the watermark's window (late_policy "current"), not its own.
    current = {**event("o", "u1", 2 * MINUTE, 2), "window_outcome": COUNTED, "window_start_ms": 50 * MINUTE}
    dead = {**event("d", "u1", 3 * MINUTE, 3), "window_outcome": DEAD_LETTERED, "window_start_ms": None}
    assert [totals.decide(e) for e in (current, newest, dead)] == [
        (COUNTED, 50 * MINUTE), (COUNTED, 50 * MINUTE), (DEAD_LETTERED, None)]
    assert [(t["window_start_ms"], t["n"], t["input"]) for t in totals.flush()] == [(50 * MINUTE, 2, 3)]
    logic = windows(Clock(), record_decisions=False)
    out, _ = logic.on_batch([dead])
    assert [(kind, item["event_id"]) for kind, item in out] == [("late", "d")]
    # An outcome this version does not know is decided again: late here, so an adjustment.
    unknown = {**event("u", "u1", 4 * MINUTE, 4), "window_outcome": "deferred", "window_start_ms": None}
    assert totals.decide(unknown) == (ADJUSTED, None)
    assert totals.decide({**unknown, "window_outcome": COUNTED}) == (ADJUSTED, None)


def test_a_batch_holding_blocks_from_a_snapshot_taken_before_the_decisions_writes_one_file(tmp_path):
    """A flow resumed across the upgrade holds blocks without the decision columns next to
    new ones: the batch is written as one file, the old rows without a decision."""
    _bills, decided = live_run()
    before_midnight = [e for e in decided if e["event_time"] < MIDNIGHT_MS]
    old = EventBlock("event_date=2026-03-01/region=us",
                     to_table(before_midnight[:3]).drop_columns(list(DECISION_COLUMNS)))
    new = EventBlock("event_date=2026-03-01/region=us", to_table(before_midnight[3:]))
    rows, events = blocks_and_events([old, new])
    assert events == [] and rows.table.schema == ARROW_SCHEMA
    store = ParquetStore(str(tmp_path / "raw"))
    store.write_table(old.partition, rows.table)
    assert [(r["event_id"], r["window_outcome"]) for r in store.read().to_pylist()] == [
        *((e["event_id"], None) for e in before_midnight[:3]),
        *((e["event_id"], e["window_outcome"]) for e in before_midnight[3:])]
