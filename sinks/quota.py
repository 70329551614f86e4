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
"""

APPLY_WINDOW = _LIMITS_LUA + """
-- KEYS: record, user day, user month, org day, org month, user tier, user limits, tiers, pending alerts
-- ARGV: n, input, output, cache_read, cache_write, window record expires at, default tier, day, month, subject,
--       day expires at, month expires at, late event id ('' for a window total), thresholds...
local kinds = {'input', 'output', 'cache_read', 'cache_write'}
local n = tonumber(ARGV[1])
local added, deltas, total = 0, {}, 0
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
  -- A late event: once per event id in its month (the set lives as long as the month counter).
  if redis.call('SADD', KEYS[1], ARGV[13]) == 0 then return 0 end
  redis.call('EXPIREAT', KEYS[1], ARGV[12])
  added = n
  for i = 1, 4 do deltas[i] = tonumber(ARGV[i + 1]) end
end
for i = 1, 4 do total = total + deltas[i] end
local before = {}
for k = 2, 5 do
  before[k] = {tonumber(redis.call('HGET', KEYS[k], 'requests') or '0'), tonumber(redis.call('HGET', KEYS[k], 'tokens') or '0')}
  redis.call('HINCRBY', KEYS[k], 'requests', added)
  redis.call('HINCRBY', KEYS[k], 'tokens', total)
  for i, kind in ipairs(kinds) do
    redis.call('HINCRBY', KEYS[k], kind, deltas[i])
  end
  -- Counters live until their period ends plus a margin: memory follows active users.
  redis.call('EXPIREAT', KEYS[k], (k % 2 == 0) and ARGV[11] or ARGV[12])
end
local tier, rpd, tpm = limits(KEYS[6], KEYS[7], KEYS[8], ARGV[7])
local checks = {
  {'requests_day', ARGV[8], rpd, before[2][1], before[2][1] + added},
  {'tokens_month', ARGV[9], tpm, before[3][2], before[3][2] + total},
}
for _, check in ipairs(checks) do
  local metric, period, limit, old, new = check[1], check[2], check[3], check[4], check[5]
  if limit > 0 then
    for t = 14, #ARGV do
      local at = tonumber(ARGV[t]) * limit
      if old < at and new >= at then
        local id = ARGV[10] .. '|' .. metric .. '|' .. period .. '|' .. ARGV[t]
        redis.call('HSETNX', KEYS[9], id, cjson.encode({alert_id = id, subject = ARGV[10], tier = tier,
          metric = metric, period = period, threshold = tonumber(ARGV[t]), limit = limit, usage = new}))
      end
    end
  end
end
return 1
"""

CHECK = _LIMITS_LUA + """
-- KEYS: user tier, user limits, tiers, user day, user month; ARGV: default tier
local tier, rpd, tpm, overage = limits(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
local requests = tonumber(redis.call('HGET', KEYS[4], 'requests') or '0')
local tokens = tonumber(redis.call('HGET', KEYS[5], 'tokens') or '0')
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


def late_key(total: dict) -> str:
    """The set of late event ids already counted for a user in the month of the event."""
    return f"gw:late:{total['org_id']}/{total['user_id']}:{periods(total['window_start_ms'])[1]}"


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


class QuotaStore:
    def __init__(self, url: str, default_tier: str = "free", alert_thresholds: tuple[float, ...] = (0.8, 1.0),
                 window_ttl_s: int = WINDOW_RECORD_TTL_S, period_margin_s: int = PERIOD_MARGIN_S,
                 clock: Callable[[], float] = time.time):
        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.default_tier = default_tier
        self.alert_thresholds = alert_thresholds
        self.window_ttl_s = int(window_ttl_s)
        self.period_margin_s = int(period_margin_s)
        self.clock = clock  # a benchmark replaying simulated days passes their clock
        self._apply = self.redis.register_script(APPLY_WINDOW)

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
        for total in totals:
            user = f"{total['org_id']}/{total['user_id']}"
            late_id = total.get("event_id")
            record = late_key(total) if late_id else window_key(total)
            day_end, month_end = period_ends(total["window_start_ms"])
            keys = [record, *usage_keys("user", user, total["window_start_ms"]),
                    *usage_keys("org", total["org_id"], total["window_start_ms"]),
                    *tier_keys(user), PENDING_ALERTS_KEY]
            args = [total["n"], *(total[kind] for kind in TOKEN_KINDS), int(self.clock()) + self.window_ttl_s,
                    self.default_tier,
                    *periods(total["window_start_ms"]), user, day_end + self.period_margin_s,
                    month_end + self.period_margin_s, late_member(late_id) if late_id else "",
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

    def pending_alerts(self) -> list[dict]:
        return [json.loads(v) for v in self.redis.hvals(PENDING_ALERTS_KEY)]

    def ack_alerts(self, alert_ids: list[str]) -> None:
        if alert_ids:
            self.redis.hdel(PENDING_ALERTS_KEY, *alert_ids)

    def usage(self, scope: str, ident: str, when_ms: int) -> dict[str, dict[str, int]]:
        day, month = usage_keys(scope, ident, when_ms)
        return {name: {k.decode(): int(v) for k, v in self.redis.hgetall(key).items()}
                for name, key in (("day", day), ("month", month))}

    def total_tokens(self, scope: str = "user") -> int:
        """Tokens over every monthly counter of a scope (for reconciliation)."""
        total = 0
        for key in self.redis.scan_iter(match=f"gw:usage:{scope}:*:m:*", count=1000):
            total += int(self.redis.hget(key, "tokens") or 0)
        return total


class QuotaWriter:
    """The quota sink's writer: window totals into the counters (``QuotaStore.apply``), then
    the alerts that crossed a threshold to the alerts topic. Alerts stay pending in Redis
    until the broker has them: a crash in between delivers them again (with the same
    alert_id) rather than never."""

    sink = "quota"

    def __init__(self, store: QuotaStore, tiers: dict, alerts: TopicWriter, retry: Retry, dead_letters: DeadLetters,
                 lateness_s: float):
        self.store = store
        self.alerts = alerts
        self.retry = retry
        self.dead_letters = dead_letters
        self.lateness_s = lateness_s
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
        count_written(self.sink, len(totals))
        observe_freshness(self.sink, [t["window_start_ms"] + t["window_length_ms"] for t in totals], self.lateness_s)
        self.retry("quota_alerts", self.deliver_alerts)
