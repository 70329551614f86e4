"""The native-protocol path (clickhouse-driver) against a real ClickHouse server: Debian's
18.16 here (legacy migrations), a modern one when GATEWATCH_TEST_CLICKHOUSE_URL is set."""

import random
import uuid

import pytest

from ops.dev.loadgen import make_event
from ops.settings import PricingSettings
from schemas.pricing import with_cost
from sinks.clickhouse import ClickHouse

pytestmark = pytest.mark.integration
PRICING = PricingSettings()


def events(count, seed=3):
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        event, _pii = make_event(rng, 1_795_000_000_000, 20, 0.0)
        rows.append(with_cost({**event, "classification": "internal", "pii_entity_counts": {"EMAIL_ADDRESS": 1},
                               "source_partition": 0, "source_offset": 1}, PRICING))
    return rows


def test_migrations_inserts_and_daily_metrics_over_the_wire(clickhouse_url):
    clickhouse = ClickHouse(clickhouse_url, f"wire_{uuid.uuid4().hex[:8]}")
    applied = clickhouse.migrate()
    assert applied == ["001_events", "002_daily_metrics", "010_views", "011_audit_log", "030_access_audit",
                       "040_feedback", "070_events_reasoning_trace"]
    assert clickhouse.migrate() == []
    assert clickhouse.apply_retention(7, 90) == []  # 18.16 has no TTLs to keep to the settings
    batch = events(500)
    clickhouse.insert_events(batch)
    clickhouse.insert_events(batch[:200])  # a retried batch must not count twice
    (rows, tokens), = clickhouse.rows(
        f"SELECT count(), sum(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens) "
        f"FROM {clickhouse.database}.events FINAL")
    want = sum(e["input_tokens"] + e["output_tokens"] + e["cache_read_tokens"] + e["cache_write_tokens"] for e in batch)
    assert (rows, tokens) == (500, want)
    by_model = dict(clickhouse.rows(f"SELECT model, sum(requests) FROM {clickhouse.database}.daily_metrics GROUP BY model"))
    assert sum(by_model.values()) == 500
    assert by_model == {m: sum(1 for e in batch if e["model"] == m) for m in by_model}
    assert clickhouse.events_without_audit() == 0
    (cost,), = clickhouse.rows(f"SELECT sum(cost_usd) FROM {clickhouse.database}.daily_metrics")
    assert cost == sum(e["cost_usd"] for e in batch)
