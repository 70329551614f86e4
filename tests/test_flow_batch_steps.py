"""The flow's batch-level plumbing (dataflows/outputs.py) routes and keys exactly like the
per-item Bytewax operators it replaces, and a flow process settles its heap before the drain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflows.outputs import keyed, split_routed, unkeyed

ROOT = Path(__file__).resolve().parent.parent


def test_split_routed_and_keyed_keep_every_item_on_its_side():
    routed = [("ok", {"n": n}) if n % 3 else ("dlq", {"n": n}) for n in range(50)]
    flow = Dataflow("batch_steps")
    ok, others = split_routed("route", op.input("in", flow, TestingSource(routed, batch_size=7)), "ok")
    by_parity = keyed("parity", ok, lambda item: "even" if item["n"] % 2 == 0 else "odd")
    counted = op.stateful_map("count", by_parity, lambda count, item: ((count or 0) + 1, item["n"]))
    got_ok, got_others, got_counted = [], [], []
    op.output("ok_out", ok, TestingSink(got_ok))
    op.output("others_out", others, TestingSink(got_others))
    op.output("counted_out", op.flat_map_batch("unkey", counted, unkeyed), TestingSink(got_counted))
    run_main(flow)

    assert [item["n"] for item in got_ok] == [n for n in range(50) if n % 3]
    assert [item["n"] for item in got_others] == [n for n in range(50) if n % 3 == 0]
    assert sorted(got_counted) == sorted(n for n in range(50) if n % 3)


def test_a_flow_process_settles_its_heap_before_the_drain():
    probe = ("import gc, sys\n"
             "assert 'pandas' not in sys.modules\n"
             "from ops.launch import settle_heap, YOUNG_GENERATION\n"
             "settle_heap()\n"
             "assert 'pandas' in sys.modules, 'the first Parquet table would import pandas mid-drain'\n"
             "assert gc.get_threshold()[0] == YOUNG_GENERATION, gc.get_threshold()\n"
             "assert gc.get_freeze_count() == 0, 'frozen objects are never collected at exit'\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_redaction_metrics_are_counted_once_per_batch_with_the_per_event_totals():
    from collections import Counter

    from prometheus_client import REGISTRY

    import ops.metrics  # noqa: F401 - installs the Prometheus backend of the metrics hook
    from dataflows.ingest import redact_batch
    from redaction import Redactor
    from tests.test_codec import event

    def counts(metric: str, label: str, values) -> dict:
        return {v: REGISTRY.get_sample_value(f"{metric}_total", {label: v}) or 0 for v in values}

    events = [event(event_id=f"3b8f2c1e-0000-4000-8000-{n:012d}", prompt=text)
              for n, text in enumerate(["write to ana@example.com", "call +1 415 555 0100 or bob@example.org",
                                        "nothing personal here"] * 4)]
    redacted = [result for kind, result in redact_batch(Redactor(), events[:3]) if kind == "ok"]  # warms up
    entities = Counter()
    for result in redacted:
        entities.update(result["pii_entity_counts"])
    flags = Counter(flag for result in redacted for flag in result["policy_flags"])
    levels = Counter(result["classification"] for result in redacted)
    assert entities and flags and levels, "the sample must exercise every counter"

    before = (counts("gatewatch_pii_entities", "entity", entities), counts("gatewatch_policy_flags", "flag", flags),
              counts("gatewatch_classifications", "level", levels))
    assert len(redact_batch(Redactor(), events)) == 12  # the same three events four times
    after = (counts("gatewatch_pii_entities", "entity", entities), counts("gatewatch_policy_flags", "flag", flags),
             counts("gatewatch_classifications", "level", levels))
    for old, new, expected in zip(before, after, (entities, flags, levels)):
        assert {key: new[key] - old[key] for key in expected} == {key: 4 * n for key, n in expected.items()}
