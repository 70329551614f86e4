"""Per-user and per-org token and request counters in Redis, applied exactly once in effect.

The flow emits, for each (org, user, model, window), the window's running absolute totals
with the number of distinct events they cover. One Lua script stores the newest totals of
the window and adds only the difference to the day and month counters; it ignores totals
that cover no more events than it already holds. A retried, replayed or re-emitted window
therefore never counts a token twice. The same script notices when a user crosses an
alert threshold of its tier's limits and records the alert as pending until the flow has
delivered it.

Bounded state (memory follows active users, not history):
- A window's record only has to outlive the moments the flow can re-emit that window: the
  flow forgets a window once its user's watermark passed it by the allowed lateness, and an
  idle user after lateness + length + flush interval. The record therefore expires after
  twice that horizon (the flow passes it as window_ttl_s), which also covers a restart
  from a recovery snapshot within the horizon.
- An event later than the allowed lateness never reopens its window. It arrives as a late
  adjustment (a one-event total carrying its event_id) and is counted in its own
  event-time day and month once per event id: a set per user and month of 12-byte id
  hashes, expiring with the month counter it protects. Only late events are remembered
  there, so it grows with the late rate, never with all traffic.
- Day counters expire when their day ends plus a margin, month counters when their month
  ends plus the margin; an event for a period that already expired still counts in the
  periods that live (and is billed: billing does not depend on Redis).
- A replay of raw events older than the window horizon cannot be told apart from new
  usage by these records; such a replay is restated instead: restate() writes absolute
  day/month totals (recomputed from the ClickHouse aggregates), which is idempotent.

Month bases (QuotaStore(month_bases=True)): a live month counter per user lives until its
month ends, so Redis grows with the users seen this month, not with those active now (a
long tail of occasional users grows it every day). With month bases Redis instead counts
only the days whose day counters are alive (yesterday and today) and keeps, per recently
active user, a base: the absolute month-to-date totals of the days before a cutoff day,
read from the ClickHouse daily aggregates (restate_month_bases). A user's month is then
base + the day counters from the cutoff on, which splits the month at a day boundary, so
no event is counted on both sides. Writing a base is idempotent (absolute totals). An
event dated before yesterday is left to the aggregates: Redis does not count it and marks
the user's base for a recomputation once the aggregates hold it. Every key then lives at
most a couple of days after its user's last request.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Callable

import redis

from schemas.vocabulary import TOKEN_KINDS
from sinks.metrics import count_written, get_metrics, observe_freshness
from sinks.retry import Retry

if TYPE_CHECKING:
    from sinks.dlq import DeadLetters
    from sinks.kafka import TopicWriter

WINDOW_RECORD_TTL_S = 2 * 3600
"""Default life of a window's idempotency record; the flow passes twice its own horizon."""
PERIOD_MARGIN_S = 86400
"""Day and month counters outlive their period by this much (status, late alerts, reconciliation)."""
TIERS_KEY = "gw:tiers"
PENDING_ALERTS_KEY = "gw:alerts:pending"
RESTATE_KEY = "gw:bases:due"
"""Sorted set of 'org/user|YYYYMM' whose month base is missing or stale, scored by when marked."""
RESTATE_DELAY_S = 120
"""A base is recomputed this long after its mark, so the aggregates hold what Redis left to them."""

# Limits of a user: its own override hash, else its tier's (tier from gw:tier:..., else the
# default tier). -1 means unlimited.
_LIMITS_LUA = """
local function limits(tier_key, override_key, tiers_key, default_tier)
  local tier = redis.call('GET', tier_key) or default_tier
  local function limit(name)
    local own = redis.call('HGET', override_key, name)
    if own then return tonumber(own) end
    return tonumber(redis.call('HGET', tiers_key, tier .. ':' .. name) or '-1')
  end
  return tier, limit('requests_per_day'), limit('tokens_per_month'), limit('overage_allowed')
end

-- A user's month tokens: a live month counter holds them all; a month base holds the days
-- before its cutoff and the day counters from the cutoff through last_day (YYYYMMDD) the rest
-- (no base yet: every day counter of the month that is still alive).
local function month_tokens(month_key, day_prefix, last_day)
  local base = redis.call('HMGET', month_key, 'cutoff', 'tokens')
  local total = tonumber(base[2] or '0')
  if not base[1] and base[2] then return total end
  local first = base[1] and tonumber(string.sub(base[1], 7, 8)) or 1
  local month = string.sub(last_day, 1, 6)
  for d = first, tonumber(string.sub(last_day, 7, 8)) do
    total = total + tonumber(redis.call('HGET', day_prefix .. month .. string.format('%02d', d), 'tokens') or '0')
  end
  return total
end

-- Pending alerts for the thresholds (ARGV from index first on) that usage crossed from old to new.
local function raise_alerts(pending_key, subject, tier, metric, period, limit, old, new, first)
  if limit <= 0 then return end
  for t = first, #ARGV do
    local at = tonumber(ARGV[t]) * limit
    if old < at and new >= at then
      local id = subject .. '|' .. metric .. '|' .. period .. '|' .. ARGV[t]
      redis.call('HSETNX', pending_key, id, cjson.encode({alert_id = id, subject = subject, tier = tier,
        metric = metric, period = period, threshold = tonumber(ARGV[t]), limit = limit, usage = new}))
    end
  end
end
"""

APPLY_WINDOW = _LIMITS_LUA + """
-- KEYS: record, user day, user month, org day, org month, user tier, user limits, tiers, pending alerts,
--       bases due
-- ARGV: n, input, output, cache_read, cache_write, window record expires at, default tier, day, month, subject,
--       day expires at, month expires at (of the late set), late event id ('' for a window total),
--       first counted day ('' with live month counters), now, last day of the month so far, thresholds...
local kinds = {'input', 'output', 'cache_read', 'cache_write'}
local n = tonumber(ARGV[1])
local added, deltas, total = 0, {}, 0
local bases = ARGV[14] ~= ''
local due = ARGV[10] .. '|' .. ARGV[9]
if bases and ARGV[8] < ARGV[14] then
  -- Older than the day counters: the aggregates count it; recompute the base once they hold it.
  redis.call('ZADD', KEYS[10], ARGV[15], due)
  return 0
end
if ARGV[13] == '' then
  -- A window's running absolute totals: add what they hold beyond the record's.
  local prev_n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
  if n <= prev_n then return 0 end
  added = n - prev_n
  for i, kind in ipairs(kinds) do
    local value = tonumber(ARGV[i + 1])
    deltas[i] = value - tonumber(redis.call('HGET', KEYS[1], kind) or '0')
    redis.call('HSET', KEYS[1], kind, value)
  end
  redis.call('HSET', KEYS[1], 'n', n)
  redis.call('EXPIREAT', KEYS[1], ARGV[6])
else
  -- A late event: once per event id in its month (in its day with month bases): the set lives
  -- as long as the counter it guards.
  if redis.call('SADD', KEYS[1], ARGV[13]) == 0 then return 0 end
  redis.call('EXPIREAT', KEYS[1], bases and ARGV[11] or ARGV[12])
  added = n
  for i = 1, 4 do deltas[i] = tonumber(ARGV[i + 1]) end
end
for i = 1, 4 do total = total + deltas[i] end
local requests_before = tonumber(redis.call('HGET', KEYS[2], 'requests') or '0')
local month_before = month_tokens(KEYS[3], string.sub(KEYS[2], 1, -9), ARGV[16])
for k = 2, 5 do
  -- With month bases the user's month key is the base: the day counter carries the usage.
  if not (bases and k == 3) then
    redis.call('HINCRBY', KEYS[k], 'requests', added)
    redis.call('HINCRBY', KEYS[k], 'tokens', total)
    for i, kind in ipairs(kinds) do
      redis.call('HINCRBY', KEYS[k], kind, deltas[i])
    end
    -- Counters live until their period ends plus a margin: memory follows active users.
    redis.call('EXPIREAT', KEYS[k], (k % 2 == 0) and ARGV[11] or ARGV[12])
  end
end
if bases then
  local cutoff = redis.call('HGET', KEYS[3], 'cutoff')
  if not cutoff or cutoff < ARGV[14] then redis.call('ZADD', KEYS[10], 'NX', ARGV[15], due) end
end
local tier, rpd, tpm = limits(KEYS[6], KEYS[7], KEYS[8], ARGV[7])
raise_alerts(KEYS[9], ARGV[10], tier, 'requests_day', ARGV[8], rpd, requests_before, requests_before + added, 17)
raise_alerts(KEYS[9], ARGV[10], tier, 'tokens_month', ARGV[9], tpm, month_before, month_before + total, 17)
return 1
"""

WRITE_BASE = _LIMITS_LUA + """
-- KEYS: user month (the base), user tier, user limits, tiers, pending alerts
-- ARGV: cutoff, expires at, default tier, month, subject, last day so far, requests, input, output, cache_read,
--       cache_write, thresholds...
-- A new base can carry the month over an alert threshold (usage Redis had left to the aggregates).
local day_prefix = string.sub(KEYS[1], 1, -10) .. ':d:'
local before = month_tokens(KEYS[1], day_prefix, ARGV[6])
local tokens = 0
for i = 8, 11 do tokens = tokens + tonumber(ARGV[i]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'cutoff', ARGV[1], 'requests', ARGV[7], 'tokens', tokens, 'input', ARGV[8],
  'output', ARGV[9], 'cache_read', ARGV[10], 'cache_write', ARGV[11])
redis.call('EXPIREAT', KEYS[1], ARGV[2])
local tier, _rpd, tpm = limits(KEYS[2], KEYS[3], KEYS[4], ARGV[3])
raise_alerts(KEYS[5], ARGV[5], tier, 'tokens_month', ARGV[4], tpm, before, month_tokens(KEYS[1], day_prefix, ARGV[6]), 12)
return 1
"""

FORGET_DUE = """
-- KEYS: bases due; ARGV: member, score read, ... (a member marked again since stays)
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= tonumber(ARGV[i + 1]) then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return 0
"""

RESTATE_MONTH = """
-- KEYS: month counter, the day counters of the month's open days; ARGV: expires at, then name, value pairs:
-- the absolute totals of the month's closed days (from the aggregates). The open days' usage is counted
-- by the flow (their window records live) and read here in the same atomic step, so an increment the
-- flow makes meanwhile is neither lost nor counted twice.
local totals = {}
for i = 2, #ARGV, 2 do totals[ARGV[i]] = tonumber(ARGV[i + 1]) end
for k = 2, #KEYS do
  local held = redis.call('HGETALL', KEYS[k])
  for i = 1, #held, 2 do totals[held[i]] = (totals[held[i]] or 0) + tonumber(held[i + 1]) end
end
redis.call('DEL', KEYS[1])
for name, value in pairs(totals) do redis.call('HSET', KEYS[1], name, value) end
redis.call('EXPIREAT', KEYS[1], ARGV[1])
return 1
"""

CHECK = _LIMITS_LUA + """
-- KEYS: user tier, user limits, tiers, user day, user month; ARGV: default tier
local tier, rpd, tpm, overage = limits(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
local requests = tonumber(redis.call('HGET', KEYS[4], 'requests') or '0')
local tokens = month_tokens(KEYS[5], string.sub(KEYS[4], 1, -9), string.sub(KEYS[4], -8))
local allowed = 1
if rpd >= 0 and requests >= rpd then allowed = 0 end
if tpm >= 0 and tokens >= tpm and overage ~= 1 then allowed = 0 end
return {allowed, tier, requests, rpd, tokens, tpm, overage}
"""


def periods(when_ms: int) -> tuple[str, str]:
    moment = datetime.fromtimestamp(when_ms / 1000, tz=timezone.utc)
    return f"{moment:%Y%m%d}", f"{moment:%Y%m}"


def usage_keys(scope: str, ident: str, when_ms: int) -> tuple[str, str]:
    """(day key, month key) of a user ('user', 'org/user') or an org ('org', 'org')."""
    day, month = periods(when_ms)
    return f"gw:usage:{scope}:{ident}:d:{day}", f"gw:usage:{scope}:{ident}:m:{month}"


def window_key(total: dict) -> str:
    return f"gw:win:{total['org_id']}/{total['user_id']}:{total['model']}:{total['window_start_ms']}"


def late_key(total: dict, per_day: bool = False) -> str:
    """The set of late event ids already counted for a user in the month of the event (in its
    day with month bases, where nothing older than the day counters is counted)."""
    day, month = periods(total['window_start_ms'])
    return f"gw:late:{total['org_id']}/{total['user_id']}:{day if per_day else month}"


def day_string(when_s: float) -> str:
    return f"{datetime.fromtimestamp(when_s, tz=timezone.utc):%Y%m%d}"


def first_counted_day(now_s: float) -> str:
    """With month bases, the oldest day whose usage Redis counts: yesterday (its counter
    lives until today ends), so a base's cutoff is never older than that."""
    return day_string(now_s - 86400)


def day_ms(day: str) -> int:
    """Epoch milliseconds of a day's (YYYYMMDD) midnight, UTC."""
    return int(datetime.strptime(day, "%Y%m%d").replace(tzinfo=timezone.utc).timestamp() * 1000)


def month_so_far(month: str, now_s: float) -> str:
    """The last day of a month (YYYYMM) that can hold usage at now_s, as YYYYMMDD."""
    today = day_string(now_s)
    return today if today.startswith(month) else f"{month}31"


def base_cutoff(month: str, now_s: float) -> str | None:
    """The cutoff day of a base written now: yesterday, or the 1st when the month began
    today; None for a month that is over (nothing enforces it any more)."""
    today = day_string(now_s)
    if month != today[:6]:
        return None
    return max(first_counted_day(now_s), f"{month}01")


def late_member(event_id: str) -> str:
    """12 bytes of the event id's hash: late ids are kept a month, so they are kept small."""
    return hashlib.blake2b(event_id.encode(), digest_size=12).hexdigest()


def period_ends(when_ms: int) -> tuple[int, int]:
    """Epoch seconds at which the day and the month containing when_ms end."""
    moment = datetime.fromtimestamp(when_ms / 1000, tz=timezone.utc)
    day = datetime(moment.year, moment.month, moment.day, tzinfo=timezone.utc) + timedelta(days=1)
    month = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=timezone.utc)
    return int(day.timestamp()), int(month.timestamp())


def tier_keys(user: str) -> tuple[str, str, str]:
    return f"gw:tier:user:{user}", f"gw:limits:user:{user}", TIERS_KEY


def first_open_day(now_s: float, horizon_s: float) -> str:
    """The oldest day (YYYYMMDD) that ended less than horizon_s ago (or has not ended): the flow
    may still hold, and the quota still remember, windows of it. Older days are closed: a
    replay of them is restated from the aggregates instead of counted again."""
    return day_string(now_s - horizon_s)


def month_days(month: str, first: str, last: str) -> list[str]:
    """The days (YYYYMMDD) of a month (YYYYMM) from first through last."""
    start = max(first, f"{month}01")
    if start[:6] != month or month > last[:6]:
        return []
    return [f"{month}{d:02d}" for d in range(int(start[6:]), int(last[6:]) + 1)]


UsageByDay = dict[tuple[str, str, str], dict[str, int]]
"""(scope 'user' or 'org', org/user or org, YYYYMMDD) -> requests and tokens by kind."""


MonthTotals = Callable[[list[tuple[str, str]], str, str], dict[tuple[str, str], dict[str, int]]]
"""(org, user) pairs, month YYYYMM, cutoff YYYYMMDD -> their totals over the month's days
before the cutoff (requests and tokens by kind), e.g. sinks.clickhouse.month_usage_before."""


def restate_month_bases(store: "QuotaStore", month_totals: MonthTotals, delay_s: float = RESTATE_DELAY_S,
                        batch: int = 2000) -> int:
    """Recompute the due month bases from the aggregates; return how many were written.
    Run it periodically next to the quota sink (absolute totals: running it twice is harmless)."""
    written = 0
    while due := store.due_bases(delay_s, batch):
        by_month: dict[str, list[tuple[str, str, float]]] = {}
        for user, month, marked in due:
            by_month.setdefault(month, []).append((user, month, marked))
        bases = []
        for month, entries in by_month.items():
            cutoff = base_cutoff(month, store.clock())
            pairs = [tuple(user.split("/", 1)) for user, _m, _at in entries]
            totals = month_totals(pairs, month, cutoff) if cutoff else {}
            bases += [(user, month, marked, totals.get(pair, {})) for (user, month, marked), pair in zip(entries, pairs)]
        written += store.write_bases(bases)
        if len(due) < batch:
            break
    return written


def with_token_total(totals: dict[str, int]) -> dict[str, int]:
    """Counters hold requests, tokens by kind and their sum, 'tokens'."""
    return {"requests": int(totals.get("requests", 0)), "tokens": sum(int(totals.get(k, 0)) for k in TOKEN_KINDS),
            **{kind: int(totals.get(kind, 0)) for kind in TOKEN_KINDS}}


class QuotaStore:
    def __init__(self, url: str, default_tier: str = "free", alert_thresholds: tuple[float, ...] = (0.8, 1.0),
                 window_ttl_s: int = WINDOW_RECORD_TTL_S, period_margin_s: int = PERIOD_MARGIN_S,
                 clock: Callable[[], float] = time.time, month_bases: bool = False):
        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.default_tier = default_tier
        self.alert_thresholds = alert_thresholds
        self.window_ttl_s = int(window_ttl_s)
        self.period_margin_s = int(period_margin_s)
        self.clock = clock  # a benchmark replaying simulated days passes their clock
        self.month_bases = month_bases
        self._apply = self.redis.register_script(APPLY_WINDOW)
        self._forget_due = self.redis.register_script(FORGET_DUE)
        self._write_base = self.redis.register_script(WRITE_BASE)

    def publish_tiers(self, tiers: dict) -> None:
        """Store tier limits where the Lua scripts (and every gateway's QuotaClient) read them."""
        mapping = {}
        for name, limits in tiers.items():
            mapping[f"{name}:requests_per_day"] = -1 if limits.requests_per_day is None else limits.requests_per_day
            mapping[f"{name}:tokens_per_month"] = -1 if limits.tokens_per_month is None else limits.tokens_per_month
            mapping[f"{name}:overage_allowed"] = int(limits.overage_allowed)
        self.redis.hset(TIERS_KEY, mapping=mapping)

    def set_tier(self, user: str, tier: str, **limits: int) -> None:
        """Assign a tier to org/user, with optional custom limits (enterprise contracts)."""
        tier_key, limits_key, _ = tier_keys(user)
        self.redis.set(tier_key, tier)
        if limits:
            self.redis.hset(limits_key, mapping=limits)

    def apply(self, totals: list[dict]) -> int:
        """Apply window totals and late adjustments (totals with an event_id) in one round
        trip; return how many changed a counter."""
        pipe = self.redis.pipeline(transaction=False)
        now = self.clock()
        for total in totals:
            user = f"{total['org_id']}/{total['user_id']}"
            late_id = total.get("event_id")
            record = late_key(total, self.month_bases) if late_id else window_key(total)
            day_end, month_end = period_ends(total["window_start_ms"])
            day, month = periods(total["window_start_ms"])
            keys = [record, *usage_keys("user", user, total["window_start_ms"]),
                    *usage_keys("org", total["org_id"], total["window_start_ms"]),
                    *tier_keys(user), PENDING_ALERTS_KEY, RESTATE_KEY]
            args = [total["n"], *(total[kind] for kind in TOKEN_KINDS), int(now) + self.window_ttl_s,
                    self.default_tier, day, month, user, day_end + self.period_margin_s,
                    month_end + self.period_margin_s, late_member(late_id) if late_id else "",
                    first_counted_day(now) if self.month_bases else "", int(now), month_so_far(month, now),
                    *self.alert_thresholds]
            self._apply(keys=keys, args=args, client=pipe)
        return sum(pipe.execute())

    def restate(self, scope: str, ident: str, when_ms: int, day: dict[str, int], month: dict[str, int]) -> None:
        """Overwrite a day and month counter with absolute totals (requests, tokens, tokens by
        kind), e.g. recomputed from the ClickHouse aggregates after a replay older than the
        window horizon: setting an absolute value twice is the same as setting it once."""
        day_key, month_key = usage_keys(scope, ident, when_ms)
        day_end, month_end = period_ends(when_ms)
        pipe = self.redis.pipeline(transaction=True)
        for key, values, ends in ((day_key, day, day_end), (month_key, month, month_end)):
            pipe.delete(key)
            pipe.hset(key, mapping={name: int(value) for name, value in values.items()})
            pipe.expireat(key, ends + self.period_margin_s)
        pipe.execute()

    def restate_closed_days(self, days: UsageByDay, months: UsageByDay, open_from: str) -> int:
        """Write absolute totals for closed days (before open_from, from the aggregates): the day
        counters of days, and the month counters of months (keyed by any day of the month,
        totals of its closed days), plus the live counters of its open days. With month bases,
        a user's month is a base: it is marked due, for restate_month_bases. Return the keys written."""
        now = self.clock()
        pipe = self.redis.pipeline(transaction=False)
        written = 0
        for (scope, ident, day), totals in days.items():
            day_end, _month_end = period_ends(day_ms(day))
            if day < open_from and day_end + self.period_margin_s > now:
                self.restate_day(pipe, scope, ident, day, totals)
                written += 1
        for (scope, ident, day), totals in months.items():
            month = day[:6]
            _day_end, month_end = period_ends(day_ms(day))
            if month_end + self.period_margin_s <= now:
                continue
            if self.month_bases and scope == "user":
                pipe.zadd(RESTATE_KEY, {f"{ident}|{month}": now - RESTATE_DELAY_S})
            else:
                month_key = usage_keys(scope, ident, day_ms(day))[1]
                open_days = [usage_keys(scope, ident, day_ms(d))[0]
                             for d in month_days(month, open_from, month_so_far(month, now))]
                pipe.eval(RESTATE_MONTH, 1 + len(open_days), month_key, *open_days, month_end + self.period_margin_s,
                          *(x for name, value in with_token_total(totals).items() for x in (name, int(value))))
            written += 1
        pipe.execute()
        return written

    def restate_day(self, pipe, scope: str, ident: str, day: str, totals: dict[str, int]) -> None:
        day_key = usage_keys(scope, ident, day_ms(day))[0]
        pipe.delete(day_key)
        pipe.hset(day_key, mapping={name: int(value) for name, value in with_token_total(totals).items()})
        pipe.expireat(day_key, period_ends(day_ms(day))[0] + self.period_margin_s)

    def due_bases(self, delay_s: float = RESTATE_DELAY_S, limit: int = 10_000) -> list[tuple[str, str, float]]:
        """(org/user, YYYYMM, marked at) of the month bases to recompute, marked delay_s ago or earlier."""
        due = self.redis.zrangebyscore(RESTATE_KEY, "-inf", self.clock() - delay_s, start=0, num=limit,
                                       withscores=True)
        return [(*member.decode().rsplit("|", 1), marked) for member, marked in due]

    def write_bases(self, bases: list[tuple[str, str, float, dict[str, int]]]) -> int:
        """Write month bases (org/user, YYYYMM, marked at, absolute totals of the month's days
        before the cutoff, requests and tokens by kind, from the aggregates), cutoff per
        base_cutoff; a mark made again since it was read stays due. Return how many written."""
        now = self.clock()
        pipe = self.redis.pipeline(transaction=False)
        written = 0
        for user, month, _marked, totals in bases:
            cutoff = base_cutoff(month, now)
            if cutoff is None:
                continue
            _day, month_key = usage_keys("user", user, day_ms(cutoff))
            # Stale, and gone, with the cutoff day's counter: the user's next request marks a new one.
            expires = period_ends(day_ms(cutoff))[0] + self.period_margin_s
            self._write_base(keys=[month_key, *tier_keys(user), PENDING_ALERTS_KEY],
                             args=[cutoff, expires, self.default_tier, month, user, month_so_far(month, now),
                                   *(int(totals.get(kind, 0)) for kind in ("requests", *TOKEN_KINDS)),
                                   *self.alert_thresholds], client=pipe)
            written += 1
        pipe.execute()
        if bases:
            self._forget_due(keys=[RESTATE_KEY], args=[x for user, month, marked, _t in bases
                                                       for x in (f"{user}|{month}", marked)])
        return written

    def pending_alerts(self) -> list[dict]:
        return [json.loads(v) for v in self.redis.hvals(PENDING_ALERTS_KEY)]

    def ack_alerts(self, alert_ids: list[str]) -> None:
        if alert_ids:
            self.redis.hdel(PENDING_ALERTS_KEY, *alert_ids)

    def usage(self, scope: str, ident: str, when_ms: int) -> dict[str, dict[str, int]]:
        """The day and month counters of when_ms; with a month base (or none yet, with month
        bases on), the month to date is the base plus the day counters from its cutoff through
        when_ms's day."""
        day_key, month_key = usage_keys(scope, ident, when_ms)
        day = {k.decode(): int(v) for k, v in self.redis.hgetall(day_key).items()}
        month = {k.decode(): v.decode() for k, v in self.redis.hgetall(month_key).items()}
        if "cutoff" not in month and (month or not self.month_bases):
            return {"day": day, "month": {k: int(v) for k, v in month.items()}}
        cutoff = month.pop("cutoff", None) or f"{periods(when_ms)[1]}01"
        totals = {k: int(v) for k, v in month.items()}
        prefix = day_key[:-8]
        pipe = self.redis.pipeline(transaction=False)
        for dd in range(int(cutoff[6:]), int(periods(when_ms)[0][6:]) + 1):
            pipe.hgetall(f"{prefix}{cutoff[:6]}{dd:02d}")
        for counted in pipe.execute():
            for k, v in counted.items():
                totals[k.decode()] = totals.get(k.decode(), 0) + int(v)
        return {"day": day, "month": totals}

    def total_tokens(self, scope: str = "user") -> int:
        """Tokens over every monthly counter of a scope (for reconciliation). With month bases
        there are no month counters: the day counters are summed instead, which holds all tokens
        only while no event is older than yesterday (the rest is in the aggregates)."""
        total = 0
        period = "d" if self.month_bases else "m"
        for key in self.redis.scan_iter(match=f"gw:usage:{scope}:*:{period}:*", count=1000):
            total += int(self.redis.hget(key, "tokens") or 0)
        return total


class QuotaWriter:
    """The quota sink's writer: window totals into the counters (``QuotaStore.apply``), then
    the alerts that crossed a threshold to the alerts topic. Alerts stay pending in Redis
    until the broker has them: a crash in between delivers them again (with the same
    alert_id) rather than never."""

    sink = "quota"

    def __init__(self, store: QuotaStore, tiers: dict, alerts: TopicWriter, retry: Retry, dead_letters: DeadLetters,
                 lateness_s: float, restate_bases: Callable[[], object] | None = None):
        self.store = store
        self.alerts = alerts
        self.retry = retry
        self.dead_letters = dead_letters
        self.lateness_s = lateness_s
        self.restate_bases = restate_bases  # with month bases: restate_month_bases over the aggregates
        retry(self.sink, lambda: store.publish_tiers(tiers))
        retry("quota_alerts", self.deliver_alerts)

    def deliver_alerts(self) -> None:
        pending = self.store.pending_alerts()
        if pending:
            self.dead_letters.send_rejected("quota_alerts", self.alerts.send(pending))
            self.store.ack_alerts([alert["alert_id"] for alert in pending])
            get_metrics().increment("gatewatch_quota_alerts", len(pending))

    def __call__(self, batches: list[list[dict]]) -> None:
        totals = [total for batch in batches for total in batch]
        self.retry(self.sink, lambda: self.store.apply(totals))
        if self.restate_bases is not None:
            self.retry("quota_bases", self.restate_bases)
        count_written(self.sink, len(totals))
        observe_freshness(self.sink, [t["window_start_ms"] + t["window_length_ms"] for t in totals], self.lateness_s)
        self.retry("quota_alerts", self.deliver_alerts)
