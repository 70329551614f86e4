"""The keyed state logic of the ingest flow, without Bytewax."""

import random

from dataflows.state import (
    COUNTED,
    DEAD_LETTERED,
    OUTCOME_COLUMN,
    WINDOW_COLUMN,
    DedupeLogic,
    SeenIds,
    UserWindows,
    WindowLogic,
    WindowTotals,
    bucket_of,
    id_hash,
)
from sinks.base import Batcher


def event(event_id="e1", t=60_000, user="u1", org="o1", tokens=(10, 5, 2, 1), model="m1"):
    return {"event_id": event_id, "org_id": org, "user_id": user, "event_time": t, "model": model,
            "input_tokens": tokens[0], "output_tokens": tokens[1],
            "cache_read_tokens": tokens[2], "cache_write_tokens": tokens[3]}


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_dedupe_passes_each_id_once_per_horizon():
    clock = Clock()
    logic = DedupeLogic(SeenIds(horizon_s=60), clock=clock)
    out, _ = logic.on_batch([event("a"), event("b"), event("a")])
    assert [first for first, _e in out] == [True, True, False]
    assert logic.notify_at().timestamp() == 1060
    resumed = DedupeLogic(SeenIds.thaw(logic.snapshot()), clock=clock)
    assert resumed.on_batch([event("b", org="o2"), event("b")])[0][1][0] is False
    clock.now += 61
    assert logic.on_notify() == ([], DedupeLogic.DISCARD)
    assert logic.on_batch([event("a")])[0] == [(True, event("a"))]


def test_a_dedupe_snapshot_stays_as_it_was_taken():
    # Bytewax may pickle a snapshot after later batches ran; a resumed flow must not
    # believe it has seen ids that arrived after the snapshot.
    clock = Clock()
    logic = DedupeLogic(SeenIds(horizon_s=600, slice_s=10), clock=clock)
    logic.on_batch([event("a")])
    clock.now += 20  # "b" opens a new slice, "c" joins it
    logic.on_batch([event("b")])
    snapshot = logic.snapshot()
    logic.on_batch([event("c")])
    clock.now += 20
    logic.on_batch([event("d")])
    resumed = DedupeLogic(SeenIds.thaw(snapshot), clock=clock)
    assert [first for first, _e in resumed.on_batch([event(i) for i in "abcd"])[0]] == [False, False, True, True]
    assert [first for first, _e in logic.on_batch([event(i) for i in "abcd"])[0]] == [False] * 4
    assert DedupeLogic.build(600, None).seen.ids == set()


def test_a_window_snapshot_stays_as_it_was_taken():
    clock = Clock()
    logic = WindowLogic(UserWindows(60_000, 60_000, "dlq"), flush_interval_s=2, idle_s=30, clock=clock)
    logic.on_batch([event("a", t=60_000)])
    snapshot = logic.snapshot()
    logic.on_batch([event("b", t=600_000)])  # moves the user's watermark far ahead
    resumed = WindowLogic.build(lambda: UserWindows(60_000, 60_000, "dlq"), 2, 30, snapshot)
    late, _ = resumed.on_batch([event("c", t=61_000)])
    assert late == []
    assert [t["n"] for t in resumed.on_notify()[0][0][1]] == [2]
    assert WindowLogic.build(lambda: UserWindows(60_000, 0, "dlq"), 2, 30, None).state.users == {}


def test_buckets_are_stable_and_spread():
    assert bucket_of("o/e1", 256) == bucket_of("o/e1", 256)
    assert len({bucket_of(f"o/e{i}", 256) for i in range(5000)}) == 256


def test_window_totals_are_absolute_and_split_by_kind():
    totals = WindowTotals(length_ms=60_000, lateness_ms=120_000)
    totals.add(event("a", 61_000))
    totals.add(event("b", 119_999, tokens=(1, 1, 1, 1)))
    totals.add(event("c", 120_000))
    totals.add(event("m2", 120_000, model="m2"))
    out = totals.flush()
    assert [(o["window_start_ms"], o["model"], o["n"], o["input"], o["cache_read"]) for o in out] == [
        (60_000, "m1", 2, 11, 3), (120_000, "m1", 1, 10, 2), (120_000, "m2", 1, 10, 2)]
    totals.add(event("d", 62_000))
    (again,) = totals.flush()
    assert (again["window_start_ms"], again["n"], again["input"]) == (60_000, 3, 21)


def test_late_events_follow_the_policy():
    dlq = WindowTotals(length_ms=60_000, lateness_ms=60_000, late_policy="dlq")
    dlq.add(event("a", 600_000))
    dlq.flush()
    assert dlq.add(event("old", 100_000)) == (None, True)
    current = WindowTotals(length_ms=60_000, lateness_ms=60_000, late_policy="current")
    current.add(event("a", 600_000))
    current.flush()
    assert current.add(event("old", 100_000)) == (600_000, True)
    assert current.flush()[0]["n"] == 2


def test_window_logic_flushes_on_timer_and_drops_idle_users():
    clock = Clock()
    logic = WindowLogic(UserWindows(60_000, 0, "dlq"), flush_interval_s=2, idle_s=30, clock=clock)
    assert logic.on_batch([event(user="u1"), event(user="u2"), event("e2", user="u1")]) == ([], WindowLogic.RETAIN)
    assert logic.notify_at().timestamp() == 1002
    (emitted,), retain = logic.on_notify()
    assert emitted[0] == "totals" and sorted((t["user_id"], t["n"]) for t in emitted[1]) == [("u1", 2), ("u2", 1)]
    assert retain == WindowLogic.RETAIN
    assert logic.on_notify() == ([], WindowLogic.RETAIN)
    clock.now += 31  # idle: windows forgotten, the watermark kept for late events
    assert logic.on_notify() == ([], WindowLogic.RETAIN)
    assert [(u.windows, u.watermark_ms) for u in logic.state.users.values()] == [({}, 60_000), ({}, 60_000)]
    clock.now += 60
    assert logic.on_notify() == ([], WindowLogic.DISCARD)


def test_window_logic_routes_late_events():
    logic = WindowLogic(UserWindows(60_000, 60_000, "dlq"), flush_interval_s=2, idle_s=30, clock=Clock())
    late, _ = logic.on_batch([event("new", t=600_000), event("old", t=100_000)])
    assert [(kind, e["event_id"]) for kind, e in late] == [("late", "old")]


def test_batcher_emits_by_size_age_and_eof():
    clock = Clock()
    batcher = Batcher(max_rows=2, max_age_s=5, clock=clock)
    assert batcher.on_item(1) == ([], Batcher.RETAIN)
    assert batcher.notify_at().timestamp() == 1005
    assert batcher.on_item(2) == ([[1, 2]], Batcher.DISCARD)
    batcher = Batcher(max_rows=10, max_age_s=5, items=[3], clock=clock)
    assert batcher.on_notify() == ([[3]], Batcher.DISCARD)
    assert Batcher(10, 5, items=[4]).on_eof() == ([[4]], Batcher.DISCARD)


def test_a_batcher_with_a_quiet_tick_emits_one_empty_batch_after_its_last_one():
    clock = Clock()
    batcher = Batcher(max_rows=2, max_age_s=5, clock=clock, quiet_tick_s=60)
    assert batcher.on_item(1) == ([], Batcher.RETAIN) and batcher.notify_at().timestamp() == 1005
    clock.now = 1005
    assert batcher.on_notify() == ([[1]], Batcher.RETAIN)
    assert batcher.notify_at().timestamp() == 1065 and batcher.snapshot() == []
    clock.now = 1030  # an item before the tick: its batch comes by age, and the tick after it
    assert batcher.on_item(2) == ([], Batcher.RETAIN) and batcher.notify_at().timestamp() == 1035
    assert batcher.on_item(3) == ([[2, 3]], Batcher.RETAIN) and batcher.notify_at().timestamp() == 1090
    clock.now = 1090
    assert batcher.on_notify() == ([[]], Batcher.DISCARD)
    # A key waiting to tick when the snapshot was taken waits again after a restart; a new key does not.
    assert Batcher(2, 5, [], clock=clock, quiet_tick_s=60).notify_at().timestamp() == 1150
    assert Batcher(2, 5, None, clock=clock, quiet_tick_s=60).notify_at() is None
    assert Batcher(2, 5, [], clock=clock).notify_at() is None


def test_late_events_become_adjustments_of_their_own_window_by_default():
    logic = WindowLogic(UserWindows(60_000, 60_000, "adjust"), flush_interval_s=2, idle_s=30, clock=Clock())
    out, _ = logic.on_batch([event("new", t=600_000), event("old", t=100_000)])
    assert [(kind, [(t["event_id"], t["window_start_ms"], t["n"]) for t in totals]) for kind, totals in out] == [
        ("totals", [("old", 60_000, 1)])]
    (kind, totals), = logic.on_notify()[0]
    # The late event never reopens or joins a window's running totals.
    assert [(t["window_start_ms"], t["n"], "event_id" in t) for t in totals] == [(600_000, 1, False)]
    from ops.settings import WindowSettings
    assert WindowTotals(60_000, 60_000).late_policy == WindowSettings().late_policy == "adjust"


def test_an_event_of_a_window_forgotten_while_idle_is_an_adjustment_whatever_the_policy():
    clock = Clock()
    logic = WindowLogic(UserWindows(60_000, 600_000, "dlq"), flush_interval_s=2, idle_s=30, clock=clock)
    logic.on_batch([event("a", t=60_000)])
    clock.now += 31
    assert [t["n"] for t in logic.on_notify()[0][0][1]] == [1]
    clock.now += 31
    assert logic.on_notify() == ([], WindowLogic.RETAIN)
    # Within lateness of the user's last event, but its window's record is in the quota already.
    out, _ = logic.on_batch([event("b", t=61_000), event("c", t=180_000)])
    assert [(kind, [(t["event_id"], t["n"]) for t in totals]) for kind, totals in out] == [("totals", [("b", 1)])]
    assert [(t["window_start_ms"], t["n"]) for t in logic.on_notify()[0][0][1]] == [(180_000, 1)]


def test_window_snapshots_from_before_retirement_resume():
    import pickle
    old = UserWindows(60_000, 600_000, "adjust")
    old.users["o1/u1"] = WindowTotals(60_000, 600_000, org_id="o1", user_id="u1", watermark_ms=60_000)
    del old.users["o1/u1"].__dict__["sealed_ms"]  # how a snapshot of the previous release unpickles
    resumed = WindowLogic.build(lambda: None, 2, 30, pickle.dumps(old))
    assert resumed.state.users["o1/u1"].sealed_ms == -1
    assert resumed.on_batch([event("b", t=61_000)])[0] == []


class OneAtATime(SeenIds):
    """SeenIds as it was before batches: the time slice looked up for each new id."""

    def first_of_each(self, keys, now):
        out = []
        for key in keys:
            digest = id_hash(key)
            if digest in self.ids:
                out.append(False)
                continue
            self.ids.add(digest)
            expires = now + self.horizon_s
            if not self.slices or self.slices[-1][0] + self.slice_s <= expires:
                if self.slices:
                    self.slices[-1] = (self.slices[-1][0], tuple(self.slices[-1][1]))
                self.slices.append((expires, []))
            self.slices[-1][1].append(digest)
            out.append(True)
        return out


def test_a_batch_of_ids_is_seen_as_one_id_after_another():
    """Batches of repeats, all-repeat batches (no empty slice), slice turnovers and evictions:
    the same answers and the same snapshot as one id at a time."""
    rng = random.Random(5)
    batched, single = SeenIds(horizon_s=90, slice_s=30), OneAtATime(horizon_s=90, slice_s=30)
    now = 1000.0
    for _ in range(60):
        now += rng.choice([0, 1, 7, 31, 95])
        keys = [f"o1/e{rng.randrange(40)}" for _ in range(rng.randrange(0, 12))]
        for seen in (batched, single):
            seen.evict(now)
        assert batched.first_of_each(keys, now) == single.first_of_each(keys, now)
        assert batched.frozen() == single.frozen()
        assert all(ids for _expires, ids in batched.slices)
        keys = [f"o1/e{rng.randrange(40)}" for _ in range(rng.randrange(0, 4))]
        assert [batched.first(key, now) for key in keys] == single.first_of_each(keys, now)
        assert batched.frozen() == single.frozen()


def test_recorded_decisions_are_the_events_with_their_outcome_and_a_late_event_stays_undecided():
    """The decision is written into the events rather than a copy of each: the decided rows
    are the events as they came plus the two columns, last; the DLQ's late event is the
    undecided one; the same dicts given again repeat their decisions, as a replay does."""
    def arrivals():
        return [event("new", t=600_000), event("c1", t=610_000, model="m2"), event("old", t=100_000),
                event("u2", t=620_000, user="u2")]

    logic = WindowLogic(UserWindows(60_000, 60_000, "dlq"), flush_interval_s=2, idle_s=30, clock=Clock(),
                        record_decisions=True)
    given = arrivals()
    out, _ = logic.on_batch(given)
    (late,) = [e for kind, e in out if kind == "late"]
    (decided,) = [events for kind, events in out if kind == "decided"]
    assert late == arrivals()[2]
    assert [(e[OUTCOME_COLUMN], e[WINDOW_COLUMN]) for e in decided] == [
        (COUNTED, 600_000), (COUNTED, 600_000), (DEAD_LETTERED, None), (COUNTED, 600_000)]
    assert [list(e)[-2:] for e in decided] == [[OUTCOME_COLUMN, WINDOW_COLUMN]] * 4
    assert [{k: v for k, v in e.items() if k not in (OUTCOME_COLUMN, WINDOW_COLUMN)} for e in decided] == arrivals()
    again = WindowLogic(UserWindows(60_000, 0, "dlq"), flush_interval_s=2, idle_s=30, clock=Clock(),
                        record_decisions=True)
    # after an event at 700,000 with no lateness allowed, "new" would now be late: it keeps its
    # stored count; "old" was not written into, so it is decided again
    out, _ = again.on_batch([event("later", t=700_000), given[0], given[2]])
    (decided,) = [events for kind, events in out if kind == "decided"]
    assert [(e["event_id"], e[OUTCOME_COLUMN], e[WINDOW_COLUMN]) for e in decided] == [
        ("later", COUNTED, 660_000), ("new", COUNTED, 600_000), ("old", DEAD_LETTERED, None)]
