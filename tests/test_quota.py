"""Quota counters, tiers, alerts and the gateway's QuotaClient against a real redis-server."""

from datetime import datetime, timezone
from decimal import Decimal

import pytest
import redis

from connectors.quota_client import QuotaClient
from ops.settings import QuotaSettings, load_settings
from schemas.pricing import cost_usd
from sinks.billing import billing_event, latest_versions
from sinks.quota import QuotaStore

pytestmark = pytest.mark.integration
# The tests' minute, and the store's clock within it: a moment in the future, so that no key's
# expiry (which Redis keeps by its own wall clock) falls in the past, and the same on any date the
# tests are collected or run (a minute read from the wall clock at import put a run collected
# before midnight UTC and run after it on a day whose counters had expired).
WINDOW = int(datetime(2031, 3, 8, 12, 0, tzinfo=timezone.utc).timestamp()) * 1000
NOW_S = WINDOW / 1000 + 30


@pytest.fixture
def store(redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    quota = QuotaSettings()
    # A month counter per user (month_bases=False): the bases are tests/test_quota_bases.py's.
    store = QuotaStore(redis_url, quota.default_tier, tuple(quota.alert_thresholds), month_bases=False,
                       clock=lambda: NOW_S)
    store.publish_tiers(quota.tiers)
    return store


def total(n, input=0, output=0, cache_read=0, cache_write=0, user="u1", model="gpt-4o", start=WINDOW):
    return {"org_id": "o1", "user_id": user, "model": model, "window_start_ms": start, "window_length_ms": 60_000,
            "n": n, "input": input, "output": output, "cache_read": cache_read, "cache_write": cache_write}


def test_window_totals_apply_once_whatever_the_replays(store):
    assert store.apply([total(2, 100, 10), total(2, 100, 10)]) == 1
    assert store.apply([total(3, 150, 20, cache_read=5)]) == 1
    assert store.apply([total(1, 50, 5), total(3, 150, 20, cache_read=5)]) == 0
    month = store.usage("user", "o1/u1", WINDOW)["month"]
    assert month == {"requests": 3, "tokens": 175, "input": 150, "output": 20, "cache_read": 5, "cache_write": 0}
    assert store.usage("org", "o1", WINDOW)["day"]["tokens"] == 175
    assert store.total_tokens("user") == store.total_tokens("org") == 175


def test_free_tier_is_refused_after_ten_requests_a_day(store, redis_url):
    client = QuotaClient(redis_url, socket_timeout_s=1)
    assert client.check("o1", "u1", WINDOW).allowed
    store.apply([total(10, 100, user="u1")])
    decision = client.check("o1", "u1", WINDOW)
    assert (decision.allowed, decision.tier, decision.requests_today, decision.requests_per_day) == (False, "free", 10, 10)
    assert "daily request limit" in decision.reason


def test_pro_tier_has_no_limit_and_enterprise_gets_custom_limits(store, redis_url):
    client = QuotaClient(redis_url, socket_timeout_s=1)
    store.set_tier("o1/pro", "pro")
    store.apply([total(500, 10**6, user="pro")])
    assert client.check("o1", "pro", WINDOW).allowed
    store.set_tier("o1/ent", "enterprise", tokens_per_month=1000, overage_allowed=0)
    store.apply([total(1, 1000, user="ent")])
    decision = client.check("o1", "ent", WINDOW)
    assert (decision.allowed, decision.tokens_per_month) == (False, 1000)
    assert "monthly token limit" in decision.reason


def test_alerts_at_80_and_100_percent_once_per_period(store):
    store.apply([total(1, 79_000)])
    assert store.pending_alerts() == []
    store.apply([total(2, 81_000)])
    store.apply([total(3, 81_500)])
    alerts = store.pending_alerts()
    assert [(a["metric"], a["threshold"]) for a in alerts] == [("tokens_month", 0.8)]
    store.ack_alerts([a["alert_id"] for a in alerts])
    store.apply([total(9, 120_000)])
    assert sorted((a["metric"], a["threshold"]) for a in store.pending_alerts()) == [
        ("requests_day", 0.8), ("tokens_month", 1.0)]
    store.apply([total(10, 130_000)])
    assert sorted((a["metric"], a["threshold"]) for a in store.pending_alerts()) == [
        ("requests_day", 0.8), ("requests_day", 1.0), ("tokens_month", 1.0)]


def test_cost_uses_separate_cache_prices_and_is_exact():
    pricing = load_settings(environ={}, use_service_state=False).pricing
    cost, priced = cost_usd(total(1, input=1_000_000, output=1_000_000, cache_read=1_000_000,
                                  cache_write=1_000_000, model="claude-sonnet-4"), pricing)
    assert (cost, priced) == (Decimal("22.05"), True)
    assert cost_usd(total(1, input=3, model="gpt-4o-mini"), pricing)[0] == Decimal("0.00000045")
    assert cost_usd(total(1, input=10, model="unknown-model"), pricing) == (Decimal(0), False)


def test_billing_consumers_keep_the_highest_version():
    pricing = load_settings(environ={}, use_service_state=False).pricing
    first, later = billing_event(total(1, 100), pricing), billing_event(total(2, 300), pricing)
    assert first["billing_id"] == later["billing_id"]
    kept = latest_versions([later, first, first])
    assert kept[first["billing_id"]]["cost_usd"] == later["cost_usd"] == "0.000750000"


def late(event_id, input, start=WINDOW, user="u1"):
    return {**total(1, input, user=user, start=start), "event_id": event_id}


def test_late_events_count_once_in_their_own_day_and_month(store):
    store.apply([total(2, 100)])
    yesterday = WINDOW - 86_400_000  # another day of the same month
    assert store.apply([late("e-old", 40, start=yesterday), late("e-old", 40, start=yesterday)]) == 1
    assert store.apply([late("e-old", 40, start=yesterday)]) == 0
    assert store.usage("user", "o1/u1", yesterday)["day"]["tokens"] == 40
    assert store.usage("user", "o1/u1", WINDOW)["day"]["tokens"] == 100
    assert store.usage("user", "o1/u1", WINDOW)["month"] == {
        "requests": 3, "tokens": 140, "input": 140, "output": 0, "cache_read": 0, "cache_write": 0}
    # A late event joins no window record: the window's own totals still apply by difference.
    assert store.apply([total(3, 130)]) == 1
    assert store.usage("user", "o1/u1", WINDOW)["month"]["tokens"] == 170


def test_redis_state_expires_with_its_horizon_and_periods(store):
    from sinks.quota import late_key, period_ends, usage_keys, window_key
    store.window_ttl_s = 1324
    store.apply([total(2, 100), late("e-late", 7)])
    r = store.redis
    assert r.expiretime(window_key(total(2))) == int(NOW_S) + 1324
    day_end, month_end = period_ends(WINDOW)
    day_key, month_key = usage_keys("user", "o1/u1", WINDOW)
    assert r.expiretime(day_key) == day_end + 86_400
    assert r.expiretime(month_key) == month_end + 86_400 == r.expiretime(late_key(late("x", 0)))
    assert r.expiretime(usage_keys("org", "o1", WINDOW)[0]) == day_end + 86_400
    # Every key written is bounded by a TTL: nothing a user leaves behind lives forever.
    assert all(r.ttl(key) > 0 for key in r.scan_iter(match="gw:*")
               if not key.startswith((b"gw:tiers", b"gw:tier:", b"gw:limits:")))


def test_restating_absolute_totals_is_idempotent(store):
    store.apply([total(2, 100)])
    restated = {"requests": 5, "tokens": 900, "input": 900}
    for _ in range(2):
        store.restate("user", "o1/u1", WINDOW, day=restated, month=restated)
    assert store.usage("user", "o1/u1", WINDOW)["month"] == {**restated, "output": 0, "cache_read": 0,
                                                             "cache_write": 0}


def test_late_events_are_billed_as_adjustments_with_deterministic_ids():
    pricing = load_settings().pricing
    adjustment = billing_event(late("e-9", 1000), pricing)
    assert adjustment["billing_id"] == f"o1/u1/gpt-4o/{WINDOW}/late/e-9"
    window = billing_event(total(4, 1000), pricing)
    kept = latest_versions([window, adjustment, adjustment, billing_event(total(3, 900), pricing)])
    assert sorted(kept) == sorted([window["billing_id"], adjustment["billing_id"]])
    assert Decimal(adjustment["cost_usd"]) > 0


def test_an_idle_users_window_state_drop_never_loses_a_later_events_tokens(store):
    # The flow forgets an idle user's windows while Redis still holds their records: an
    # event that comes after the drop, late or within lateness of the user's last event,
    # must reach the quota once all the same (not reopen a window at n=1 that Redis refuses).
    from dataflows.state import UserWindows, WindowLogic

    def event(event_id, at_ms, tokens):
        return {"event_id": event_id, "org_id": "o1", "user_id": "u1", "model": "gpt-4o", "event_time": at_ms,
                "input_tokens": tokens, "output_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0}

    now = [1000.0]
    logic = WindowLogic(UserWindows(60_000, 600_000, "adjust"), flush_interval_s=2, idle_s=662, clock=lambda: now[0])

    def run(events):
        out, _ = logic.on_batch(events)
        now[0] += 2
        out += logic.on_notify()[0]
        store.apply([t for kind, totals in out if kind == "totals" for t in totals])

    first = WINDOW - 86_400_000
    run([event("a", first + 1000, 100), event("b", first + 2000, 10)])
    now[0] += 700  # idle: the user's windows leave the flow's state
    logic.on_notify()
    run([event("c", first + 3000, 7)])  # same window, within lateness of the user's last event
    run([event("d", first + 900_000, 1)])  # moves the watermark ahead
    run([event("e", first + 4000, 3)])  # late
    month = store.usage("user", "o1/u1", first)["month"]
    assert (month["requests"], month["tokens"]) == (5, 121)
    # Replayed after the same drop, the adjustments apply once per event id.
    now[0] += 700
    logic.on_notify()
    run([event("c", first + 3000, 7)])
    assert store.usage("user", "o1/u1", first)["month"]["tokens"] == 121


def test_closed_days_are_restated_and_their_month_keeps_the_open_days_live_counts(store):
    from sinks.quota import RESTATE_KEY, day_string, first_open_day
    now_s = NOW_S  # not a month's 1st, which has no closed day in its month
    today, yesterday = day_string(now_s), day_string(now_s - 86400)
    store.apply([total(2, 100)])  # today, through the window records
    usage = {"requests": 3, "input": 40, "output": 2}
    for _ in range(2):  # absolute totals: a second restatement changes nothing
        assert store.restate_closed_days({("user", "o1/u1", yesterday): usage},
                                         {("user", "o1/u1", yesterday[:6] + "01"): usage}, open_from=today) == 2
    counted = store.usage("user", "o1/u1", WINDOW)
    assert counted["month"] == {"requests": 5, "tokens": 142, "input": 140, "output": 2, "cache_read": 0,
                                "cache_write": 0}
    assert store.usage("user", "o1/u1", WINDOW - 86_400_000)["day"]["tokens"] == 42
    assert first_open_day(now_s, 1200) <= today
    store.month_bases = True
    store.restate_closed_days({}, {("user", "o1/u1", yesterday[:6] + "01"): usage}, open_from=today)
    assert store.redis.zscore(RESTATE_KEY, f"o1/u1|{yesterday[:6]}") is not None


def test_a_replay_splits_closed_days_from_open_ones():
    from datetime import date

    from dataflows.replay import closed_day_restatement, quota_split
    assert quota_split(date(2026, 11, 1), date(2026, 11, 29), "20261129") == (
        (date(2026, 11, 1), date(2026, 11, 28)), (date(2026, 11, 29), date(2026, 11, 29)))
    assert quota_split(date(2026, 11, 29), date(2026, 11, 29), "20261129") == (None, (date(2026, 11, 29),) * 2)
    assert quota_split(date(2026, 10, 1), date(2026, 10, 3), "20261129")[1] is None
    usage = {("user", "o/u", "20261102"): {"requests": 1}, ("user", "o/u", "20261105"): {"requests": 2},
             ("user", "o/v", "20261104"): {"requests": 4}}
    days, months = closed_day_restatement(usage, "20261105", "20261105")
    assert list(days) == [("user", "o/u", "20261105")]
    assert {key: totals["requests"] for key, totals in months.items()} == {("user", "o/u", "20261101"): 3}
