"""`gatewatch bench history` at a tiny size: the real window, quota, ClickHouse and Parquet
code over simulated days, with the stores checked against the generated events."""

import json

import pytest

from ops.bench import history
from sinks.clickhouse import ClickHouse, close_chdb
from sinks.quota import QuotaStore

pytestmark = pytest.mark.integration
JAN_11 = 1_894_320_000_000  # 2030-01-11T00:00Z, the second simulated day


def event_tokens(event: dict) -> int:
    return sum(event[f"{kind}_tokens"] for kind in ("input", "output", "cache_read", "cache_write"))


def test_two_simulated_days_keep_every_token_once_and_expire_what_they_outgrew(tmp_path, monkeypatch):
    kept: dict = {}
    real_run = history.run_history

    def remembering(*args):
        kept["events"] = []
        real_day_events = history.day_events

        def spy(*a):
            arrivals = real_day_events(*a)
            kept["events"].extend(event for _at, event in arrivals)
            kept["last_day_users"] = {(e["org_id"], e["user_id"]) for _at, e in arrivals}
            return arrivals
        monkeypatch.setattr(history, "day_events", spy)
        return real_run(*args)

    monkeypatch.setattr(history, "run_history", remembering)
    month_after_restate: dict = {}
    real_restate = history.restate_month_bases

    def restate_then_read(store, *a, **k):
        written = real_restate(store, *a, **k)
        month_after_restate.clear()
        month_after_restate.update({user: store.usage("user", "/".join(user), JAN_11)["month"].get("tokens", 0)
                                    for user in kept["last_day_users"]})
        return written
    monkeypatch.setattr(history, "restate_month_bases", restate_then_read)
    stopped_redis: list = []
    real_start = history.start_redis

    def keep_redis(*a, **k):
        server = real_start(*a, **k)
        real_stop = server.stop

        def stop():
            store = QuotaStore(server.address, month_bases=True)
            stopped_redis.append(len(list(store.redis.scan_iter(match="gw:usage:*:d:20300110"))))
            stopped_redis.append(len(list(store.redis.scan_iter(match="gw:usage:*:d:20300111"))) > 0)
            stopped_redis.append({key.decode().split(":")[3] for key in store.redis.scan_iter(match="gw:usage:user:*:m:*")})
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
    # What each question is planned to read is reported next to its latency.
    for reads in report["query_reads_by_day"]:
        assert set(reads) == {"org_day", "user_month", "top_models_month"}
        assert all(parts >= 1 and marks >= 1 and rows >= 1 for parts, rows, marks in reads.values()), reads
    assert report["clickhouse_rows_by_table"]["events"] == [500, 1000]
    assert report["projection"]["redis_bytes_per_daily_active_user"] > 0
    assert report["quota_month_mismatches_by_day"] == [0, 0]
    assert report["month_active_users_by_day"][0] <= report["month_active_users_by_day"][1] <= 300

    events = kept["events"]
    tokens = sum(event_tokens(e) for e in events)
    # Late events included, each once: once the bases are restated, every user active on the
    # last day has its whole month (base from the aggregates + day counters); day 1's counters
    # expired with their day, and month bases are left only for the users of the last day.
    month_tokens = {user: sum(event_tokens(e) for e in events if (e["org_id"], e["user_id"]) == user)
                    for user in kept["last_day_users"]}
    arrived_day_2 = {user: sum(event_tokens(e) for e in events[500:] if (e["org_id"], e["user_id"]) == user)
                     for user in kept["last_day_users"]}
    assert any(month_tokens[user] > arrived_day_2[user] for user in month_tokens)  # the bases hold day 1
    assert month_after_restate == month_tokens
    assert stopped_redis[:2] == [0, True]
    assert stopped_redis[2] <= {"/".join(user) for user in kept["last_day_users"]}
    clickhouse = ClickHouse(f"chdb://{tmp_path / 'chdb'}", "history")
    try:
        (requests, aggregated), = clickhouse.rows(
            "SELECT sum(requests), sum(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens) "
            "FROM history.usage_daily FINAL")
    finally:
        close_chdb()
    assert (requests, aggregated) == (1000, tokens)
