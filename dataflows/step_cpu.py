"""CPU time of each step of a built dataflow, measured from inside the flow: every function
Bytewax calls in Python (a batch mapper, a stateful step's on_batch / on_notify / snapshot, a
source partition's next_batch and snapshot, a sink's write_batch) is wrapped to add the
calling thread's CPU time to its step, with the calls and the items they were handed.

`bench stages` times each stage once over thousands of events; the same work inside the flow
cost 1.5-2.5x more, and only the flow can say where: what batch sizes its steps see (a keyed
stateful step is called once per key in a batch), what each call costs around the work, and
what Bytewax's Rust and the other threads take between the calls (the worker thread's CPU
less the steps' sum). ``time.thread_time`` costs ~0.3 µs, so a call costs ~1 µs more.

Totals are kept in plain floats and reported to ``sinks.metrics`` once a second of wall
time (a labelled increment per call would cost more than many of the calls):
``gatewatch_step_cpu_seconds{step}``, ``gatewatch_step_calls{step}``,
``gatewatch_step_items{step}``, ``gatewatch_step_wall_seconds{step}`` (the wall time of its
calls: its CPU, and its waits for a sink's server, which hold the worker as much),
``gatewatch_worker_cpu_seconds`` (the worker threads' CPU up to their latest step call) and
``gatewatch_gc_cpu_seconds`` (the cyclic GC, wherever it ran: also inside the steps it
interrupted).
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
from typing import Any, Callable

from bytewax.dataflow import Dataflow
from bytewax.inputs import DynamicSource, FixedPartitionedSource, StatefulSourcePartition, StatelessSourcePartition
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import DynamicSink, FixedPartitionedSink, StatefulSinkPartition, StatelessSinkPartition

from sinks.metrics import get_metrics

REPORT_EVERY_S = 1.0


class StepClock:
    """CPU seconds, calls, items and wall seconds per step name, and each worker thread's CPU
    so far."""

    def __init__(self, report_every_s: float = REPORT_EVERY_S):
        self.totals: dict[str, list[float]] = {}
        self.reported: dict[str, list[float]] = {}
        self.report_every_s = report_every_s
        self._next_report = time.monotonic() + report_every_s
        self._lock = threading.Lock()
        self._thread = threading.local()
        self.worker_cpu_s = 0.0
        self._worker_reported = 0.0
        self.gc_cpu_s = 0.0
        self._gc_reported = 0.0
        self._gc_started: float | None = None

    def call(self, step: str, function: Callable, items: Any = None):
        """``function()`` (or ``function(items)`` with items given), its CPU and wall time
        charged to step."""
        started, started_wall = time.thread_time(), time.perf_counter()
        try:
            return function(items) if items is not None else function()
        finally:
            ended = time.thread_time()
            self.add(step, ended - started, len(items) if items is not None else 0, ended,
                     time.perf_counter() - started_wall)

    def add(self, step: str, cpu_s: float, items: int, thread_cpu_s: float, wall_s: float) -> None:
        last = getattr(self._thread, "cpu_s", None)
        self._thread.cpu_s = thread_cpu_s
        with self._lock:  # the workers of a process (-w N) share the totals
            total = self.totals.get(step)
            if total is None:
                total = self.totals[step] = [0.0, 0, 0, 0.0]
            total[0] += cpu_s
            total[1] += 1
            total[2] += items
            total[3] += wall_s
            if last is not None:
                self.worker_cpu_s += thread_cpu_s - last
        if time.monotonic() >= self._next_report:
            self.report()

    def report(self) -> None:
        """Increments since the last report, to the metrics backend."""
        with self._lock:
            self._next_report = time.monotonic() + self.report_every_s
            metrics = get_metrics()
            for step, (cpu_s, calls, items, wall_s) in list(self.totals.items()):
                before = self.reported.setdefault(step, [0.0, 0, 0, 0.0])
                tags = {"step": step}
                if cpu_s > before[0]:
                    metrics.increment("gatewatch_step_cpu_seconds", cpu_s - before[0], tags=tags)
                if calls > before[1]:
                    metrics.increment("gatewatch_step_calls", calls - before[1], tags=tags)
                if items > before[2]:
                    metrics.increment("gatewatch_step_items", items - before[2], tags=tags)
                if wall_s > before[3]:
                    metrics.increment("gatewatch_step_wall_seconds", wall_s - before[3], tags=tags)
                self.reported[step] = [cpu_s, calls, items, wall_s]
            if self.worker_cpu_s > self._worker_reported:
                metrics.increment("gatewatch_worker_cpu_seconds", self.worker_cpu_s - self._worker_reported)
                self._worker_reported = self.worker_cpu_s
            if self.gc_cpu_s > self._gc_reported:
                metrics.increment("gatewatch_gc_cpu_seconds", self.gc_cpu_s - self._gc_reported)
                self._gc_reported = self.gc_cpu_s

    def on_gc(self, phase: str, _info: dict) -> None:
        """A gc.callbacks hook: the collection's CPU (on the thread that triggered it)."""
        if phase == "start":
            self._gc_started = time.thread_time()
        elif self._gc_started is not None:
            self.gc_cpu_s += time.thread_time() - self._gc_started
            self._gc_started = None


class _TimedLogic(StatefulBatchLogic):
    def __init__(self, clock: StepClock, step: str, inner: StatefulBatchLogic):
        self._clock, self._step, self._inner = clock, step, inner

    def on_batch(self, values):
        return self._clock.call(self._step, self._inner.on_batch, values)

    def on_notify(self):
        return self._clock.call(f"{self._step}.notify", self._inner.on_notify)

    def on_eof(self):
        return self._clock.call(f"{self._step}.eof", self._inner.on_eof)

    def notify_at(self):
        return self._inner.notify_at()

    def snapshot(self):
        return self._clock.call(f"{self._step}.snapshot", self._inner.snapshot)


class _TimedPolls:
    """A source partition's polls, timed: items out, not in, so counted after the call."""

    def __init__(self, clock: StepClock, step: str, inner):
        self._clock, self._step, self._inner = clock, step, inner

    def next_batch(self):
        started, started_wall = time.thread_time(), time.perf_counter()
        batch = self._inner.next_batch()
        ended = time.thread_time()
        self._clock.add(self._step, ended - started, len(batch), ended, time.perf_counter() - started_wall)
        return batch

    def next_awake(self):
        return self._inner.next_awake()

    def close(self):
        self._inner.close()


class _TimedSourcePartition(_TimedPolls, StatefulSourcePartition):
    def snapshot(self):
        return self._clock.call(f"{self._step}.snapshot", self._inner.snapshot)


class _TimedStatelessSourcePartition(_TimedPolls, StatelessSourcePartition):
    pass


class _TimedFixedSource(FixedPartitionedSource):
    def __init__(self, clock: StepClock, step: str, inner: FixedPartitionedSource):
        self._clock, self._step, self._inner = clock, step, inner

    def list_parts(self):
        return self._inner.list_parts()

    def build_part(self, step_id, for_part, resume_state):
        return _TimedSourcePartition(self._clock, self._step, self._inner.build_part(step_id, for_part, resume_state))


class _TimedDynamicSource(DynamicSource):
    def __init__(self, clock: StepClock, step: str, inner: DynamicSource):
        self._clock, self._step, self._inner = clock, step, inner

    def build(self, step_id, worker_index, worker_count):
        return _TimedStatelessSourcePartition(self._clock, self._step,
                                              self._inner.build(step_id, worker_index, worker_count))


class _TimedWrites:
    def __init__(self, clock: StepClock, step: str, inner):
        self._clock, self._step, self._inner = clock, step, inner

    def write_batch(self, items):
        return self._clock.call(self._step, self._inner.write_batch, items)

    def close(self):
        return self._clock.call(f"{self._step}.close", self._inner.close)


class _TimedSinkPartition(_TimedWrites, StatelessSinkPartition):
    pass


class _TimedStatefulSinkPartition(_TimedWrites, StatefulSinkPartition):
    def snapshot(self):
        return self._clock.call(f"{self._step}.snapshot", self._inner.snapshot)


class _TimedDynamicSink(DynamicSink):
    def __init__(self, clock: StepClock, step: str, inner: DynamicSink):
        self._clock, self._step, self._inner = clock, step, inner

    def build(self, step_id, worker_index, worker_count):
        return _TimedSinkPartition(self._clock, self._step, self._inner.build(step_id, worker_index, worker_count))


class _TimedFixedSink(FixedPartitionedSink):
    def __init__(self, clock: StepClock, step: str, inner: FixedPartitionedSink):
        self._clock, self._step, self._inner = clock, step, inner

    def list_parts(self):
        return self._inner.list_parts()

    def part_fn(self, item_key):
        return self._inner.part_fn(item_key)

    def build_part(self, step_id, for_part, resume_state):
        return _TimedStatefulSinkPartition(self._clock, self._step,
                                           self._inner.build_part(step_id, for_part, resume_state))


def step_name(flow_id: str, step_id: str) -> str:
    """``gatewatch_ingest.late_dlq.flat_map_batch`` -> ``late_dlq``: the step as the flow names it."""
    name = step_id.removeprefix(f"{flow_id}.")
    return name.removesuffix(".flat_map_batch").removesuffix(".stateful_batch")


def _timed_mapper(clock: StepClock, step: str, mapper: Callable) -> Callable:
    def timed(items):
        return clock.call(step, mapper, items)
    return timed


def _timed_builder(clock: StepClock, step: str, builder: Callable) -> Callable:
    def build(resume_state):
        return _TimedLogic(clock, step, builder(resume_state))
    return build


def _wrapped(clock: StepClock, step: str, core) -> dict[str, Any]:
    """The replaced fields of one core operator (none for those that run no Python of ours)."""
    kind = type(core).__name__
    if kind == "flat_map_batch":
        return {"mapper": _timed_mapper(clock, step, core.mapper)}
    if kind == "stateful_batch":
        return {"builder": _timed_builder(clock, step, core.builder)}
    if kind == "input":
        timed = _TimedFixedSource if isinstance(core.source, FixedPartitionedSource) else _TimedDynamicSource
        return {"source": timed(clock, step, core.source)}
    if kind == "output":
        timed = _TimedFixedSink if isinstance(core.sink, FixedPartitionedSink) else _TimedDynamicSink
        return {"sink": timed(clock, step, core.sink)}
    return {}


def _timed_substeps(clock: StepClock, flow_id: str, steps: list) -> None:
    for index, step in enumerate(steps):
        if step.substeps:
            _timed_substeps(clock, flow_id, step.substeps)
            continue
        replaced = _wrapped(clock, step_name(flow_id, step.step_id), step)
        if replaced:
            steps[index] = dataclasses.replace(step, **replaced)


def timed_steps(flow: Dataflow, clock: StepClock | None = None) -> StepClock:
    """Wrap every core step of ``flow`` in place (before it runs) to charge its CPU to ``clock``,
    which also collects the GC's CPU; returns the clock."""
    clock = clock or PROCESS_CLOCK
    _timed_substeps(clock, flow.flow_id, flow.substeps)
    if clock.on_gc not in gc.callbacks:
        gc.callbacks.append(clock.on_gc)
    return clock


PROCESS_CLOCK = StepClock()
"""The clock of the flow a process runs (a flow is built once per process)."""
