"""The keyed state logic of the ingest flow, without Bytewax."""

from dataflows.state import Batcher, FirstSeen, WindowLogic, WindowTotals


def event(event_id="e1", t=60_000, user="u1", org="o1", tokens=(10, 5, 2, 1)):
    return {"event_id": event_id, "org_id": org, "user_id": user, "event_time": t,
            "input_tokens": tokens[0], "output_tokens": tokens[1],
            "cache_read_tokens": tokens[2], "cache_write_tokens": tokens[3]}


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_first_seen_passes_once_then_expires():
    clock = Clock()
    logic = FirstSeen(horizon_s=60, clock=clock)
    assert logic.on_item(event())[0] == [(True, event())]
    assert logic.on_item(event())[0] == [(False, event())]
    assert logic.notify_at().timestamp() == 1060
    assert logic.on_notify() == ([], FirstSeen.DISCARD)
    resumed = FirstSeen(horizon_s=60, expires_at=logic.snapshot(), clock=clock)
    assert resumed.on_item(event())[0][0][0] is False


def test_window_totals_are_absolute_and_split_by_kind():
    totals = WindowTotals(length_ms=60_000, lateness_ms=120_000)
    totals.add(event("a", 61_000))
    totals.add(event("b", 119_999, tokens=(1, 1, 1, 1)))
    totals.add(event("c", 120_000))
    out = totals.flush()
    assert [(o["window_start_ms"], o["n"], o["input"], o["cache_read"]) for o in out] == [
        (60_000, 2, 11, 3), (120_000, 1, 10, 2)]
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
    logic = WindowLogic(WindowTotals(60_000, 0), flush_interval_s=2, idle_s=30, clock=clock)
    assert logic.on_item(event()) == ([], WindowLogic.RETAIN)
    assert logic.notify_at().timestamp() == 1002
    emitted, _ = logic.on_notify()
    assert emitted[0][0] == "totals" and emitted[0][1][0]["n"] == 1
    clock.now += 31
    assert logic.on_notify() == ([], WindowLogic.DISCARD)


def test_batcher_emits_by_size_age_and_eof():
    clock = Clock()
    batcher = Batcher(max_rows=2, max_age_s=5, clock=clock)
    assert batcher.on_item(1) == ([], Batcher.RETAIN)
    assert batcher.notify_at().timestamp() == 1005
    assert batcher.on_item(2) == ([[1, 2]], Batcher.DISCARD)
    batcher = Batcher(max_rows=10, max_age_s=5, items=[3], clock=clock)
    assert batcher.on_notify() == ([[3]], Batcher.DISCARD)
    assert Batcher(10, 5, items=[4]).on_eof() == ([[4]], Batcher.DISCARD)
