"""Fault injection: the ingest flow is SIGKILLed at random points while events (with
duplicates, malformed and late ones) are produced, and resumed from Bytewax recovery each
time. Every store must still hold exactly the totals computed from the produced events."""

from collections import Counter

import pytest

from ops.dev import demo
from sinks.clickhouse import ClickHouse, close_chdb

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture(scope="module")
def chaos_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos")
    found, problems, expected = demo.run(demo.DemoOptions(
        events=3000, chaos=3, seed=23, users=60, late_ratio=0.02, data_dir=str(root), keep_events=True))
    return found, problems, expected, root


def test_every_counter_reconciles_after_three_kills(chaos_run):
    found, problems, expected, _root = chaos_run
    assert problems == []
    assert found["chaos_kills"] == 3
    assert found["quota_total_tokens"] == expected.tokens  # late events included
    assert found["billing_total_usd"] == found["expected_total_usd"]
    assert expected.late > 0 and expected.duplicates > 0 and expected.bad > 0


def test_clickhouse_daily_metrics_match_the_produced_events(chaos_run):
    _found, _problems, expected, root = chaos_run
    want_requests = Counter()
    want_tokens = Counter()
    for event in expected.events.values():
        key = event["model"]
        want_requests[key] += 1
        want_tokens[key] += sum(event[f"{k}_tokens"] for k in ("input", "output", "cache_read", "cache_write"))
    clickhouse = ClickHouse(f"chdb://{root / 'chdb'}")
    try:
        rows = clickhouse.rows("SELECT model, sum(requests), sum(total_tokens) FROM gatewatch.daily_metrics GROUP BY model")
    finally:
        close_chdb()
    assert {m: (int(r), int(t)) for m, r, t in rows} == {m: (want_requests[m], want_tokens[m]) for m in want_requests}
