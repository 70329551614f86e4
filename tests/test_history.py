"""`gatewatch bench history` at a tiny size: the real window, quota, ClickHouse and Parquet
code over simulated days, with the stores checked against the generated events."""

import json

import pytest

from ops.bench import history
from sinks.clickhouse import ClickHouse, close_chdb
from sinks.quota import QuotaStore

pytestmark = pytest.mark.integration


def test_two_simulated_days_keep_every_token_once_and_expire_what_they_outgrew(tmp_path, monkeypatch):
    kept: dict = {}
    real_run = history.run_history

    def remembering(*args):
        kept["events"] = []
        real_day_events = history.day_events

        def spy(*a):
            arrivals = real_day_events(*a)
            kept["events"].extend(event for _at, event in arrivals)
            return arrivals
        monkeypatch.setattr(history, "day_events", spy)
        return real_run(*args)

    monkeypatch.setattr(history, "run_history", remembering)
    stopped_redis: list = []
    real_start = history.start_redis

    def keep_redis(*a, **k):
        server = real_start(*a, **k)
        real_stop = server.stop

        def stop():
            store = QuotaStore(server.address)
            stopped_redis.append(store.total_tokens("user"))
            stopped_redis.append(len(list(store.redis.scan_iter(match="gw:usage:*:d:20300110"))))
            stopped_redis.append(len(list(store.redis.scan_iter(match="gw:usage:*:d:20300111"))) > 0)
            real_stop()
        server.stop = stop
        return server
    monkeypatch.setattr(history, "start_redis", keep_redis)

    from click.testing import CliRunner
    result = CliRunner().invoke(history.history, ["--days", "2", "--users", "300", "--events-per-day", "500",
                                                  "--late-ratio", "0.05", "--start", "2030-01-10",
                                                  "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["days"] == 2 and report["events"] == 1000
    assert len(report["redis_bytes_by_day"]) == len(report["query_ms_by_day"]) == 2
    assert report["clickhouse_rows_by_table"]["events"] == [500, 1000]
    assert report["projection"]["redis_bytes_per_month_active_user"] > 0
    assert report["month_active_users_by_day"][0] <= report["month_active_users_by_day"][1] <= 300

    events = kept["events"]
    tokens = sum(e[f"{k}_tokens"] for e in events for k in ("input", "output", "cache_read", "cache_write"))
    # Late events included, each once: the month counter (alive: one month) holds every token,
    # while day 1's counters expired with their day.
    assert stopped_redis == [tokens, 0, True]
    clickhouse = ClickHouse(f"chdb://{tmp_path / 'chdb'}", "history")
    try:
        (requests, aggregated), = clickhouse.rows(
            "SELECT sum(requests), sum(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens) "
            "FROM history.usage_daily FINAL")
    finally:
        close_chdb()
    assert (requests, aggregated) == (1000, tokens)
