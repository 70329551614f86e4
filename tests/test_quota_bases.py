"""Month bases (QuotaStore(month_bases=True)) on a real redis-server and the daily aggregates
in chdb: Redis keeps only the recent days, a user's month is base + day counters, a late
event older than the counted days is billed once through the aggregates, and users who
stopped leave nothing behind."""

import random
from datetime import datetime, timezone
from functools import partial

import pytest
import redis

from connectors.quota_client import QuotaClient
from ops.bench.history import expire_passed
from ops.dev.loadgen import make_event
from ops.settings import PricingSettings, QuotaSettings
from sinks.billing import with_cost
from sinks.clickhouse import ClickHouse, close_chdb, month_usage_before, refresh_aggregates
from sinks.quota import RESTATE_KEY, QuotaStore, restate_month_bases

pytestmark = pytest.mark.integration
DAY_S = 86400
# Simulated days in the future: keys' expiry times never fall in the real past, and the
# test deletes what has expired in simulated time (what Redis does by the wall clock).
MARCH_8 = int(datetime(2031, 3, 8, tzinfo=timezone.utc).timestamp())


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def stores(redis_url, tmp_path):
    redis.Redis.from_url(redis_url).flushdb()
    clock = Clock(MARCH_8 + 12 * 3600)
    quota = QuotaSettings()
    store = QuotaStore(redis_url, quota.default_tier, tuple(quota.alert_thresholds), clock=clock, month_bases=True)
    store.publish_tiers(quota.tiers)
    clickhouse = ClickHouse(f"chdb://{tmp_path / 'chdb'}", "bases")
    clickhouse.migrate()
    yield store, clickhouse, clock
    close_chdb()


class Usage:
    """Requests that reach both stores, as the flow's quota and ClickHouse sinks write them."""

    def __init__(self, store: QuotaStore, clickhouse: ClickHouse):
        self.store, self.clickhouse, self.rng, self.count = store, clickhouse, random.Random(3), 0
        self.sent: dict[str, dict] = {}

    def event(self, user: str, at_s: int, tokens: int, event_id: str | None = None) -> dict:
        self.count += 1
        event = make_event(self.rng, at_s * 1000, 1, 0.0)[0]
        event.update(event_id=event_id or f"e-{self.count}", org_id="o1", user_id=user, input_tokens=tokens,
                     output_tokens=0, cache_read_tokens=0, cache_write_tokens=0, classification="internal",
                     pii_entity_counts={}, source_partition=0, source_offset=self.count)
        return with_cost(event, PricingSettings())

    def window(self, user: str, at_s: int, tokens: int) -> int:
        """One request in its own one-minute window."""
        self.clickhouse.insert_events([self.event(user, at_s, tokens)])
        return self.store.apply([{"org_id": "o1", "user_id": user, "model": "gpt-4o", "n": 1,
                                  "window_start_ms": at_s // 60 * 60_000, "window_length_ms": 60_000,
                                  "input": tokens, "output": 0, "cache_read": 0, "cache_write": 0}])

    def late(self, user: str, at_s: int, tokens: int, event_id: str) -> int:
        """An event past the allowed lateness (the same one again when redelivered): a one-event
        adjustment carrying its id."""
        self.sent.setdefault(event_id, self.event(user, at_s, tokens, event_id))
        self.clickhouse.insert_events([self.sent[event_id]])
        return self.store.apply([{"org_id": "o1", "user_id": user, "model": "gpt-4o", "n": 1,
                                  "window_start_ms": at_s // 60 * 60_000, "window_length_ms": 60_000,
                                  "input": tokens, "output": 0, "cache_read": 0, "cache_write": 0,
                                  "event_id": event_id}])

    def restate(self) -> int:
        refresh_aggregates(self.clickhouse)
        return restate_month_bases(self.store, partial(month_usage_before, self.clickhouse), delay_s=0)


def month_tokens(store: QuotaStore, redis_url: str, user: str, at_s: int) -> tuple[int, int]:
    """(month tokens as QuotaStore.usage reads them, as the gateway's check reads them)."""
    decision = QuotaClient(redis_url, socket_timeout_s=1).check("o1", user, at_s * 1000)
    return store.usage("user", f"o1/{user}", at_s * 1000)["month"].get("tokens", 0), decision.tokens_this_month


def next_day(clock: Clock, store: QuotaStore, days: int = 1) -> None:
    clock.now += days * DAY_S
    expire_passed(store.redis, clock.now)


def test_a_month_is_its_base_plus_the_recent_days_and_idle_users_leave_nothing(stores, redis_url):
    store, clickhouse, clock = stores
    usage = Usage(store, clickhouse)
    usage.window("a", int(clock.now), 100)
    usage.window("b", int(clock.now), 50)
    assert usage.restate() == 2  # both first seen this month: bases of 0 before yesterday
    next_day(clock, store)
    usage.window("a", int(clock.now), 200)
    usage.restate()
    next_day(clock, store)
    assert usage.window("a", int(clock.now), 300) == 1
    # March 8's counter is gone and a's base (cutoff March 8) with it: until the base is
    # recomputed the month shows the days Redis still counts.
    assert month_tokens(store, redis_url, "a", int(clock.now)) == (500, 500)
    assert store.due_bases(delay_s=0)[0][:2] == ("o1/a", "203103")
    for _ in range(2):  # absolute totals: restating twice is restating once
        usage.restate()
        assert month_tokens(store, redis_url, "a", int(clock.now)) == (600, 600)
    assert store.redis.zcard(RESTATE_KEY) == 0
    # b has been idle for two days: not one key of it is left.
    assert [k for k in store.redis.scan_iter(match="*o1/b*")] == []


def test_a_late_event_older_than_the_counted_days_is_counted_once_through_the_aggregates(stores, redis_url):
    store, clickhouse, clock = stores
    usage = Usage(store, clickhouse)
    march_8 = int(clock.now)
    usage.window("a", march_8, 100)
    usage.restate()
    next_day(clock, store, 2)
    usage.window("a", int(clock.now), 300)
    usage.restate()
    assert month_tokens(store, redis_url, "a", int(clock.now)) == (400, 400)
    for _ in range(2):  # delivered twice: Redis leaves it to the aggregates, which keep it once
        assert usage.late("a", march_8 + 60, 40, "late-old") == 0
    assert month_tokens(store, redis_url, "a", int(clock.now)) == (400, 400)
    usage.restate()
    assert month_tokens(store, redis_url, "a", int(clock.now)) == (440, 440)
    # A late event of yesterday is within the counted days: Redis counts it, once.
    for _ in range(2):
        usage.late("a", int(clock.now) - DAY_S, 7, "late-yesterday")
    assert month_tokens(store, redis_url, "a", int(clock.now)) == (447, 447)
    usage.restate()
    assert month_tokens(store, redis_url, "a", int(clock.now)) == (447, 447)


def test_a_base_that_carries_the_month_over_a_threshold_raises_the_alert(stores, redis_url):
    store, clickhouse, clock = stores
    usage = Usage(store, clickhouse)
    usage.window("a", int(clock.now), 70_000)  # free tier: 100,000 tokens a month
    usage.restate()
    next_day(clock, store, 2)
    usage.window("a", int(clock.now), 15_000)  # the month shows 15,000 until the base is back
    assert [a for a in store.pending_alerts() if a["metric"] == "tokens_month"] == []
    usage.restate()
    alerts = [a for a in store.pending_alerts() if a["metric"] == "tokens_month"]
    assert [(a["threshold"], a["usage"]) for a in alerts] == [(0.8, 85_000)]
    store.ack_alerts([a["alert_id"] for a in alerts])
    usage.restate()
    assert [a for a in store.pending_alerts() if a["metric"] == "tokens_month"] == []
