"""The per-model daily rollup (migration 060) in chdb: the same totals as the daily
aggregates it rolls up, exactly once under duplicates and late events, backfilled for an
existing deployment, and what `status --usage` and the month bases read."""

import uuid
from collections import Counter
from datetime import datetime, timezone

import pytest

from ops.status import usage_lines
from sinks.clickhouse import ClickHouse, close_chdb, month_usage_before, refresh_aggregates
from tests.test_aggregates import HOUR_MS, earlier_migrations, events

TOKENS = "sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens)"


@pytest.fixture
def clickhouse(tmp_path):
    client = ClickHouse(f"chdb://{tmp_path / 'chdb'}", f"md_{uuid.uuid4().hex[:8]}")
    assert "060_model_daily" in client.migrate()
    yield client
    close_chdb()


def by_model_day(client, table: str) -> list[tuple]:
    users = "uniqExact(user_id)" if table == "usage_daily" else "sum(users)"
    return sorted(client.rows(
        f"SELECT day, org_id, model, {users}, sum(requests), sum(errors), {TOKENS}, sum(cost_usd), "
        f"quantilesTDigestMerge(0.5, 0.95, 0.99)(latency_quantiles) FROM {client.database}.{table} FINAL "
        "GROUP BY day, org_id, model"))


def from_events(rows: list[dict]) -> Counter:
    return Counter({(datetime.fromtimestamp(e["event_time"] / 1000, tz=timezone.utc).date(), e["org_id"], e["model"]): 0
                    for e in rows}) + Counter(
        (datetime.fromtimestamp(e["event_time"] / 1000, tz=timezone.utc).date(), e["org_id"], e["model"]) for e in rows)


def test_the_rollup_holds_the_daily_totals_once_whatever_the_duplicates_and_late_events(clickhouse):
    rows = events(900, hours=72)
    clickhouse.insert_events(rows)
    clickhouse.insert_events(rows[:300])  # a retried batch
    refresh_aggregates(clickhouse)
    assert by_model_day(clickhouse, "usage_model_daily") == by_model_day(clickhouse, "usage_daily")
    requests = {(day, org, model): n for day, org, model, n in clickhouse.rows(
        f"SELECT day, org_id, model, sum(requests) FROM {clickhouse.database}.usage_model_daily FINAL "
        "GROUP BY day, org_id, model")}
    assert requests == dict(from_events(rows))
    # A late event three days back re-rolls that org's day, and only adds itself.
    late = {**rows[0], "event_id": "late-md", "event_time": rows[0]["event_time"] - 72 * HOUR_MS}
    clickhouse.insert_events([late])
    refresh_aggregates(clickhouse)
    refresh_aggregates(clickhouse)
    assert by_model_day(clickhouse, "usage_model_daily") == by_model_day(clickhouse, "usage_daily")
    (total,), = clickhouse.rows(f"SELECT sum(requests) FROM {clickhouse.database}.usage_model_daily FINAL")
    assert total == 901


def test_an_existing_deployment_gets_its_rollup_on_migration(tmp_path, monkeypatch):
    import sinks.clickhouse as module
    # with the 070s: today's refresh needs them
    before = earlier_migrations(tmp_path, lambda stem: stem not in ("060_model_daily", "090_model_monthly"))
    client = ClickHouse(f"chdb://{tmp_path / 'chdb'}", "existing_md")
    try:
        monkeypatch.setattr(module, "MIGRATIONS_DIR", before)
        monkeypatch.setattr(module, "recompute_model_days", lambda *a: None)  # the code before 060
        monkeypatch.setattr(module, "recompute_model_months", lambda *a: None)
        client.migrate()
        client.insert_events(events(400, hours=24 * 5))
        refresh_aggregates(client)
        monkeypatch.undo()
        assert client.migrate() == ["060_model_daily", "090_model_monthly"]
        assert by_model_day(client, "usage_model_daily") == by_model_day(client, "usage_daily") != []
    finally:
        close_chdb()


def test_status_names_the_top_models_of_the_month_from_the_rollup(clickhouse):
    rows = events(300, hours=2)
    clickhouse.insert_events(rows)
    refresh_aggregates(clickhouse)
    per_model = Counter(e["model"] for e in rows)
    count = max(per_model.values())
    text = "\n".join(usage_lines(clickhouse, rows[0]["event_time"] / 1000))
    assert any(f"top models this month {model} {count:,} req" in text  # any of a tie may come first
               for model, n in per_model.items() if n == count), text


def test_month_usage_before_sums_the_days_before_the_cutoff(clickhouse):
    rows = events(600, hours=24 * 6)
    clickhouse.insert_events(rows)
    refresh_aggregates(clickhouse)
    newest = max(e["event_time"] for e in rows) // 1000
    cutoff = datetime.fromtimestamp(newest - 2 * 86400, tz=timezone.utc)
    month = f"{cutoff:%Y%m}"
    kept = [e for e in rows if f"{datetime.fromtimestamp(e['event_time'] / 1000, tz=timezone.utc):%Y%m}" == month
            and datetime.fromtimestamp(e["event_time"] / 1000, tz=timezone.utc).date() < cutoff.date()]
    users = sorted({(e["org_id"], e["user_id"]) for e in rows})
    got = month_usage_before(clickhouse, users, month, f"{cutoff:%Y%m%d}")
    want: dict = {}
    for e in kept:
        totals = want.setdefault((e["org_id"], e["user_id"]), Counter())
        totals.update(requests=1, input=e["input_tokens"], output=e["output_tokens"],
                      cache_read=e["cache_read_tokens"], cache_write=e["cache_write_tokens"])
    assert {user: dict(t) for user, t in got.items() if any(t.values())} == \
        {user: {k: t[k] for k in ("requests", "input", "output", "cache_read", "cache_write")} for user, t in want.items()}
    assert month_usage_before(clickhouse, [], month, f"{cutoff:%Y%m%d}") == {}


@pytest.mark.integration
def test_a_pre_21_server_skips_the_aggregates_and_says_so(clickhouse_url, caplog):
    server = ClickHouse(clickhouse_url, f"legacy_{uuid.uuid4().hex[:8]}")
    if not server.legacy:
        pytest.skip("GATEWATCH_TEST_CLICKHOUSE_URL points at a modern server: it runs the aggregates")
    with caplog.at_level("WARNING", logger="sinks.clickhouse"):
        assert "060_model_daily" not in server.migrate()
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert any(m.startswith("migration 060_model_daily skipped") and "ClickHouse 21" in m for m in skipped), skipped
