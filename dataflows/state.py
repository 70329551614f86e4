"""Keyed state of the ingest flow: dedupe, window totals and sink batches.

Each StatefulLogic is a thin shell over a plain state object whose methods tests call
directly; Bytewax snapshots the state object for recovery.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from bytewax.operators import StatefulLogic

from sinks.quota import TOKEN_KINDS


def _at(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc)


# -- dedupe ---------------------------------------------------------------------------

class FirstSeen(StatefulLogic):
    """Keyed by org/event_id: passes the first event, flags every later one as a duplicate
    until the horizon (wall clock) has passed since the first one."""

    def __init__(self, horizon_s: float, expires_at: float | None = None, clock: Callable[[], float] = time.time):
        self.horizon_s = horizon_s
        self.expires_at = expires_at
        self.clock = clock

    def on_item(self, event: dict):
        if self.expires_at is None:
            self.expires_at = self.clock() + self.horizon_s
            return [(True, event)], StatefulLogic.RETAIN
        return [(False, event)], StatefulLogic.RETAIN

    def on_notify(self):
        return [], StatefulLogic.DISCARD

    def notify_at(self):
        return _at(self.expires_at) if self.expires_at is not None else None

    def snapshot(self):
        return self.expires_at


# -- windowed usage totals --------------------------------------------------------------

@dataclass
class WindowTotals:
    """Running totals of one user's tumbling event-time windows.

    The watermark is the newest event time seen for the user: the producer keys events by
    user, so a user's events arrive in partition order and the same input always gives the
    same decisions, which is what makes a replay after a crash land on the same totals.
    """

    length_ms: int
    lateness_ms: int
    late_policy: str = "dlq"
    org_id: str = ""
    user_id: str = ""
    watermark_ms: int = -1
    windows: dict[int, list[int]] = field(default_factory=dict)  # start -> [n, *tokens by kind]
    dirty: set[int] = field(default_factory=set)

    def add(self, event: dict) -> tuple[int | None, bool]:
        """Count the event; return (window it went to or None if refused as late, was_late)."""
        self.org_id, self.user_id = event["org_id"], event["user_id"]
        start = event["event_time"] - event["event_time"] % self.length_ms
        late = event["event_time"] < self.watermark_ms - self.lateness_ms and start not in self.windows
        if late:
            if self.late_policy == "dlq":
                return None, True
            start = self.watermark_ms - self.watermark_ms % self.length_ms
        totals = self.windows.setdefault(start, [0] * (1 + len(TOKEN_KINDS)))
        totals[0] += 1
        for i, kind in enumerate(TOKEN_KINDS, start=1):
            totals[i] += event[f"{kind}_tokens"]
        self.dirty.add(start)
        self.watermark_ms = max(self.watermark_ms, event["event_time"])
        return start, late

    def flush(self) -> list[dict]:
        """Totals of every window changed since the last flush; forget windows past lateness."""
        out = [
            {"org_id": self.org_id, "user_id": self.user_id, "window_start_ms": start, "window_length_ms": self.length_ms,
             "n": self.windows[start][0],
             **{kind: self.windows[start][i] for i, kind in enumerate(TOKEN_KINDS, start=1)}}
            for start in sorted(self.dirty)
        ]
        self.dirty.clear()
        horizon = self.watermark_ms - self.lateness_ms
        for start in [s for s in self.windows if s + self.length_ms <= horizon]:
            del self.windows[start]
        return out


class WindowLogic(StatefulLogic):
    """Keyed by org/user. Emits ("late", event) at once and ("totals", [...]) every
    flush interval while something changed; idle users are dropped after the lateness."""

    def __init__(self, state: WindowTotals, flush_interval_s: float, idle_s: float,
                 clock: Callable[[], float] = time.time):
        self.state = state
        self.flush_interval_s = flush_interval_s
        self.idle_s = idle_s
        self.clock = clock
        self.next_flush: float | None = None
        self.last_seen = clock()

    def on_item(self, event: dict):
        self.last_seen = self.clock()
        _start, late = self.state.add(event)
        if self.next_flush is None and self.state.dirty:
            self.next_flush = self.last_seen + self.flush_interval_s
        return ([("late", event)] if late else []), StatefulLogic.RETAIN

    def _flush(self):
        totals = self.state.flush()
        self.next_flush = None
        return [("totals", totals)] if totals else []

    def on_notify(self):
        if self.state.dirty:
            return self._flush(), StatefulLogic.RETAIN
        if self.clock() - self.last_seen >= self.idle_s:
            return [], StatefulLogic.DISCARD
        return [], StatefulLogic.RETAIN

    def on_eof(self):
        return (self._flush() if self.state.dirty else []), StatefulLogic.RETAIN

    def notify_at(self):
        return _at(self.next_flush if self.next_flush is not None else self.last_seen + self.idle_s)

    def snapshot(self):
        return self.state


def window_logic_builder(length_s: float, lateness_s: float, late_policy: str, flush_interval_s: float):
    """Builder for op.stateful over a stream keyed by "org/user" carrying events."""

    def build(resume: WindowTotals | None) -> WindowLogic:
        state = resume or WindowTotals(int(length_s * 1000), int(lateness_s * 1000), late_policy)
        return WindowLogic(state, flush_interval_s, idle_s=max(lateness_s, length_s) + flush_interval_s)

    return build


# -- sink batches -----------------------------------------------------------------------

class Batcher(StatefulLogic):
    """Holds items until max_rows or max_age_s, then emits them as one list.

    Batching here rather than in the sink keeps pending rows in the recovery snapshot, and
    gives sinks (which have no timer) a flush by age."""

    def __init__(self, max_rows: int, max_age_s: float, items: list | None = None,
                 clock: Callable[[], float] = time.time):
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.items: list[Any] = items or []
        self.clock = clock
        self.first_at = clock() if self.items else None

    def on_item(self, item):
        if not self.items:
            self.first_at = self.clock()
        self.items.append(item)
        if len(self.items) >= self.max_rows:
            return [self._take()], StatefulLogic.DISCARD
        return [], StatefulLogic.RETAIN

    def _take(self) -> list:
        batch, self.items, self.first_at = self.items, [], None
        return batch

    def on_notify(self):
        return ([self._take()] if self.items else []), StatefulLogic.DISCARD

    def on_eof(self):
        return ([self._take()] if self.items else []), StatefulLogic.DISCARD

    def notify_at(self):
        return _at(self.first_at + self.max_age_s) if self.first_at is not None else None

    def snapshot(self):
        return list(self.items)
