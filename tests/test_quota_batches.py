"""QuotaStore.apply's batches: many totals in one script call (split into chunks) leave Redis
exactly as the same totals applied one call each, on a real redis-server."""

import calendar
import random
import time

import pytest
import redis

from ops.settings import QuotaSettings
from sinks.quota import ORG_RESTATE_KEY, QuotaStore, fill_month_bases, restate_month_bases

pytestmark = pytest.mark.integration
ONE_BY_ONE_DB = 12  # a database of the session's Redis, flushed before each use (tests run one at a time)
# The workload's minute, and the stores' clock within it: a moment in the future, so that no
# key's expiry (Redis's own wall clock) falls in the past and no day or month turns between the
# module's import and its tests (a minute read from the wall clock at import did).
WINDOW = calendar.timegm((2031, 3, 17, 12, 0, 0)) * 1000
NOW_S = WINDOW / 1000 + 30
DAY_MS = 86_400_000


def quota_store(url: str, month_bases: bool, chunk: int, now: float) -> QuotaStore:
    redis.Redis.from_url(url).flushdb()
    quota = QuotaSettings()
    store = QuotaStore(url, quota.default_tier, tuple(quota.alert_thresholds), clock=lambda: now,
                       month_bases=month_bases, apply_chunk=chunk)
    store.publish_tiers(quota.tiers)
    store.set_tier("o1/big", "enterprise", tokens_per_month=5_000, requests_per_day=40)
    store.set_tier("o2/pro", "pro")
    store.redis.hset("gw:limits:user:o2/capped", mapping={"tokens_per_month": 2_000})  # an override, no tier
    return store


def total(user: str, n: int, input: int, start: int = WINDOW, model: str = "gpt-4o", event_id: str | None = None,
          **kinds) -> dict:
    org, user_id = user.split("/")
    made = {"org_id": org, "user_id": user_id, "model": model, "window_start_ms": start, "window_length_ms": 60_000,
            "n": n, "input": input, "output": kinds.get("output", n), "cache_read": kinds.get("cache_read", 0),
            "cache_write": kinds.get("cache_write", 0)}
    return {**made, "event_id": event_id} if event_id else made


def mixed_flushes(seed: int) -> list[list[dict]]:
    """Flushes of running window totals (growing, re-emitted, out of order), late adjustments
    (some delivered twice), of several orgs and days, including windows older than the counted days."""
    rng = random.Random(seed)
    users = ["o1/big", "o1/a", "o1/b", "o2/pro", "o2/capped", "o2/c", "o3/d"]
    yesterday = WINDOW - DAY_MS
    starts = [WINDOW, WINDOW - 60_000, yesterday, WINDOW - 3 * DAY_MS]
    running: dict[tuple, dict] = {}
    flushes = []
    for _ in range(8):
        flush = []
        for _ in range(rng.choice([1, 5, 40, 90])):
            user, start, model = rng.choice(users), rng.choice(starts), rng.choice(["gpt-4o", "claude-sonnet-4"])
            if rng.random() < 0.1:
                flush.append(total(user, 1, rng.randrange(500), start, model, event_id=f"e{rng.randrange(30)}"))
                continue
            held = running.setdefault((user, start, model), total(user, 0, 0, start, model))
            if rng.random() < 0.8:
                held.update(n=held["n"] + 1, input=held["input"] + rng.randrange(1, 400),
                            output=held["output"] + rng.randrange(50),
                            cache_read=held["cache_read"] + rng.choice([0, 64]))
            if held["n"]:
                flush.append(dict(held))
        flushes.append(flush)
    return flushes


def redis_state(client: redis.Redis) -> dict:
    """Every key: its type, value and expiry time."""
    read = {b"hash": client.hgetall, b"zset": lambda key: client.zrange(key, 0, -1, withscores=True),
            b"set": lambda key: sorted(client.smembers(key)), b"string": client.get}
    return {key: (client.type(key), read[client.type(key)](key), client.expiretime(key)) for key in client.keys("*")}


@pytest.mark.parametrize("month_bases", [True, False])
def test_a_batch_over_several_chunks_leaves_redis_as_one_call_per_total(redis_url, month_bases):
    now = NOW_S
    one_by_one_url = redis_url.rsplit("/", 1)[0] + f"/{ONE_BY_ONE_DB}"
    batched = quota_store(redis_url, month_bases, chunk=7, now=now)
    single = quota_store(one_by_one_url, month_bases, chunk=1, now=now)
    for flush in mixed_flushes(seed=5):
        assert batched.apply(flush) == sum(single.apply([each]) for each in flush)
    state = redis_state(batched.redis)
    assert state == redis_state(single.redis)
    # The workload reached every path: records, late sets, alerts, windows left to the aggregates.
    kinds = {key.split(b":")[1] for key in state}
    assert {b"win", b"late", b"usage", b"recent", b"alerts"} <= kinds
    assert (b"bases" in kinds) == month_bases
    single.redis.flushdb()


@pytest.fixture
def store(redis_url):
    return quota_store(redis_url, month_bases=True, chunk=3, now=NOW_S)


def test_the_same_window_twice_in_one_call_counts_its_newest_totals_once(store):
    older, newer = total("o1/a", 2, 100), total("o1/a", 3, 150, output=5)
    assert store.apply([older, newer, older]) == 2
    assert store.apply([newer, older]) == 0
    assert store.usage("user", "o1/a", WINDOW)["day"] == {"requests": 3, "tokens": 155, "input": 150, "output": 5,
                                                         "cache_read": 0, "cache_write": 0}
    assert store.month_usage("org", "o1", WINDOW)["tokens"] == 155


def test_two_users_of_one_org_cross_their_alerts_in_one_call(store):
    # enterprise o1/big: 5,000 tokens a month and 40 requests a day; free o1/a: 100,000 tokens.
    assert store.apply([total("o1/big", 1, 3_000), total("o1/a", 1, 70_000), total("o1/big", 1, 1_500, model="m2"),
                        total("o1/a", 1, 11_000, model="m2"), total("o1/big", 33, 1_000, model="m3")]) == 5
    crossed = {(a["subject"], a["metric"], a["threshold"]): (a["usage"], a["limit"]) for a in store.pending_alerts()}
    assert crossed == {("o1/big", "tokens_month", 0.8): (4_502, 5_000), ("o1/big", "tokens_month", 1.0): (5_535, 5_000),
                       ("o1/big", "requests_day", 0.8): (35, 40), ("o1/a", "tokens_month", 0.8): (81_002, 100_000)}
    assert store.month_usage("org", "o1", WINDOW) == {"requests": 37, "tokens": 86_537, "input": 86_500,
                                                      "output": 37, "cache_read": 0, "cache_write": 0}


def test_a_batch_larger_than_a_chunk_sums_its_org_counters_once_per_total(store):
    totals = [total(f"o{i % 2}/u{i}", 2, 10 * i) for i in range(10)]  # 4 chunks of 3
    assert store.apply(totals) == 10
    assert store.apply(totals) == 0
    even, odd = (store.usage("org", org, WINDOW)["day"] for org in ("o0", "o1"))
    assert (even["requests"], even["input"]) == (10, 200) and (odd["requests"], odd["input"]) == (10, 250)
    assert store.total_tokens("user") == store.total_tokens("org") == 450 + 20


def bases_of(users: list[str], month: str) -> list[tuple[str, str, None, dict[str, int]]]:
    """write_bases' input: per user its month's totals before the cutoff, some over a threshold."""
    return [(user, month, None, {"requests": 3 + i, "input": 1_700 * i, "output": 40 * i, "cache_read": 9,
                                 "cache_write": i % 2}) for i, user in enumerate(users)]


@pytest.mark.parametrize("day", [1, 17])
def test_bases_written_over_several_chunks_leave_redis_as_one_call_per_base(redis_url, day):
    """Bases of several tiers and overrides in one script call: each reads its own limits and
    its own days (on the 1st the base has no day before the cutoff), as one call per base does."""
    now = time.time()
    moment = time.gmtime(now)
    # The day-th of next month at noon: a future the keys' expiry does not reach, a cutoff of day - 1 or the 1st.
    year, month_number = moment.tm_year + moment.tm_mon // 12, moment.tm_mon % 12 + 1
    now = calendar.timegm((year, month_number, day, 12, 0, 0))
    month = f"{year}{month_number:02d}"
    one_by_one_url = redis_url.rsplit("/", 1)[0] + f"/{ONE_BY_ONE_DB}"
    batched = quota_store(redis_url, True, chunk=3, now=now)
    single = quota_store(one_by_one_url, True, chunk=1, now=now)
    users = ["o2/c", "o1/a", "o2/pro", "o2/capped", "o1/big", "o3/d", "o1/e", "o1/f"]
    for store in (batched, single):
        store.apply([total(user, 2, 10 * (i + 1), start=int(now) * 1000 // 60_000 * 60_000)
                     for i, user in enumerate(users)])
    bases = bases_of(users, month) + [("o1/a", "200001", None, {"requests": 5})]  # a month that is over: skipped
    assert batched.write_bases(bases, forget=False) == len(users)
    assert sum(single.write_bases([base], forget=False) for base in bases) == len(users)
    state = redis_state(batched.redis)
    assert state == redis_state(single.redis)
    cutoff = f"{month}{max(day - 1, 1):02d}"
    assert {base[b"cutoff"] for key, (_type, base, _at) in state.items() if b":m:" in key and key.startswith(
        b"gw:usage:user:")} == {cutoff.encode()}
    # The bases carried o1/big (enterprise, 5,000 tokens a month of its own) and o2/capped (an override of 2,000
    # with the free tier's others) over both thresholds; free o1/f (100,000) and pro (unlimited) over none.
    crossed = {(a["subject"], a["threshold"]): (a["tier"], a["usage"], a["limit"]) for a in batched.pending_alerts()
               if a["metric"] == "tokens_month"}
    assert crossed[("o2/capped", 0.8)] == crossed[("o2/capped", 1.0)] == ("free", 42 + 5_230, 2_000)
    assert crossed[("o1/big", 0.8)] == crossed[("o1/big", 1.0)] == ("enterprise", 52 + 6_969, 5_000)
    assert {subject for subject, _threshold in crossed} == {"o2/capped", "o1/big"}
    single.redis.flushdb()


def test_an_org_month_is_restated_on_the_first_day_of_the_next_month(redis_url):
    """On the 1st, a month that just ended is restated through its last day (not a 31st it lacks)."""
    moment = time.gmtime()
    year, number = moment.tm_year, moment.tm_mon
    # A month to come shorter than 31 days (keys expire in the real future), restated on the next 1st at 00:10.
    while True:
        year, number = year + number // 12, number % 12 + 1
        if calendar.monthrange(year, number)[1] < 31:
            break
    now = calendar.timegm((year + number // 12, number % 12 + 1, 1, 0, 10, 0))
    ended_day = time.strftime("%Y%m%d", time.gmtime(now - 86_400))
    store = quota_store(redis_url, True, chunk=3, now=now)
    store.apply([total("o1/a", 3, 70, start=(now - 3_600) * 1000)])  # yesterday, the month's last day
    store.redis.zadd(ORG_RESTATE_KEY, {f"o1|{ended_day[:6]}": now - 1_000})
    restated = restate_month_bases(store, lambda *_: {}, delay_s=0,
                                   org_totals=lambda orgs, _month, _cutoff: {org: {"requests": 2, "input": 500}
                                                                             for org in orgs})
    assert restated == 1 and store.redis.zcard(ORG_RESTATE_KEY) == 0
    assert store.month_through("org", "o1", ended_day) == {"requests": 5, "tokens": 573, "input": 570, "output": 3,
                                                           "cache_read": 0, "cache_write": 0}


@pytest.mark.parametrize("day, asked", [(1, False), (2, False), (3, True)])
def test_the_aggregates_are_asked_for_bases_only_when_the_month_has_days_before_the_cutoff(redis_url, day, asked):
    """On a month's 1st and 2nd the cutoff is the 1st: every base is empty, written without a query."""
    moment = time.gmtime()
    year, number = moment.tm_year + moment.tm_mon // 12, moment.tm_mon % 12 + 1  # next month: keys outlive the test
    now = calendar.timegm((year, number, day, 12, 0, 0))
    store = quota_store(redis_url, True, chunk=3, now=now)
    store.apply([total("o1/a", 2, 30, start=now * 1000 // 60_000 * 60_000)])
    queries = []

    def month_totals(pairs, month, cutoff):
        queries.append((pairs, month, cutoff))
        return {("o1", "a"): {"requests": 4, "input": 400}}

    assert fill_month_bases(store, month_totals, ["o1/a"]) == 1
    month = f"{year}{number:02d}"
    assert queries == ([([("o1", "a")], month, f"{month}{day - 1:02d}")] if asked else [])
    assert store.month_usage("user", "o1/a", now * 1000)["tokens"] == (400 if asked else 0) + 32
