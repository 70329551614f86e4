"""Month bases (the default) on a real redis-server and the daily aggregates in chdb: Redis
keeps only the recent days, a user's month is base + day counters, a returning user's month
is whole from its first request, a late event older than the counted days is counted once
through the aggregates (user and org), and users who stopped leave nothing behind."""

import random
from datetime import datetime, timezone
from functools import partial

import pytest
import redis

from connectors.quota_client import QuotaClient
from ops.bench.history import expire_passed
from ops.dev.loadgen import make_event
from ops.settings import PricingSettings, QuotaSettings
from ops.status import quota_lines
from sinks.billing import with_cost
from sinks.clickhouse import ClickHouse, close_chdb, month_usage_before, org_month_usage_before, refresh_aggregates
from sinks.quota import RESTATE_KEY, QuotaStore, keep_month_bases, restate_month_bases

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
        return self.sink_writes({"org_id": "o1", "user_id": user, "model": "gpt-4o", "n": 1,
                                 "window_start_ms": at_s // 60 * 60_000, "window_length_ms": 60_000,
                                 "input": tokens, "output": 0, "cache_read": 0, "cache_write": 0})

    def late(self, user: str, at_s: int, tokens: int, event_id: str) -> int:
        """An event past the allowed lateness (the same one again when redelivered): a one-event
        adjustment carrying its id."""
        self.sent.setdefault(event_id, self.event(user, at_s, tokens, event_id))
        self.clickhouse.insert_events([self.sent[event_id]])
        return self.sink_writes({"org_id": "o1", "user_id": user, "model": "gpt-4o", "n": 1,
                                 "window_start_ms": at_s // 60 * 60_000, "window_length_ms": 60_000,
                                 "input": tokens, "output": 0, "cache_read": 0, "cache_write": 0,
                                 "event_id": event_id})

    def sink_writes(self, total: dict) -> int:
        """What QuotaWriter does with a batch: apply it, then the bases it lacks (and those
        due, whose delay has not passed here)."""
        changed = self.store.apply([total])
        keep_month_bases(self.store, partial(month_usage_before, self.clickhouse),
                         partial(org_month_usage_before, self.clickhouse), [f"o1/{total['user_id']}"])
        return changed

    def restate(self) -> int:
        """The aggregates refreshed, and the marked bases and org months once their delay passed."""
        refresh_aggregates(self.clickhouse)
        return restate_month_bases(self.store, partial(month_usage_before, self.clickhouse), delay_s=0,
                                   org_totals=partial(org_month_usage_before, self.clickhouse))


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
    # Both first seen this month: their bases (nothing before yesterday) came with their batch.
    assert store.missing_bases(["o1/a", "o1/b"]) == [] and store.redis.zcard(RESTATE_KEY) == 0
    next_day(clock, store)
    usage.window("a", int(clock.now), 200)
    usage.restate()
    next_day(clock, store)
    assert usage.window("a", int(clock.now), 300) == 1
    # March 8's counter is gone and a's base (cutoff March 8) with it; the batch that brought
    # a back wrote the new base at once.
    assert month_tokens(store, redis_url, "a", int(clock.now)) == (600, 600)
    for _ in range(2):  # absolute totals: restating twice is restating once
        assert usage.restate() == 0
        store.write_bases([("o1/a", "203103", None, {"input": 100, "requests": 1})], forget=False)
        assert month_tokens(store, redis_url, "a", int(clock.now)) == (600, 600)
    # b has been idle for two days: not one key of it is left.
    assert [k for k in store.redis.scan_iter(match="*o1/b*")] == []


def test_a_returning_users_month_is_whole_from_its_first_request(stores, redis_url):
    store, clickhouse, clock = stores
    usage = Usage(store, clickhouse)
    usage.window("a", int(clock.now), 100)
    usage.window("c", int(clock.now), 50)
    next_day(clock, store)
    usage.window("a", int(clock.now), 200)
    usage.restate()  # the aggregates hold March 8 and 9 (the flow's ClickHouse sink refreshes them every 10 s)
    next_day(clock, store, 2)
    # March 11: a and c come back; none of their keys is left, their usage is in the aggregates.
    now_ms = int(clock.now) * 1000
    assert store.missing_bases(["o1/a", "o1/c"]) == [("o1/a", "203103"), ("o1/c", "203103")]
    plain = QuotaClient(redis_url, socket_timeout_s=1).check("o1", "a", now_ms)
    assert (plain.month_complete, plain.tokens_this_month) == (False, 0)
    gateway = QuotaClient(redis_url, socket_timeout_s=1, month_totals=partial(month_usage_before, clickhouse))
    decision = gateway.check("o1", "a", now_ms)  # before a's first request of the day
    assert (decision.month_complete, decision.tokens_this_month) == (True, 300)
    assert gateway.check("o1", "a", now_ms).tokens_this_month == 300
    # c's gateway asks nothing of the aggregates: the quota sink's first batch of c writes the base.
    usage.window("c", int(clock.now), 5)
    assert month_tokens(store, redis_url, "c", int(clock.now)) == (55, 55)
    usage.window("a", int(clock.now), 1)
    assert month_tokens(store, redis_url, "a", int(clock.now)) == (301, 301)
    # `gatewatch status --quota` reads them as enforcement does (the org's month is a live counter).
    screen = quota_lines(gateway, store, ["o1/a", "o1"], now_ms)
    assert screen[2].split() == ["o1/a", "free", "1", "301", "100,000"]
    assert screen[3].split() == ["o1", "org", "2", "356", "-"]


def test_a_late_event_older_than_the_counted_days_is_counted_once_through_the_aggregates(stores, redis_url):
    store, clickhouse, clock = stores
    usage = Usage(store, clickhouse)
    march_8 = int(clock.now)
    usage.window("a", march_8, 100)
    usage.restate()
    next_day(clock, store, 2)
    usage.window("a", int(clock.now), 300)
    usage.restate()
    org_month = partial(store.month_usage, "org", "o1")
    assert month_tokens(store, redis_url, "a", int(clock.now)) == (400, 400)
    assert org_month(int(clock.now) * 1000)["tokens"] == 400
    for _ in range(2):  # delivered twice: Redis leaves it to the aggregates, which keep it once
        assert usage.late("a", march_8 + 60, 40, "late-old") == 0
    assert month_tokens(store, redis_url, "a", int(clock.now)) == (400, 400)
    usage.restate()
    assert month_tokens(store, redis_url, "a", int(clock.now)) == (440, 440)
    # The org's month counter too: its days before yesterday restated from the aggregates.
    assert org_month(int(clock.now) * 1000) == {"requests": 3, "tokens": 440, "input": 440, "output": 0,
                                                "cache_read": 0, "cache_write": 0}
    # A late event of yesterday is within the counted days: Redis counts it, once.
    for _ in range(2):
        usage.late("a", int(clock.now) - DAY_S, 7, "late-yesterday")
    assert month_tokens(store, redis_url, "a", int(clock.now)) == (447, 447)
    usage.restate()
    assert month_tokens(store, redis_url, "a", int(clock.now)) == (447, 447)
    assert org_month(int(clock.now) * 1000)["tokens"] == 447
    usage.window("a", int(clock.now) + 60, 3)  # the restated org month keeps counting live
    assert org_month(int(clock.now) * 1000)["tokens"] == 450 == store.total_tokens("org")
    assert store.total_tokens("user") == 450


def test_a_base_that_carries_the_month_over_a_threshold_raises_the_alert(stores, redis_url):
    store, clickhouse, clock = stores
    usage = Usage(store, clickhouse)
    usage.window("a", int(clock.now), 70_000)  # free tier: 100,000 tokens a month
    usage.restate()
    next_day(clock, store, 2)
    usage.window("a", int(clock.now), 15_000)  # counted without a base, which the same batch then writes
    alerts = [a for a in store.pending_alerts() if a["metric"] == "tokens_month"]
    assert [(a["threshold"], a["usage"]) for a in alerts] == [(0.8, 85_000)]
    store.ack_alerts([a["alert_id"] for a in alerts])
    usage.restate()
    assert [a for a in store.pending_alerts() if a["metric"] == "tokens_month"] == []


def test_the_quota_sink_counts_on_when_the_aggregates_are_down(redis_url, flow_topics_env, monkeypatch):
    """No ClickHouse to read the bases from: the batch is counted all the same, its users stay
    marked due for a later batch, and the failure is counted."""
    from dataflows.outputs import quota_writer
    from ops.dev.services import free_port
    from ops.settings import load_settings
    from sinks import metrics

    class ErrorsCounted(metrics.NoOpMetrics):
        def __init__(self):
            self.sinks: list[str] = []

        def increment(self, name, value=1, tags=None):
            if name == "gatewatch_sink_errors":
                self.sinks.append(tags["sink"])

    counted = ErrorsCounted()
    monkeypatch.setattr(metrics, "_backend", counted)
    redis.Redis.from_url(redis_url).flushdb()
    env = {**flow_topics_env(1), "GATEWATCH_REDIS__URL": redis_url,
           "GATEWATCH_CLICKHOUSE__URL": f"clickhouse://127.0.0.1:{free_port()}"}
    writer = quota_writer(load_settings(environ=env, use_service_state=False))
    now_ms = int(writer.store.clock() * 1000)
    writer([[{"org_id": "o1", "user_id": "u9", "model": "gpt-4o", "n": 2, "window_start_ms": now_ms // 60_000 * 60_000,
              "window_length_ms": 60_000, "input": 30, "output": 4, "cache_read": 0, "cache_write": 0}]])
    assert writer.store.month_usage("user", "o1/u9", now_ms)["tokens"] == 34
    assert [user for user, _month, _at in writer.store.due_bases()] == ["o1/u9"]
    assert counted.sinks == ["quota_bases"]
