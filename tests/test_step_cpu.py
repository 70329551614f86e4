"""dataflows.step_cpu: every step of a flow that runs Python of ours reports its CPU, calls and
items from inside a real Bytewax run (structure, not speed)."""

from __future__ import annotations

import time

import pytest

import bytewax.operators as op
from bytewax.connectors.files import FileSink
from bytewax.dataflow import Dataflow
from bytewax.inputs import DynamicSource, StatelessSourcePartition
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflows.step_cpu import StepClock, step_name, timed_steps
from ops.metrics import counter_totals
from sinks.base import Batcher, WriterSink


class Count(op.StatefulBatchLogic):
    def __init__(self, resume):
        self.count = resume or 0

    def on_batch(self, values):
        self.count += len(values)
        return [self.count], self.RETAIN

    def snapshot(self):
        return self.count


def test_every_python_step_reports_its_cpu_calls_and_items():
    flow = Dataflow("timed")
    numbers = op.input("numbers", flow, TestingSource(list(range(1000)), batch_size=100))
    doubled = op.flat_map_batch("double", numbers, lambda batch: [n * 2 for n in batch])
    squared = op.map("square", doubled, lambda n: n * n)  # a composite: its core flat_map_batch is timed
    counts = op.stateful_batch("count", op.key_on("by_parity", squared, lambda n: str(n % 4)), Count)
    seen: list = []
    op.output("collected", counts, TestingSink(seen))
    written: list = []
    batches = op.stateful("batches", op.key_on("one_key", doubled, lambda _n: "k"),
                          lambda resume: Batcher(250, 60, resume))
    op.output("written", batches, WriterSink(lambda: written.extend))
    clock = StepClock(report_every_s=0)
    timed_steps(flow, clock)
    before = counter_totals()

    run_main(flow)

    assert seen and len(written) == 4 and sum(len(rows) for _key, rows in written) == 1000  # the flow still does its work
    steps = clock.totals
    assert steps["numbers"][2] == 1000 and steps["numbers"][1] >= 10  # items returned by the source
    assert steps["double"][1:3] == [10, 1000]  # ten batches of 100
    assert steps["square"][2] == 1000
    # keyed: one on_batch per key present in a batch (n*n % 4 is 0 for even n: one key)
    assert steps["count"][2] == 1000 and steps["count"][1] == 10
    assert steps["collected"][2] == len(seen)
    assert steps["written"][2] == 4
    assert all(cpu >= 0 and wall >= 0 for cpu, _calls, _items, wall in steps.values())
    assert sum(cpu for cpu, _calls, _items, _wall in steps.values()) > 0
    assert clock.worker_cpu_s >= steps["double"][0]
    # Reported to Prometheus as it goes (report_every_s=0: after every call).
    after = counter_totals()
    assert after["gatewatch_step_items_total{step=double}"] - before.get("gatewatch_step_items_total{step=double}", 0) \
        == 1000
    assert after["gatewatch_step_calls_total{step=count}"] - before.get("gatewatch_step_calls_total{step=count}", 0) \
        == 10
    assert after["gatewatch_worker_cpu_seconds_total"] > before.get("gatewatch_worker_cpu_seconds_total", 0)


def test_a_steps_wall_time_holds_its_waits():
    """A sink waiting on its server holds the worker without using CPU: only wall time shows it."""
    flow = Dataflow("waits")
    numbers = op.input("numbers", flow, TestingSource(list(range(100)), batch_size=10))
    op.output("waiting", numbers, WriterSink(lambda: lambda batch: time.sleep(0.02)))
    clock = StepClock(report_every_s=0)
    timed_steps(flow, clock)
    before = counter_totals()

    run_main(flow)

    cpu, calls, _items, wall = clock.totals["waiting"]
    assert calls == 10 and wall >= 0.2 and cpu < wall / 2
    reported = counter_totals()["gatewatch_step_wall_seconds_total{step=waiting}"] \
        - before.get("gatewatch_step_wall_seconds_total{step=waiting}", 0)
    assert reported == pytest.approx(wall)


def test_step_names_drop_the_flow_and_the_core_operator():
    assert step_name("gatewatch_ingest", "gatewatch_ingest.decode") == "decode"
    assert step_name("gatewatch_ingest", "gatewatch_ingest.late_dlq.flat_map_batch") == "late_dlq"
    assert step_name("gatewatch_ingest", "gatewatch_ingest.windows") == "windows"


class Countdown(DynamicSource):
    """A source without partitions to resume: each worker counts down from 300 in batches of 100."""

    def build(self, step_id, worker_index, worker_count):
        return CountdownPartition()


class CountdownPartition(StatelessSourcePartition):
    def __init__(self):
        self.left = 300

    def next_batch(self):
        if self.left <= 0:
            raise StopIteration()
        self.left -= 100
        return list(range(100))


def test_a_dynamic_source_and_a_partitioned_sink_are_timed_too(tmp_path):
    flow = Dataflow("timed_other_kinds")
    numbers = op.input("numbers", flow, Countdown())
    lines = op.map("as_line", numbers, lambda n: ("0", str(n)))  # FileSink routes (key, line) items
    op.output("file", lines, FileSink(tmp_path / "out.txt"))
    clock = StepClock(report_every_s=0)
    timed_steps(flow, clock)

    run_main(flow)

    assert len((tmp_path / "out.txt").read_text().splitlines()) == 300
    assert clock.totals["numbers"][2] == 300 and clock.totals["file"][2] == 300
