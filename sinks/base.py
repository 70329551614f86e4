"""What every sink shares: the Bytewax shell, batching and freshness.

Each store's module (``sinks/parquet.py``, ``sinks/clickhouse.py``, ``sinks/quota.py``,
``sinks/billing.py``, ``sinks/dlq.py``, ``sinks/audit_log.py``, ``sinks/vault.py``) holds
the whole sink: its client, its writer (a callable taking a list of batches), the retry
policy it writes under and the metrics it reports. This module holds only the parts that
are the same for all of them, in the manner of Quix Streams' ``BatchingSink``: the flow
hands a writer whole batches, and the writer is built inside the worker that uses it. What
every sink reports (rows written, freshness) is in ``sinks.metrics``; rows a sink refuses
for good go to ``sinks.dlq``.

Batching happens upstream of the sink, in a keyed ``Batcher`` step, and not in the sink
itself: Bytewax gives sinks no timer (a flush by age needs ``notify_at``), and rows held in
a stateful step are part of the recovery snapshot, so a crash never loses a pending batch.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from bytewax.operators import StatefulLogic
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from sinks.tracing import write_span


class Writer(Protocol):
    """A sink's writer: one call per list of batches, ``close`` when the flow ends."""

    def __call__(self, batches: list) -> None: ...


class _WriterPartition(StatelessSinkPartition):
    def __init__(self, write: Writer, store: str = "sink", worker_index: int = 0):
        self._write = write
        self._store = store
        self._worker_index = worker_index

    def write_batch(self, items: list) -> None:
        # One span per write of every sink, here rather than in each store's module.
        with write_span(self._store, self._worker_index, items):
            self._write(items)

    def close(self) -> None:
        # A writer may have work to finish when the flow ends (ClickHouseWriter refreshes
        # the aggregates of its last writes).
        getattr(self._write, "close", lambda: None)()


class WriterSink(DynamicSink):
    """Builds its writer inside each worker, so connections are never pickled or shared."""

    def __init__(self, make_writer: Callable[[], Writer]):
        self._make_writer = make_writer

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _WriterPartition:
        return _WriterPartition(self._make_writer(), store_of(step_id), worker_index)


def store_of(step_id: str) -> str:
    """The store a sink step writes to: ``gatewatch_ingest.clickhouse_out`` -> ``clickhouse``."""
    return step_id.rsplit(".", 1)[-1].removesuffix("_out")


def _at(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc)


class Batcher(StatefulLogic):
    """Holds items until max_rows or max_age_s, then emits them as one list.

    With ``quiet_tick_s``, a key that emitted a batch and then received nothing for
    quiet_tick_s emits one empty list: the writer hears that its stream went quiet, from a
    timer that lives and stops with the flow (the ClickHouse writer then refreshes the
    aggregates of its last writes, which no later batch would start)."""

    def __init__(self, max_rows: int, max_age_s: float, items: list | None = None,
                 clock: Callable[[], float] = time.time, quiet_tick_s: float | None = None):
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.items: list[Any] = items or []
        self.clock = clock
        self.first_at = clock() if self.items else None
        self.quiet_tick_s = quiet_tick_s
        # Only a key waiting to tick is kept without items (the others are discarded), so an
        # empty snapshot resumes waiting.
        self.tick_at = clock() + quiet_tick_s if quiet_tick_s is not None and items == [] else None

    def on_item(self, item):
        if not self.items:
            self.first_at = self.clock()
        self.items.append(item)
        if len(self.items) >= self.max_rows:
            return self._emit()
        return [], StatefulLogic.RETAIN

    def _take(self) -> list:
        batch, self.items, self.first_at = self.items, [], None
        return batch

    def _emit(self):
        batch = self._take()
        if self.quiet_tick_s is None:
            return [batch], StatefulLogic.DISCARD
        self.tick_at = self.clock() + self.quiet_tick_s
        return [batch], StatefulLogic.RETAIN

    def on_notify(self):
        if self.items:
            return self._emit()
        return ([[]] if self.tick_at is not None else []), StatefulLogic.DISCARD

    def on_eof(self):
        return ([self._take()] if self.items else []), StatefulLogic.DISCARD

    def notify_at(self):
        if self.first_at is not None:
            return _at(self.first_at + self.max_age_s)
        return _at(self.tick_at) if self.tick_at is not None else None

    def snapshot(self):
        return list(self.items)
