"""The per-model monthly rollup (migration 090) in chdb: the sum of the daily rollup's rows of
each org month, exactly once under duplicates, a retry, a crash and a replay, across a month
boundary; rolled up again without an erased user; backfilled for an existing deployment; and
what the history bench's and `status --usage`'s month-wide per-model questions read."""

import uuid
from collections import Counter
from datetime import datetime, timezone

import pytest

from ops.bench.history import dashboard_queries
from ops.privacy import gdpr
from sinks.clickhouse import ClickHouse, close_chdb, refresh_aggregates
from tests.test_aggregates import HOUR_MS, earlier_migrations, events

TOTALS = ("sum(requests), sum(errors), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), "
          "sum(cache_write_tokens), sum(cost_usd), sum(latency_ms_sum), "
          "quantilesTDigestMerge(0.5, 0.95, 0.99)(latency_quantiles)")


def next_month_start_ms() -> int:
    """Midnight UTC of the next month's first day: events around it fall in two months and stay
    within the raw retention whatever today is (the refresh skips hours older than it)."""
    now = datetime.now(timezone.utc)
    first = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=timezone.utc)
    return int(first.timestamp() * 1000)


def across_two_months(count: int, seed: int = 5) -> list[dict]:
    return events(count, seed=seed, now_ms=next_month_start_ms() + 36 * HOUR_MS, hours=72)


@pytest.fixture
def clickhouse(tmp_path):
    client = ClickHouse(f"chdb://{tmp_path / 'chdb'}", f"mm_{uuid.uuid4().hex[:8]}")
    assert "090_model_monthly" in client.migrate()
    yield client
    close_chdb()


def monthly(client) -> list[tuple]:
    return sorted(client.rows(f"SELECT month, org_id, model, {TOTALS} FROM {client.database}.usage_model_monthly "
                              "FINAL GROUP BY month, org_id, model"))


def summed_days(client) -> list[tuple]:
    return sorted(client.rows(f"SELECT toStartOfMonth(day) AS month, org_id, model, {TOTALS} "
                              f"FROM {client.database}.usage_model_daily FINAL GROUP BY month, org_id, model"))


def requests_by_month(client) -> Counter:
    return Counter({(month, org, model): int(n) for month, org, model, n in client.rows(
        f"SELECT month, org_id, model, sum(requests) FROM {client.database}.usage_model_monthly FINAL "
        "GROUP BY month, org_id, model")})


def expected_requests(rows: list[dict]) -> Counter:
    return Counter((datetime.fromtimestamp(e["event_time"] / 1000, tz=timezone.utc).date().replace(day=1),
                    e["org_id"], e["model"]) for e in rows)


def test_the_month_is_the_sum_of_its_days_after_duplicates_a_retry_a_crash_and_a_replay(clickhouse, monkeypatch):
    import sinks.clickhouse as module

    rows = across_two_months(900)
    clickhouse.insert_events(rows)
    clickhouse.insert_events(rows[:300])  # a retried batch
    refresh_aggregates(clickhouse)
    assert monthly(clickhouse) == summed_days(clickhouse)
    assert requests_by_month(clickhouse) == expected_requests(rows)
    assert len({month for month, _org, _model in expected_requests(rows)}) == 2
    # A crash after the days were rolled up, before their months: the next refresh catches up.
    late = {**rows[0], "event_id": "late-mm", "event_time": min(e["event_time"] for e in rows) - 1}

    def crash(*_args):
        raise RuntimeError("killed between the daily and the monthly rollup")
    monkeypatch.setattr(module, "recompute_model_months", crash)
    clickhouse.insert_events([late])
    with pytest.raises(RuntimeError):
        refresh_aggregates(clickhouse)
    monkeypatch.undo()
    assert requests_by_month(clickhouse) == expected_requests(rows)  # the month still lacks the late event
    refresh_aggregates(clickhouse)
    refresh_aggregates(clickhouse)
    assert monthly(clickhouse) == summed_days(clickhouse)
    assert requests_by_month(clickhouse) == expected_requests([*rows, late])
    # A replay of everything changes nothing.
    before = monthly(clickhouse)
    clickhouse.insert_events([*rows, late])
    refresh_aggregates(clickhouse)
    assert monthly(clickhouse) == before
    (versions, keys), = clickhouse.rows(f"SELECT count(), uniqExact(month, org_id, model) "
                                        f"FROM {clickhouse.database}.usage_model_monthly")
    assert versions > keys  # replaced rows, not added ones, kept the totals


def test_forgetting_a_user_rolls_its_months_up_again_without_it(clickhouse):
    rows = across_two_months(500, seed=11)
    org, user = Counter((r["org_id"], r["user_id"]) for r in rows).most_common(1)[0][0]
    # A model only the forgotten user used: its monthly row must go, not keep the user's usage.
    only_theirs = [{**r, "event_id": f"solo-{n}", "model": "solo-model"}
                   for n, r in enumerate(r for r in rows if (r["org_id"], r["user_id"]) == (org, user))]
    clickhouse.insert_events([*rows, *only_theirs])
    refresh_aggregates(clickhouse)
    assert any(model == "solo-model" for _month, _org, model in requests_by_month(clickhouse))
    gdpr.forget_clickhouse(clickhouse, gdpr.Subject(user, org))
    others = [r for r in rows if (r["org_id"], r["user_id"]) != (org, user)]
    assert +requests_by_month(clickhouse) == expected_requests(others)
    assert monthly(clickhouse) == summed_days(clickhouse)


def test_an_existing_deployment_gets_its_monthly_rollup_on_migration(tmp_path, monkeypatch):
    import sinks.clickhouse as module
    before = earlier_migrations(tmp_path, lambda stem: stem != "090_model_monthly")
    client = ClickHouse(f"chdb://{tmp_path / 'chdb'}", "existing_mm")
    try:
        monkeypatch.setattr(module, "MIGRATIONS_DIR", before)
        monkeypatch.setattr(module, "recompute_model_months", lambda *a: None)  # the code before 090
        client.migrate()
        rows = across_two_months(400)
        client.insert_events(rows)
        refresh_aggregates(client)
        monkeypatch.undo()
        assert client.migrate() == ["090_model_monthly"]
        assert monthly(client) == summed_days(client) != []
        assert requests_by_month(client) == expected_requests(rows)
    finally:
        close_chdb()


def test_the_bench_reads_the_top_models_of_the_month_from_the_monthly_rollup(clickhouse):
    rows = across_two_months(600)
    clickhouse.insert_events(rows)
    refresh_aggregates(clickhouse)
    clickhouse.insert_events(across_two_months(200, seed=6))  # a second version of every month's rows
    refresh_aggregates(clickhouse)
    last_day_s = max(e["event_time"] for e in rows) // 1000
    query = dashboard_queries(clickhouse.database, last_day_s, rows[0]["org_id"], rows[0]["user_id"])
    assert "usage_model_monthly" in query["top_models_month"]
    month_to_date = clickhouse.rows(
        f"SELECT model, sum(requests) AS n, sum(cost_usd) FROM {clickhouse.database}.usage_model_daily FINAL "
        f"WHERE day >= toStartOfMonth(toDate(toDateTime({last_day_s}, 'UTC'))) GROUP BY model ORDER BY n DESC LIMIT 5")
    assert sorted(clickhouse.rows(query["top_models_month"])) == sorted(month_to_date) != []
