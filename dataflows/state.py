"""Keyed state of the ingest flow: dedupe and window totals (sink batches: sinks.base.Batcher).

Each Bytewax logic is a thin shell over a plain state object whose methods tests call
directly; its recovery snapshot is an immutable copy of that object.
"""

from __future__ import annotations

import hashlib
import pickle
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
from bytewax.operators import StatefulBatchLogic

from schemas.vocabulary import TOKEN_FIELDS, TOKEN_KINDS, event_key, user_key

MS_PER_DAY = 86_400_000


def _at(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc)


def bucket_of(key: str, buckets: int) -> str:
    """A stable bucket for a key. Bytewax looks at the timer of every open key on each
    activation, so millions of event ids or users are grouped into a few hundred keys."""
    return str(zlib.crc32(key.encode()) % buckets)


# -- dedupe ---------------------------------------------------------------------------

def id_hash(key: str) -> int:
    """64 bits of a stable hash (Python's own str hash changes with every process, and a
    snapshot outlives the process). Two ids collide within one horizon with odds of about
    n^2/2^65: 5e-7 for 4.5 million remembered ids."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


@dataclass
class SeenIds:
    """Hashes of the event ids seen in the last horizon_s seconds (wall clock), kept as one
    set for lookups plus time slices that expire together (about 60 bytes per id)."""

    horizon_s: float
    slice_s: float = 30.0
    ids: set[int] = field(default_factory=set)
    slices: list[tuple[float, list[int]]] = field(default_factory=list)  # (expires at, ids), oldest first

    def first(self, key: str, now: float) -> bool:
        digest = id_hash(key)
        if digest in self.ids:
            return False
        self.ids.add(digest)
        self._open_slice(now + self.horizon_s).append(digest)
        return True

    def first_of_each(self, keys: list[str], now: float) -> list[bool]:
        """first() of each key in turn at one time (dedupe's per-event cost was mostly calls):
        the time slice is looked up once, at the batch's first new id."""
        ids, remember = self.ids, None
        out = []
        for key in keys:
            digest = id_hash(key)
            if digest in ids:
                out.append(False)
                continue
            ids.add(digest)
            if remember is None:
                remember = self._open_slice(now + self.horizon_s).append
            remember(digest)
            out.append(True)
        return out

    def _open_slice(self, expires: float) -> list[int]:
        """The ids of the slice that expires with ``expires``, a new one when the last is a
        slice_s older (the last is then closed: a tuple, shared by later snapshots)."""
        if not self.slices or self.slices[-1][0] + self.slice_s <= expires:
            if self.slices:
                self.slices[-1] = (self.slices[-1][0], tuple(self.slices[-1][1]))
            self.slices.append((expires, []))
        return self.slices[-1][1]

    def frozen(self) -> tuple:
        """An immutable copy for a recovery snapshot: closed slices are shared, only the
        open one is copied, and the lookup set is rebuilt on resume."""
        return self.horizon_s, self.slice_s, tuple((expires, tuple(ids)) for expires, ids in self.slices)

    @classmethod
    def thaw(cls, frozen: tuple) -> "SeenIds":
        horizon_s, slice_s, slices = frozen
        seen = cls(horizon_s, slice_s, {digest for _expires, ids in slices for digest in ids}, list(slices))
        if seen.slices:
            seen.slices[-1] = (seen.slices[-1][0], list(seen.slices[-1][1]))
        return seen

    def evict(self, now: float) -> None:
        while self.slices and self.slices[0][0] <= now:
            self.ids.difference_update(self.slices.pop(0)[1])

    def next_expiry(self) -> float | None:
        return self.slices[0][0] if self.slices else None


class DedupeLogic(StatefulBatchLogic):
    """Keyed by a bucket of users: emits (True, event) for the first sighting of an
    id and (False, event) for every repeat within the horizon."""

    def __init__(self, seen: SeenIds, clock: Callable[[], float] = time.time):
        self.seen = seen
        self.clock = clock

    @classmethod
    def build(cls, horizon_s: float, resume: tuple | None) -> "DedupeLogic":
        return cls(SeenIds.thaw(resume) if resume is not None else SeenIds(horizon_s))

    def on_batch(self, events: list[dict]):
        now = self.clock()
        self.seen.evict(now)
        firsts = self.seen.first_of_each([event_key(e["org_id"], e["event_id"]) for e in events], now)
        return list(zip(firsts, events)), StatefulBatchLogic.RETAIN

    def on_notify(self):
        self.seen.evict(self.clock())
        return [], (StatefulBatchLogic.RETAIN if self.seen.ids else StatefulBatchLogic.DISCARD)

    def notify_at(self):
        expiry = self.seen.next_expiry()
        return _at(expiry) if expiry is not None else None

    def snapshot(self):
        # Bytewax may pickle a snapshot after later batches ran: it must not share live state.
        return self.seen.frozen()


# -- windowed usage totals --------------------------------------------------------------

def late_adjustment(event: dict, length_ms: int) -> dict:
    """A late event as a one-event total of its own event-time window, carrying its event_id.

    It never merges into the window's running totals (that window may be billed and
    forgotten long ago): quotas and billing apply it once per event_id, in the day and
    month it happened."""
    start = event["event_time"] - event["event_time"] % length_ms
    return {"org_id": event["org_id"], "user_id": event["user_id"], "model": event["model"],
            "window_start_ms": start, "window_length_ms": length_ms, "n": 1, "event_id": event["event_id"],
            **{kind: event[f"{kind}_tokens"] for kind in TOKEN_KINDS}}


OUTCOMES = COUNTED, ADJUSTED, DEAD_LETTERED = "counted", "adjusted", "dead_lettered"
"""What the windows did with an event: counted it in a window's totals, sent it as a late
adjustment of its own (late_adjustment), or sent it to the DLQ (late_policy "dlq")."""
OUTCOME_COLUMN, WINDOW_COLUMN = "window_outcome", "window_start_ms"
"""The event's keys (and raw Parquet columns) holding its outcome and, when counted, the
start of the window it was counted in (not its own with late_policy "current")."""


HORIZON_FIELD = "replay_horizon_ms"
"""An event's key set by the replay's source (connectors.parquet_source): no row of the
event's file or of a file read after it is counted in a window that ends at or before it
(a window starting before it). No sink stores it (sinks.parquet.to_table keeps the schema's
columns; the quota and billing take window totals)."""

NO_LATER_WINDOW_MS = 2 ** 62
"""The horizon of files after which no file counts a row: every window may be forgotten."""


def counted_window_floor(table: pa.Table, length_ms: int) -> int | None:
    """The earliest window start a replay's windows (WindowTotals.decide) may count a row of
    the table in, None if they count none of them. A row with a stored count is counted in its
    window_start_ms; adjusted and dead-lettered rows in none; a row decided again (no known
    outcome, or a count without its window) at the earliest in its own event-time window
    (add: a late one goes to a later window with late_policy "current", else to none). The
    table needs event_time and whichever decision columns its file has (older files: none)."""
    rows = table.num_rows
    outcomes = table.column(OUTCOME_COLUMN) if OUTCOME_COLUMN in table.column_names else pa.nulls(rows, pa.string())
    windows = table.column(WINDOW_COLUMN) if WINDOW_COLUMN in table.column_names else pa.nulls(rows, pa.int64())
    counted = pc.fill_null(pc.equal(outcomes, COUNTED), False)
    stored = pc.and_(pc.is_in(outcomes, pa.array(OUTCOMES)),
                     pc.invert(pc.and_(counted, pc.is_null(windows))))
    event_ms = pc.cast(table.column("event_time"), pa.int64())
    own_windows = pc.multiply(pc.divide(event_ms, length_ms), length_ms)  # integer division: event times are > 0
    floors = [pc.min(pc.filter(windows, pc.and_(stored, counted))).as_py(),
              pc.min(pc.filter(own_windows, pc.invert(stored))).as_py()]
    return min((floor for floor in floors if floor is not None), default=None)


@dataclass(frozen=True)
class ReplayWindowFloor:
    """counted_window_floor for windows of length_ms, as the replay's source takes it
    (connectors.parquet_source.WindowFloor)."""

    length_ms: int
    columns: tuple[str, ...] = (OUTCOME_COLUMN, WINDOW_COLUMN)
    field: str = HORIZON_FIELD
    no_later_window_ms: int = NO_LATER_WINDOW_MS

    def __call__(self, table: pa.Table) -> int | None:
        return counted_window_floor(table, self.length_ms)


_TOKEN_COLUMNS = tuple(enumerate(TOKEN_FIELDS, start=1))
"""(index in a window's totals, the event's field) of each token kind."""


def with_decision(event: dict, outcome: str, window: int | None) -> dict:
    return {**event, OUTCOME_COLUMN: outcome, WINDOW_COLUMN: window}


def recorded_decision(event: dict, outcome: str, window: int | None) -> dict:
    """The event with the decision written into it: a copy of each event was ~1 µs of the
    windows' ~5. Safe because past the windows the flow's other readers of the same dict take
    named fields (the audit log); a dead-lettered event is copied (with_decision), as its
    DLQ record is made from the undecided one."""
    event[OUTCOME_COLUMN] = outcome
    event[WINDOW_COLUMN] = window
    return event


@dataclass
class WindowTotals:
    """Running totals of one user's tumbling event-time windows, per model (prices differ).

    The watermark is the newest event time seen for the user: the producer keys events by
    user, so a user's events arrive in partition order and the same input always gives the
    same decisions, which is what makes a replay after a crash land on the same totals.
    """

    length_ms: int
    lateness_ms: int
    late_policy: str = "adjust"
    org_id: str = ""
    user_id: str = ""
    watermark_ms: int = -1
    last_seen_s: float = 0.0
    windows: dict[tuple[int, str], list[int]] = field(default_factory=dict)  # (start, model) -> [n, *tokens]
    dirty: set[tuple[int, str]] = field(default_factory=set)

    sealed_ms: int = -1
    """Windows that start before this were flushed and then forgotten while their user was
    idle (retire): the quota still holds their records, so reopening one at n=1 would be
    refused as not newer. Their events go out as late adjustments instead (class default:
    snapshots taken before this field existed unpickle with it)."""

    repeats_decisions: bool = False
    """The user's events carry the live flow's decisions (a replay of raw storage). The
    replay's watermark then says nothing about which of its windows can still grow: the
    files are read by event date, a date's files in the order listed, which within a date
    may put a later arrival (in a newer file, or one listed first) before an earlier one.
    Such a window, forgotten by watermark and lateness and given another event, would
    restart at a lower count that the quota ignores. So its windows are forgotten only
    once the replay has moved past their date or past the horizon of the files still to read
    (forget_before_ms), and never for idleness measured on the replay's wall clock
    (WindowLogic._flush)."""

    def add(self, event: dict) -> tuple[int | None, bool]:
        """Count the event; return (window it went to, or None if it goes out as a late
        adjustment or to the DLQ, was_late). (None, False) is an event of a retired window."""
        self.org_id, self.user_id = event["org_id"], event["user_id"]
        at = event["event_time"]
        start = at - at % self.length_ms
        # Decided by event times alone (never by which windows happen to be in memory), so
        # that a replay makes the same decision.
        late = at < self.watermark_ms - self.lateness_ms
        if late:
            if self.late_policy != "current":
                return None, True
            start = self.watermark_ms - self.watermark_ms % self.length_ms
        if start < self.sealed_ms:
            self.watermark_ms = max(self.watermark_ms, at)
            return None, False
        self._count(start, event)
        return start, late

    def _count(self, start: int, event: dict) -> None:
        key = (start, event["model"])
        totals = self.windows.get(key)
        if totals is None:
            totals = self.windows[key] = [0] * (1 + len(TOKEN_KINDS))
        totals[0] += 1
        for i, name in _TOKEN_COLUMNS:
            totals[i] += event[name]
        self.dirty.add(key)
        if event["event_time"] > self.watermark_ms:
            self.watermark_ms = event["event_time"]

    def decide(self, event: dict) -> tuple[str, int | None]:
        """(outcome, window the event was counted in or None) of an event: the decision
        stored with it when the live flow made one (a replay of raw storage: the live
        decision hung on its arrival order and on wall-clock idleness, which a replay
        cannot see), else add's decision as an outcome. A stored outcome this version does
        not know, or a count without its window, is decided again rather than dropped."""
        stored = event.get(OUTCOME_COLUMN)
        if stored not in OUTCOMES or (stored == COUNTED and event.get(WINDOW_COLUMN) is None):
            window, was_late = self.add(event)
            if window is not None:
                return COUNTED, window
            return (DEAD_LETTERED if was_late and self.late_policy == "dlq" else ADJUSTED), None
        self.org_id, self.user_id = event["org_id"], event["user_id"]
        self.repeats_decisions = True
        if stored == COUNTED:
            self._count(event[WINDOW_COLUMN], event)
        self.watermark_ms = max(self.watermark_ms, event["event_time"])
        return stored, event[WINDOW_COLUMN] if stored == COUNTED else None

    def retire(self) -> None:
        """Forget the windows of an idle user (after a flush) but keep its watermark, so its
        next events are still classified against what the quota already counted."""
        if self.watermark_ms >= 0:
            watermark_window_end = self.watermark_ms - self.watermark_ms % self.length_ms + self.length_ms
            self.sealed_ms = max(self.sealed_ms, watermark_window_end)
        self.windows.clear()

    def flush(self, horizon_ms: int = -1) -> list[dict]:
        """Totals of every window changed since the last flush; forget the windows that take no
        more events (forget_before_ms)."""
        out = [
            {"org_id": self.org_id, "user_id": self.user_id, "model": model, "window_start_ms": start,
             "window_length_ms": self.length_ms, "n": self.windows[start, model][0],
             **{kind: self.windows[start, model][i] for i, kind in enumerate(TOKEN_KINDS, start=1)}}
            for start, model in sorted(self.dirty)
        ]
        self.dirty.clear()
        self.forget(horizon_ms)
        return out

    def forget(self, horizon_ms: int = -1) -> None:
        """Drop the windows ending at or before forget_before_ms(horizon_ms), flushed or not:
        call it after flush, or on a user without changes since."""
        before = self.forget_before_ms(horizon_ms)
        for key in [k for k in self.windows if k[0] + self.length_ms <= before]:
            del self.windows[key]

    def forget_before_ms(self, horizon_ms: int = -1) -> int:
        """Windows ending at or before this take no more events. Live: those past the watermark
        by the lateness. Replayed decisions: those ending by the later of two bounds, each safe
        alone. The midnight (UTC) that starts the watermark's day: a window only takes events
        dated before its end (late_policy "current" counts a late event in a later window,
        never an earlier one) and a replay reads every file of a date before any file of a later
        date (connectors.parquet_source). The replay's horizon (HORIZON_FIELD) seen with the
        last events: the files still to read count no row in a window ending by it."""
        if self.repeats_decisions:
            return max(self.watermark_ms - self.watermark_ms % MS_PER_DAY, horizon_ms)
        return self.watermark_ms - self.lateness_ms

    def replay_holds_windows(self) -> bool:
        """Whether the user's windows are a replay's still open ones (repeats_decisions): they
        close by their date or the replay's horizon, never by idleness on the replay's wall clock."""
        return self.repeats_decisions and bool(self.windows)


@dataclass
class UserWindows:
    """The WindowTotals of every user in one bucket."""

    length_ms: int
    lateness_ms: int
    late_policy: str
    users: dict[str, WindowTotals] = field(default_factory=dict)
    next_flush_s: float | None = None
    horizon_ms: int = -1
    """The highest replay horizon (HORIZON_FIELD) of the events seen; -1 outside a replay (class
    default: snapshots taken before this field existed unpickle with it)."""


RETIRED_FOR = 3
"""An idle user's watermark is kept this many idle_s after its last event. The quota keeps
a window's record twice the flow's horizon (idle_s) from its last write, a flush after the
user's last event, so the third covers sink delays: until then a late event of the user
is classified against its watermark, never reopens a window the quota already counted."""


class WindowLogic(StatefulBatchLogic):
    """Keyed by bucket_of(org/user). Emits ("totals", [...]) every flush interval while
    something changed, and for late events at once either ("totals", [late_adjustment])
    (policy "adjust", the default) or ("late", event) (policy "dlq"); an event of a window
    forgotten while its user was idle is always an adjustment. Retires users idle for idle_s
    (windows forgotten, watermark kept), forgets them after RETIRED_FOR * idle_s; a replay's
    user keeps its open windows however long it idles (WindowTotals.repeats_decisions). With
    record_decisions, every batch's events also come back as ("decided", [events with their
    outcome]) for raw storage, so that a replay repeats these decisions rather than remaking
    them (WindowTotals.decide); the decision is written into the event dicts themselves
    (recorded_decision), so the same dicts given again repeat it, as a replay does."""

    def __init__(self, state: UserWindows, flush_interval_s: float, idle_s: float,
                 clock: Callable[[], float] = time.time, record_decisions: bool = False):
        self.state = state
        self.flush_interval_s = flush_interval_s
        self.idle_s = idle_s
        self.clock = clock
        self.record_decisions = record_decisions
        self.swept_horizon_ms = -1
        """The horizon the last flush applied to every replayed user (not only those with changes)."""

    @classmethod
    def build(cls, empty: Callable[[], UserWindows], flush_interval_s: float, idle_s: float,
              resume: bytes | None, record_decisions: bool = False) -> "WindowLogic":
        return cls(pickle.loads(resume) if resume is not None else empty(), flush_interval_s, idle_s,
                   record_decisions=record_decisions)

    def on_batch(self, events: list[dict]):
        now = self.clock()
        late, adjustments, decided = [], [], []
        users, record_decisions = self.state.users, self.record_decisions
        for event in events:
            user = user_key(event["org_id"], event["user_id"])
            totals = users.get(user)
            if totals is None:
                totals = users[user] = WindowTotals(self.state.length_ms, self.state.lateness_ms,
                                                    self.state.late_policy)
            totals.last_seen_s = now
            outcome, window = totals.decide(event)
            if record_decisions:
                decided.append(with_decision(event, outcome, window) if outcome == DEAD_LETTERED
                               else recorded_decision(event, outcome, window))
            if outcome == DEAD_LETTERED:
                late.append(("late", event))
            elif outcome == ADJUSTED:
                adjustments.append(late_adjustment(event, self.state.length_ms))
        # Horizons never fall along the read order (a suffix minimum), so the last event's is the highest.
        horizon = events[-1].get(HORIZON_FIELD) if events else None
        if horizon is not None and horizon > self.state.horizon_ms:
            self.state.horizon_ms = horizon
        if self.state.next_flush_s is None:
            self.state.next_flush_s = now + self.flush_interval_s
        out = [*late, *([("totals", adjustments)] if adjustments else []), *([("decided", decided)] if decided else [])]
        return out, StatefulBatchLogic.RETAIN

    def _flush(self) -> list:
        now = self.clock()
        horizon = self.state.horizon_ms
        totals = [t for user in self.state.users.values() if user.dirty for t in user.flush(horizon)]
        # Users not seen since the horizon rose may hold windows the files still to read count nothing
        # in; each horizon is swept once (sweeping at every flush: 19 µs a row instead of 11 for a replay
        # without horizons, `gatewatch bench state --replay-windows --users 2000 --rows 30000 --days 1`).
        sweep, self.swept_horizon_ms = horizon > self.swept_horizon_ms, max(horizon, self.swept_horizon_ms)
        for key, user in list(self.state.users.items()):
            if user.replay_holds_windows():
                if sweep:
                    user.forget(horizon)
                if user.windows:
                    continue  # once it holds none, it idles out like a live user
            idle_for = now - user.last_seen_s
            if idle_for >= RETIRED_FOR * self.idle_s:
                del self.state.users[key]
            elif idle_for >= self.idle_s and user.windows:
                user.retire()
        self.state.next_flush_s = now + self.flush_interval_s if self.state.users else None
        return [("totals", totals)] if totals else []

    def on_notify(self):
        out = self._flush()
        return out, (StatefulBatchLogic.RETAIN if self.state.users else StatefulBatchLogic.DISCARD)

    def on_eof(self):
        return self._flush(), StatefulBatchLogic.RETAIN

    def notify_at(self):
        return _at(self.state.next_flush_s) if self.state.next_flush_s is not None else None

    def snapshot(self) -> bytes:
        # Pickled now: Bytewax may pickle a snapshot after later batches changed the state.
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL)
