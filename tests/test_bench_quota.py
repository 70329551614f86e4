"""`gatewatch bench quota`: its figures exist, and the counters it wrote add up. Never timings."""

import json

import pytest
import redis

from ops.bench.quota import next_flush, window_totals
from sinks.quota import window_key
from tests.processes import run_cli

BENCH_DB = 14  # a database of the session's Redis no other test uses: flushed here


def bench_report(*args: str) -> tuple[dict, str]:
    result = run_cli("bench", "quota", *args, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


def test_window_totals_never_share_a_window_record_even_past_the_users():
    totals = window_totals(1_200, 100, 1_700_000_040_000)
    assert len({window_key(total) for total in totals}) == 1_200
    assert len({total["user_id"] for total in totals}) == 100
    assert {total["org_id"] for total in totals} == {f"org-{org:02d}" for org in range(7)}
    grown = next_flush(totals)
    assert [window_key(t) for t in grown] == [window_key(t) for t in totals]
    assert all(g["n"] == t["n"] + 1 and g["input"] > t["input"] for g, t in zip(grown, totals))


@pytest.mark.integration
def test_bench_quota_on_its_own_redis_reports_python_and_redis_cpu():
    report, stderr = bench_report("--totals", "300", "--users", "300", "--batch", "100", "--no-month-bases")
    assert report["month_bases"] is False and report["redis_cpu_measured"] is True
    assert report["bases_written"] == 0 and "bases" not in report["new_window"]
    for figures in (report, report["first_of_day"], report["new_window"], report["next_flush"]):
        for key in ("python_us_per_total", "redis_us_per_total", "totals_per_s"):
            assert figures[key] > 0, key
    for name in ("first_of_day", "new_window", "next_flush"):
        assert report[name]["changed"] == report[name]["totals"] == 300, name
    for rate in ("1000", "5000"):
        projected = report["projection"][rate]
        assert projected["python_cores"] > 0 and projected["redis_cores"] > 0
        assert projected["window_records"] == int(rate) * report["window_record_life_s"] > 0
    assert report["redis_bytes_per_user"] > 0 and report["redis_gib_per_million_users"] > 0
    assert "next flush, same (300)" in stderr and "Redis cores" in stderr


def test_bench_quota_counters_add_up_to_the_requests_it_applied(redis_url):
    url = redis_url.rsplit("/", 1)[0] + f"/{BENCH_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    # More totals than users: other models and earlier windows of the same users.
    report, stderr = bench_report("--totals", "700", "--users", "100", "--batch", "150", "--redis-url", url)
    assert report["redis_cpu_measured"] is False and report["redis_us_per_total"] is None
    assert "redis CPU not measured" in stderr
    assert report["month_bases"] is True and report["first_of_day"]["changed"] == 100
    assert report["new_window"]["changed"] == report["next_flush"]["changed"] == 700
    # 150 warm-up users' windows and 100 users' first windows of one event, then 700 windows at two events each.
    assert report["requests_applied"] == 150 + 100 + 700 * 2
    # A base for each user, written once: after its first window.
    assert report["first_of_day"]["bases"]["written"] == 100 and report["new_window"]["bases"]["written"] == 0
    bases = [key for key in client.scan_iter(match="gw:usage:user:*:m:*") if client.hexists(key, "cutoff")]
    assert len(bases) == report["bases_written"] == 150 + 100

    def counted(scope: str) -> tuple[set[str], int]:
        """(who has a day counter, their requests summed) over every day (windows may straddle midnight)."""
        keys = [key.decode() for key in client.scan_iter(match=f"gw:usage:{scope}:*:d:*", count=1000)]
        return {key.split(":")[3] for key in keys}, sum(int(client.hget(key, "requests")) for key in keys)

    orgs, org_requests = counted("org")
    assert orgs == {f"org-{org:02d}" for org in range(7)} and org_requests == report["requests_applied"]
    users, user_requests = counted("user")
    assert len(users) == 100 + 150 and user_requests == report["requests_applied"]

    # A second run into the same database would skip the windows the first recorded: refused.
    again = run_cli("bench", "quota", "--totals", "10", "--users", "10", "--redis-url", url, timeout=60)
    assert again.returncode == 2 and "give it an empty database" in again.stderr
    assert counted("org") == (orgs, org_requests)
    client.flushdb()
