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

Month bases (the default; QuotaStore(month_bases=False) keeps a month counter per user): a
live month counter per user lives until its month ends, so Redis grows with the users seen
this month, not with those active now (a long tail of occasional users grows it every day).
With month bases Redis instead counts only the days whose day counters are alive (yesterday
and today) and keeps, per recently active user, a base: the absolute month-to-date totals of
the days before a cutoff day, read from the ClickHouse daily aggregates. A user's month is
then base + the day counters from the cutoff on, which splits the month at a day boundary, so
no event is counted on both sides; the Lua month_usage is the one definition of it, read by
enforcement (CHECK), alerts, QuotaStore.month_usage and every report. Writing a base is
idempotent (absolute totals).
- A user without a base (new this month, or back after a day or more away) gets one at once:
  the quota sink writes the bases its batch lacks right after applying it, and a gateway's
  QuotaClient given the aggregates writes it before deciding (fill_month_bases). The days a
  base holds ended before yesterday, so the aggregates hold them already: nothing waits,
  and enforcement never sees a returning user's month without its earlier days.
- An event dated before yesterday is left to the aggregates: Redis does not count it and
  marks the user's base and the org's month counter for a recomputation once the aggregates
  hold it (restate_month_bases, RESTATE_DELAY_S later): org month counters are live counters
  (one per org and month) restated as the aggregates' days before yesterday + the org's day
  counters from yesterday on.
Every user key then lives at most a couple of days after its user's last request.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import logging
import time
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from operator import itemgetter
from typing import TYPE_CHECKING, Callable, Iterable

import redis

from schemas.vocabulary import TOKEN_KINDS
from sinks.metrics import count_written, get_metrics, observe_freshness
from sinks.retry import Retry

if TYPE_CHECKING:
    from sinks.dlq import DeadLetters
    from sinks.kafka import TopicWriter

log = logging.getLogger(__name__)

WINDOW_RECORD_TTL_S = 2 * 3600
"""Default life of a window's idempotency record; the flow passes twice its own horizon."""
PERIOD_MARGIN_S = 86400
"""Day and month counters outlive their period by this much (status, late alerts, reconciliation)."""
TIERS_KEY = "gw:tiers"
PENDING_ALERTS_KEY = "gw:alerts:pending"
RESTATE_KEY = "gw:bases:due"
"""Sorted set of 'org/user|YYYYMM' whose month base is stale (an event Redis left to the
aggregates, a replay), scored by when marked. A missing base is written at once instead
(fill_month_bases): the days before yesterday are in the aggregates already."""
RECENT_PREFIX = "gw:recent:"
"""Per org, a sorted set of its window records and late adjustments by window start, trimmed
to the window records' life: what restating an open day reads as the part the flow counts."""
ORG_RESTATE_KEY = "gw:orgmonths:due"
"""Sorted set of 'org|YYYYMM' whose month counter misses an event Redis left to the aggregates."""
RESTATE_DELAY_S = 120
"""A stale base or org month is recomputed this long after its mark, so the aggregates hold
what Redis left to them."""

# Limits of a user: its own override hash, else its tier's (tier from gw:tier:..., else the
# default tier). -1 means unlimited.
_LIMITS_LUA = """
-- Locals: a global's lookup on every use is a measurable part of a script applying many totals.
local call, tonumber, unpack = redis.call, tonumber, unpack
-- In the scripts' hot paths `text + 0` reads a number: Lua's arithmetic reads it with one strtod, tonumber()
-- costs Redis three times as much, and ipairs() four times a numeric for.
local LIMITS = {'requests_per_day', 'tokens_per_month', 'overage_allowed'}
-- shared_by_tier (optional): the tiers' limits read so far, for a script that reads many users' limits.
local function limits(tier_key, override_key, tiers_key, default_tier, shared_by_tier)
  -- Most users have neither a tier of their own nor an override: one EXISTS of both tells.
  local own_keys = call('EXISTS', tier_key, override_key)
  local own_tier = own_keys > 0 and call('GET', tier_key)
  local tier = own_tier or default_tier
  local shared = shared_by_tier and shared_by_tier[tier]
  if not shared then
    local held = call('HMGET', tiers_key, tier .. ':' .. LIMITS[1], tier .. ':' .. LIMITS[2], tier .. ':' .. LIMITS[3])
    shared = {tonumber(held[1] or '-1'), tonumber(held[2] or '-1'), tonumber(held[3] or '-1')}
    if shared_by_tier then shared_by_tier[tier] = shared end
  end
  if own_keys == 0 or own_keys == 1 and own_tier then return tier, shared[1], shared[2], shared[3] end
  local own = call('HMGET', override_key, unpack(LIMITS))
  local function limit(i)
    if own[i] then return tonumber(own[i]) end
    return shared[i]
  end
  return tier, limit(1), limit(2), limit(3)
end

-- The month to date of a user or org (requests, tokens, tokens by kind, in USAGE_FIELDS order; with names,
-- those fields only) and whether its month key exists: a live month counter holds it all; a month base
-- holds the days before its cutoff and the day counters from the cutoff through last_day (YYYYMMDD) the
-- rest; no month key: every day counter of the month that is still alive. The one definition of a month:
-- enforcement, alerts and every reader (QuotaStore.month_usage) use it. With whole = {key = a day key}, that
-- day's counter, if the month counts it, is read whole into whole.held (USAGE_FIELDS, false when absent):
-- a caller about to update it need not read it again.
local USAGE_FIELDS = {'requests', 'tokens', 'input', 'output', 'cache_read', 'cache_write'}
local DAYS = {'01', '02', '03', '04', '05', '06', '07', '08', '09', '10', '11', '12', '13', '14', '15', '16', '17',
  '18', '19', '20', '21', '22', '23', '24', '25', '26', '27', '28', '29', '30', '31'}
local USAGE_INDEX = {requests = 1, tokens = 2, input = 3, output = 4, cache_read = 5, cache_write = 6}
local function month_usage(month_key, day_prefix, last_day, names, whole)
  names = names or USAGE_FIELDS
  local base = call('HMGET', month_key, 'cutoff', unpack(names))
  local totals, exists = {}, base[1] ~= false
  for i = 1, #names do
    totals[i] = (base[i + 1] or 0) + 0
    exists = exists or base[i + 1] ~= false
  end
  if not exists and #names < #USAGE_FIELDS then
    -- Whether the key holds any other usage field (a counter restated without this one).
    local asked, others = {}, {}
    for _, name in ipairs(names) do asked[name] = true end
    for _, name in ipairs(USAGE_FIELDS) do
      if not asked[name] then others[#others + 1] = name end
    end
    for _, held in ipairs(call('HMGET', month_key, unpack(others))) do exists = exists or held ~= false end
  end
  if exists and not base[1] then return totals, true end
  local first = base[1] and string.sub(base[1], 7, 8) + 0 or 1
  local month = string.sub(last_day, 1, 6)
  for d = first, string.sub(last_day, 7, 8) + 0 do
    local day_key = day_prefix .. month .. DAYS[d]
    local day
    if whole and day_key == whole.key then
      whole.held = call('HMGET', day_key, unpack(USAGE_FIELDS))
      day = {}
      for i = 1, #names do day[i] = whole.held[USAGE_INDEX[names[i]]] end
    else
      day = call('HMGET', day_key, unpack(names))
    end
    for i = 1, #names do totals[i] = totals[i] + (day[i] or 0) end
  end
  return totals, exists
end

local TOKENS = {'tokens'}
local function month_tokens(month_key, day_prefix, last_day, whole)
  return month_usage(month_key, day_prefix, last_day, TOKENS, whole)[1]
end

-- The alert thresholds from ARGV[first] on (through ARGV[last], else the end), as text and value.
local function thresholds_at(first, last)
  local thresholds = {}
  for t = first, last or #ARGV do thresholds[#thresholds + 1] = {text = ARGV[t], value = tonumber(ARGV[t])} end
  return thresholds
end

-- Pending alerts for the thresholds that usage crossed from old to new.
local function raise_alerts(pending_key, subject, tier, metric, period, limit, old, new, thresholds)
  if limit <= 0 then return end
  for t = 1, #thresholds do
    local threshold = thresholds[t]
    local at = threshold.value * limit
    if old < at and new >= at then
      local id = subject .. '|' .. metric .. '|' .. period .. '|' .. threshold.text
      call('HSETNX', pending_key, id, cjson.encode({alert_id = id, subject = subject, tier = tier,
        metric = metric, period = period, threshold = threshold.value, limit = limit, usage = new}))
    end
  end
end
"""

APPLY_WINDOWS = _LIMITS_LUA + """
-- KEYS: tiers, pending alerts, user bases due, org months due
-- ARGV: window records expire at, default tier, first counted day ('' with live month counters), now,
--       recent windows kept from (ms), T, T thresholds, P, then P periods of 6 (window start (ms), day, month,
--       day counters expire at, month counters expire at, last day of the month so far), then the totals, 10 each
--       (org, user, model, window start (ms), n, input, output, cache_read, cache_write, late event id's member,
--       '' for a window total); returns how many totals changed a counter.
-- The totals apply one after the other, as many calls of one total would: a user's counters, its window records
-- and its alerts see what the totals before it in the call wrote. Only the org counters and recent-window
-- indexes, which no total reads, get the call's sums once per key at its end: most of a call's totals share a
-- few orgs. Keys are built here from the totals' parts (as month_usage builds its day keys). A flow applies
-- about one total per two events: each redis.call (~1-2 µs of Redis, half of it turning the reply into Lua),
-- each field read and each tonumber (~0.1 µs) counts.
local kinds = {'input', 'output', 'cache_read', 'cache_write'}
local records_expire, default_tier, first_counted, now, recent_from = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local bases = first_counted ~= ''
local thresholds_last = 6 + tonumber(ARGV[6])
local thresholds = thresholds_at(7, thresholds_last)
local periods, at = {}, thresholds_last + 1
for i = at + 1, at + 6 * tonumber(ARGV[at]), 6 do
  periods[ARGV[i]] = {day = ARGV[i + 1], month = ARGV[i + 2], day_expires = ARGV[i + 3],
    month_expires = ARGV[i + 4], so_far = ARGV[i + 5]}
end
local first_total = at + 1 + 6 * tonumber(ARGV[at])

-- A counter := its fields as read (held, in USAGE_FIELDS order) + requests added and tokens by kind: requests
-- and tokens always, a kind when it changed (changed[i], else when its delta is not 0). No requests before
-- means a new counter: it gets every field and its expiry (its period's end plus a margin: memory follows
-- active users; every writer of a counter sets that expiry). Returns the requests before.
local function add_to_counter(key, held, added, deltas, expires, changed)
  local requests = (held[1] or 0) + 0
  local new = requests == 0
  local tokens = (held[2] or 0) + deltas[1] + deltas[2] + deltas[3] + deltas[4]
  local fields = {'requests', requests + added, 'tokens', tokens}
  for i = 1, 4 do
    if new or deltas[i] ~= 0 or changed and changed[i] then
      fields[#fields + 1] = kinds[i]
      fields[#fields + 1] = (held[i + 2] or 0) + deltas[i]
    end
  end
  call('HSET', key, unpack(fields))
  if new then call('EXPIREAT', key, expires) end
  return requests
end

local function counter(key)
  return call('HMGET', key, unpack(USAGE_FIELDS))
end

-- The call's sums per org and period (in first-seen order), for the org's day and month counters, and its
-- new members per org's recent-window index.
local org_sums, org_sums_by, recent, recent_orgs = {}, {}, {}, {}
local function add_to_org(org, period, added, deltas)
  local of_org = org_sums_by[org]
  if not of_org then
    of_org = {}
    org_sums_by[org] = of_org
  end
  local sums = of_org[period]
  if not sums then
    sums = {org = org, period = period, added = 0, deltas = {0, 0, 0, 0}, changed = {}}
    of_org[period] = sums
    org_sums[#org_sums + 1] = sums
  end
  sums.added = sums.added + added
  for i = 1, 4 do
    sums.deltas[i] = sums.deltas[i] + deltas[i]
    sums.changed[i] = sums.changed[i] or deltas[i] ~= 0
  end
end
local function add_recent(org, score, member)
  local members = recent[org]
  if not members then
    members = {}
    recent[org] = members
    recent_orgs[#recent_orgs + 1] = org
  end
  if member then
    members[#members + 1] = score
    members[#members + 1] = member
  end
end

local user_limits, shared_limits = {}, {}
local function limits_of(subject)
  local held = user_limits[subject]
  if not held then
    held = {limits('gw:tier:user:' .. subject, 'gw:limits:user:' .. subject, KEYS[1], default_tier, shared_limits)}
    user_limits[subject] = held
  end
  return held[1], held[2], held[3]
end

-- Tables every total reuses: its deltas by kind, and its user's day counter as month_tokens reads it.
local deltas, whole_day = {}, {}
local function apply_total(i)
  local org, model, start, n, late = ARGV[i], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4] + 0, ARGV[i + 9]
  local subject = org .. '/' .. ARGV[i + 1]
  local period = periods[start]
  if bases and period.day < first_counted then
    -- Older than the day counters: the aggregates count it; recompute the user's base and the org's
    -- month counter from them once they hold it.
    call('ZADD', KEYS[3], now, subject .. '|' .. period.month)
    call('ZADD', KEYS[4], now, org .. '|' .. period.month)
    return 0
  end
  local added, recent_member = n, nil
  if late == '' then
    -- A window's running absolute totals: add what they hold beyond the record's.
    local record = 'gw:win:' .. subject .. ':' .. model .. ':' .. start
    local held = call('HMGET', record, 'n', unpack(kinds))
    local prev_n = (held[1] or 0) + 0
    if n <= prev_n then return 0 end
    if prev_n == 0 then recent_member = 'w|' .. #subject .. '|' .. record end
    added = n - prev_n
    -- The record gets n and the kinds whose text changed (the same hash as writing them all).
    local fields = {'n', ARGV[i + 4]}
    for k = 1, 4 do
      local value, was = ARGV[i + 4 + k], held[k + 1]
      if value == was then
        deltas[k] = 0
      else
        deltas[k] = value - (was or 0)
        fields[#fields + 1] = kinds[k]
        fields[#fields + 1] = value
      end
    end
    call('HSET', record, unpack(fields))
    call('EXPIREAT', record, records_expire)
  else
    -- A late event: once per event id in its month (in its day with month bases): the set lives
    -- as long as the counter it guards.
    local late_key = 'gw:late:' .. subject .. ':' .. (bases and period.day or period.month)
    if call('SADD', late_key, late) == 0 then return 0 end
    call('EXPIREAT', late_key, bases and period.day_expires or period.month_expires)
    for k = 1, 4 do deltas[k] = ARGV[i + 4 + k] + 0 end
    recent_member = table.concat({'l', ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8], late,
      subject}, '|')
  end
  add_recent(org, start, recent_member)
  local day_prefix = 'gw:usage:user:' .. subject .. ':d:'
  local day_key, month_key = day_prefix .. period.day, 'gw:usage:user:' .. subject .. ':m:' .. period.month
  whole_day.key, whole_day.held = day_key, nil
  local month_before = month_tokens(month_key, day_prefix, period.so_far, whole_day)
  local requests_before = add_to_counter(day_key, whole_day.held or counter(day_key), added, deltas,
    period.day_expires)
  -- With month bases the user's month key is the base: the day counter carries the usage.
  if not bases then add_to_counter(month_key, counter(month_key), added, deltas, period.month_expires) end
  add_to_org(org, period, added, deltas)
  if #thresholds > 0 then
    local tokens = deltas[1] + deltas[2] + deltas[3] + deltas[4]
    local tier, rpd, tpm = limits_of(subject)
    raise_alerts(KEYS[2], subject, tier, 'requests_day', period.day, rpd, requests_before, requests_before + added,
      thresholds)
    raise_alerts(KEYS[2], subject, tier, 'tokens_month', period.month, tpm, month_before, month_before + tokens,
      thresholds)
  end
  return 1
end

local changed_totals = 0
for i = first_total, #ARGV, 10 do changed_totals = changed_totals + apply_total(i) end
for _, sums in ipairs(org_sums) do
  local prefix, period = 'gw:usage:org:' .. sums.org, sums.period
  for _, key_expires in ipairs({{prefix .. ':d:' .. period.day, period.day_expires},
                                {prefix .. ':m:' .. period.month, period.month_expires}}) do
    local key = key_expires[1]
    add_to_counter(key, counter(key), sums.added, sums.deltas, key_expires[2], sums.changed)
  end
end
for _, org in ipairs(recent_orgs) do
  local key, members = 'gw:recent:' .. org, recent[org]
  for from = 1, #members, 1000 do
    call('ZADD', key, unpack(members, from, math.min(from + 999, #members)))
  end
  call('ZREMRANGEBYSCORE', key, '-inf', '(' .. recent_from)
  call('EXPIREAT', key, records_expire)
end
return changed_totals
"""

WRITE_BASES = _LIMITS_LUA + """
-- KEYS: tiers, pending alerts
-- ARGV: cutoff, expires at, default tier, month, last day so far, T, T thresholds, then per base 6: subject
--       (org/user), requests, input, output, cache_read, cache_write; returns how many bases written.
-- Every base of a call is of one month (a base is only written for the month under way), so the month's
-- cutoff and expiry come once. Keys are built here from the subject (as APPLY_WINDOWS builds them): one
-- call per many users costs the sink a fraction of a call per user.
-- A new base can carry the month over an alert threshold (usage Redis had left to the aggregates).
local cutoff, expires, default_tier, month, so_far = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local thresholds_last = 6 + tonumber(ARGV[6])
local thresholds = thresholds_at(7, thresholds_last)
local shared_limits, written = {}, 0
for i = thresholds_last + 1, #ARGV, 6 do
  local subject = ARGV[i]
  local prefix = 'gw:usage:user:' .. subject
  local month_key, day_prefix = prefix .. ':m:' .. month, prefix .. ':d:'
  local before = month_tokens(month_key, day_prefix, so_far)
  local tokens = 0
  for k = i + 2, i + 5 do tokens = tokens + tonumber(ARGV[k]) end
  call('DEL', month_key)
  call('HSET', month_key, 'cutoff', cutoff, 'requests', ARGV[i + 1], 'tokens', tokens, 'input', ARGV[i + 2],
    'output', ARGV[i + 3], 'cache_read', ARGV[i + 4], 'cache_write', ARGV[i + 5])
  call('EXPIREAT', month_key, expires)
  local tier, _rpd, tpm = limits('gw:tier:user:' .. subject, 'gw:limits:user:' .. subject, KEYS[1], default_tier,
    shared_limits)
  raise_alerts(KEYS[2], subject, tier, 'tokens_month', month, tpm, before, month_tokens(month_key, day_prefix, so_far),
    thresholds)
  written = written + 1
end
return written
"""

MISSING_KEYS = """
-- KEYS: any keys; returns the (1-based) positions of those that do not exist
local missing = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then missing[#missing + 1] = i end
end
return missing
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

RESTATE_OPEN_DAY = """
-- KEYS: the org's recent windows; ARGV: from (ms), day start (ms), day end (ms), day (YYYYMMDD), expires at, org,
--   then per subject ('' the org, else org/user) its requests, input, output, cache_read, cache_write of the
--   day before `from` (from the aggregates).
-- Each subject's day counter := those totals + what the flow counted from `from` on (its window records and
-- late adjustments, read in the same atomic step, so an increment the flow makes meanwhile is neither lost
-- nor counted twice).
local totals = {}
local function add(subject, values)
  local held = totals[subject] or {0, 0, 0, 0, 0}
  for i = 1, 5 do held[i] = held[i] + tonumber(values[i] or '0') end
  totals[subject] = held
end
add('', {})
for i = 7, #ARGV, 6 do add(ARGV[i], {ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]}) end
local low = math.max(tonumber(ARGV[1]), tonumber(ARGV[2]))
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], low, '(' .. ARGV[3])) do
  local values, user
  if string.sub(member, 1, 2) == 'w|' then
    local length, record = string.match(member, '^w|(%d+)|(.*)$')
    user = string.sub(record, 8, 7 + tonumber(length))
    local held = redis.call('HMGET', record, 'n', 'input', 'output', 'cache_read', 'cache_write')
    if held[1] then values = held end
  else
    local n, input, output, cache_read, cache_write, _id, who = string.match(member,
      '^l|(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|([^|]*)|(.*)$')
    values, user = {n, input, output, cache_read, cache_write}, who
  end
  if values then
    add(user, values)
    add('', values)
  end
end
local written = 0
for subject, held in pairs(totals) do
  written = written + 1
  local key = subject == '' and ('gw:usage:org:' .. ARGV[6] .. ':d:' .. ARGV[4])
    or ('gw:usage:user:' .. subject .. ':d:' .. ARGV[4])
  redis.call('DEL', key)
  redis.call('HSET', key, 'requests', held[1], 'tokens', held[2] + held[3] + held[4] + held[5], 'input', held[2],
    'output', held[3], 'cache_read', held[4], 'cache_write', held[5])
  redis.call('EXPIREAT', key, ARGV[5])
end
return written
"""

MONTH_USAGE = _LIMITS_LUA + """
-- KEYS: month key; ARGV: day key prefix (up to the YYYYMMDD), last day so far
local totals, exists = month_usage(KEYS[1], ARGV[1], ARGV[2])
return totals
"""

CHECK = _LIMITS_LUA + """
-- KEYS: user tier, user limits, tiers, user day, user month; ARGV: default tier
-- The last value says whether the month key exists (with month bases: whether the base is there).
local tier, rpd, tpm, overage = limits(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
local requests = tonumber(redis.call('HGET', KEYS[4], 'requests') or '0')
local month, has_month = month_usage(KEYS[5], string.sub(KEYS[4], 1, -9), string.sub(KEYS[4], -8))
local tokens = month[2]
local allowed = 1
if rpd >= 0 and requests >= rpd then allowed = 0 end
if tpm >= 0 and tokens >= tpm and overage ~= 1 then allowed = 0 end
return {allowed, tier, requests, rpd, tokens, tpm, overage, has_month and 1 or 0}
"""


APPLY_KEYS = (TIERS_KEY, PENDING_ALERTS_KEY, RESTATE_KEY, ORG_RESTATE_KEY)
APPLY_CHUNK = 100
"""Totals per APPLY_WINDOWS call. Redis serves no one else while a script runs (a gateway's
CHECK waits): 100 new windows hold it ~3-5 ms (a pipeline of one call per total let other
clients in between its 16 KB reads, every ~25 totals). Larger calls save little: 250 totals
~4% fewer instructions per total, 2,000 ~7% (callgrind on redis-server)."""
_TOTAL_ARGS = itemgetter("org_id", "user_id", "model", "window_start_ms", "n", *TOKEN_KINDS)
"""A total's arguments to APPLY_WINDOWS, before its late event's member."""


# The calendar of a moment is cached: a flush's totals share a handful of window starts, and
# formatting them was ~20 µs of every total's 75 (bench quota).
@lru_cache(maxsize=4096)
def periods(when_ms: int) -> tuple[str, str]:
    moment = datetime.fromtimestamp(when_ms / 1000, tz=timezone.utc)
    return f"{moment:%Y%m%d}", f"{moment:%Y%m}"


def usage_keys(scope: str, ident: str, when_ms: int) -> tuple[str, str]:
    """(day key, month key) of a user ('user', 'org/user') or an org ('org', 'org')."""
    day, month = periods(when_ms)
    return f"gw:usage:{scope}:{ident}:d:{day}", month_key(scope, ident, month)


def month_key(scope: str, ident: str, month: str) -> str:
    """The month (YYYYMM) counter's key of a user or an org, as usage_keys names it."""
    return f"gw:usage:{scope}:{ident}:m:{month}"


def window_key(total: dict) -> str:
    return f"gw:win:{total['org_id']}/{total['user_id']}:{total['model']}:{total['window_start_ms']}"


def recent_member_subject(member: str) -> str:
    """The 'org/user' of a member of an org's recent-window index (APPLY_WINDOWS writes
    'w|<len(subject)>|<window record key>' and 'l|n|tokens by kind...|event id|subject')."""
    if member.startswith("w|"):
        length, _, record = member[2:].partition("|")
        return record[len("gw:win:"):len("gw:win:") + int(length)]
    return member.split("|", 7)[7]


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


@lru_cache(maxsize=1024)
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


@lru_cache(maxsize=4096)
def period_ends(when_ms: int) -> tuple[int, int]:
    """Epoch seconds at which the day and the month containing when_ms end."""
    moment = datetime.fromtimestamp(when_ms / 1000, tz=timezone.utc)
    day = datetime(moment.year, moment.month, moment.day, tzinfo=timezone.utc) + timedelta(days=1)
    month = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=timezone.utc)
    return int(day.timestamp()), int(month.timestamp())


def tier_keys(user: str) -> tuple[str, str, str]:
    return f"gw:tier:user:{user}", f"gw:limits:user:{user}", TIERS_KEY


def open_windows_from_ms(now_s: float, horizon_s: float, length_ms: int) -> int:
    """The window start (ms) from which every window of a user may still be re-emitted by the
    flow and still has its record (written at or after its start, each record lives twice the
    horizon): a replay counts those through the quota sink; older ones of a day still open
    are restated from the aggregates (restate_open_day)."""
    at_ms = int((now_s - horizon_s) * 1000)
    return at_ms - at_ms % length_ms


def first_open_day(now_s: float, horizon_s: float) -> str:
    """The oldest day (YYYYMMDD) that ended less than horizon_s ago (or has not ended): the flow
    may still hold, and the quota still remember, windows of it. Older days are closed: a
    replay of them is restated from the aggregates instead of counted again."""
    return day_string(now_s - horizon_s)


def month_days(month: str, first: str, last: str) -> list[str]:
    """The days (YYYYMMDD) of a month (YYYYMM) from first through last (the month's last day
    at most: month_so_far's YYYYMM31 of a month that is over stands for its whole month)."""
    start = max(first, f"{month}01")
    if start[:6] != month or month > last[:6]:
        return []
    month_length = calendar.monthrange(int(month[:4]), int(month[4:]))[1]
    return [f"{month}{d:02d}" for d in range(int(start[6:]), min(int(last[6:]), month_length) + 1)]


UsageByDay = dict[tuple[str, str, str], dict[str, int]]
"""(scope 'user' or 'org', org/user or org, YYYYMMDD) -> requests and tokens by kind."""


MonthTotals = Callable[[list[tuple[str, str]], str, str], dict[tuple[str, str], dict[str, int]]]
"""(org, user) pairs, month YYYYMM, cutoff YYYYMMDD -> their totals over the month's days
before the cutoff (requests and tokens by kind), e.g. sinks.clickhouse.month_usage_before."""


OrgMonthTotals = Callable[[list[str], str, str], dict[str, dict[str, int]]]
"""Orgs, month YYYYMM, cutoff YYYYMMDD -> their totals over the month's days before the
cutoff, e.g. sinks.clickhouse.org_month_usage_before."""


def has_days_before(month: str, cutoff: str | None) -> bool:
    """Whether a month (YYYYMM) has days before a cutoff day (YYYYMMDD; None: no cutoff)."""
    return cutoff is not None and cutoff > f"{month}01"


def month_bases_for(store: "QuotaStore", month_totals: MonthTotals, due: list[tuple[str, str, float | None]]
                    ) -> list[tuple[str, str, float | None, dict[str, int]]]:
    """(org/user, month, marked at, totals before the cutoff) for write_bases, one query per month
    that has days before its cutoff (on its 1st and 2nd none: every user's base is empty then,
    and every user active on the 1st needs one)."""
    by_month: dict[str, list[tuple[str, str, float | None]]] = {}
    for entry in due:
        by_month.setdefault(entry[1], []).append(entry)
    bases = []
    for month, entries in by_month.items():
        cutoff = base_cutoff(month, store.clock())
        pairs = [tuple(user.split("/", 1)) for user, _m, _at in entries]
        totals = month_totals(pairs, month, cutoff) if has_days_before(month, cutoff) else {}
        bases += [(user, month, marked, totals.get(pair, {})) for (user, month, marked), pair in zip(entries, pairs)]
    return bases


def fill_month_bases(store: "QuotaStore", month_totals: MonthTotals, users: Iterable[str]) -> int:
    """Write, now, the month base of every user (org/user) who has none this month: a user
    returning after days away is then never under-counted for longer than one write (the
    quota sink calls this after each batch; a gateway's QuotaClient before deciding). The
    base's days end before yesterday, long complete in the aggregates, so nothing waits;
    stale marks stay for restate_month_bases. Return how many were written."""
    missing = store.missing_bases(users)
    return store.write_bases(month_bases_for(store, month_totals, [(u, m, None) for u, m in missing]), forget=False)


def restate_month_bases(store: "QuotaStore", month_totals: MonthTotals, delay_s: float = RESTATE_DELAY_S,
                        batch: int = 2000, org_totals: OrgMonthTotals | None = None) -> int:
    """Recompute the stale month bases, and with org_totals the org month counters that miss an
    event left to the aggregates, marked delay_s ago or earlier; return how many were written.
    Run it periodically next to the quota sink (absolute totals: running it twice is harmless)."""
    written = 0
    while due := store.due_bases(delay_s, batch):
        written += store.write_bases(month_bases_for(store, month_totals, due))
        if len(due) < batch:
            break
    while org_totals is not None and (due := store.due_bases(delay_s, batch, ORG_RESTATE_KEY)):
        written += store.restate_org_months(due, org_totals)
        if len(due) < batch:
            break
    return written


def users_of_month(totals: Iterable[dict], month: str) -> set[str]:
    """The org/users of the totals dated in a month (YYYYMM)."""
    return {f"{total['org_id']}/{total['user_id']}" for total in totals
            if periods(total["window_start_ms"])[1] == month}


def keep_month_bases(store: "QuotaStore", month_totals: MonthTotals, org_totals: OrgMonthTotals | None,
                     users: Iterable[str]) -> int:
    """The quota sink's part after each batch: missing bases of the batch's users now, stale
    ones and org months once their delay passed."""
    return fill_month_bases(store, month_totals, users) + restate_month_bases(store, month_totals,
                                                                              org_totals=org_totals)


def month_cutoff(month: str, now_s: float) -> str | None:
    """The first day of a month (YYYYMM) whose counters Redis still counts when restating its
    month counter at now_s (the days before come from the aggregates): yesterday within the
    month, its 1st if the month began today, the next month's 1st for a month that is over;
    None for a month to come."""
    first_counted = first_counted_day(now_s)
    if month > day_string(now_s)[:6]:
        return None
    if first_counted[:6] > month:
        return next_month(month) + "01"
    return max(first_counted, f"{month}01")


def next_month(month: str) -> str:
    year, number = int(month[:4]), int(month[4:])
    return f"{year + number // 12}{number % 12 + 1:02d}"


USAGE_FIELDS = ("requests", "tokens", *TOKEN_KINDS)
"""The fields of a counter, in the order of the Lua scripts' USAGE_FIELDS."""
USAGE_COUNTED = ("requests", *TOKEN_KINDS)
"""The fields a base or a restatement is given ('tokens' is their sum)."""


def with_token_total(totals: dict[str, int]) -> dict[str, int]:
    """Counters hold requests, tokens by kind and their sum, 'tokens'."""
    return {"requests": int(totals.get("requests", 0)), "tokens": sum(int(totals.get(k, 0)) for k in TOKEN_KINDS),
            **{kind: int(totals.get(kind, 0)) for kind in TOKEN_KINDS}}


class QuotaStore:
    def __init__(self, url: str, default_tier: str = "free", alert_thresholds: tuple[float, ...] = (0.8, 1.0),
                 window_ttl_s: int = WINDOW_RECORD_TTL_S, period_margin_s: int = PERIOD_MARGIN_S,
                 clock: Callable[[], float] = time.time, month_bases: bool = True, counts_from_ms: int | None = None,
                 apply_chunk: int = APPLY_CHUNK):
        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.default_tier = default_tier
        self.alert_thresholds = alert_thresholds
        self.window_ttl_s = int(window_ttl_s)
        self.period_margin_s = int(period_margin_s)
        self.clock = clock  # a benchmark replaying simulated days passes their clock
        self.month_bases = month_bases
        self.counts_from_ms = counts_from_ms  # a replay of open days: what is older is restated (restate_open_day)
        self.apply_chunk = apply_chunk
        self._apply = self.redis.register_script(APPLY_WINDOWS)
        self._forget_due = self.redis.register_script(FORGET_DUE)
        self._write_bases = self.redis.register_script(WRITE_BASES)
        self._month_usage = self.redis.register_script(MONTH_USAGE)
        self._missing_keys = self.redis.register_script(MISSING_KEYS)

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
        trip, APPLY_CHUNK totals per script call; return how many changed a counter."""
        now = self.clock()
        if self.counts_from_ms is not None:
            totals = [total for total in totals if total["window_start_ms"] >= self.counts_from_ms]
        if not totals:
            return 0
        head = [int(now) + self.window_ttl_s, self.default_tier, first_counted_day(now) if self.month_bases else "",
                int(now), int((now - self.window_ttl_s) * 1000), len(self.alert_thresholds), *self.alert_thresholds]
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(totals), self.apply_chunk):
            chunk = totals[start:start + self.apply_chunk]
            args = [*head, *self.period_args({total["window_start_ms"] for total in chunk}, now)]
            for total in chunk:
                args += _TOTAL_ARGS(total)
                event_id = total.get("event_id")
                args.append(late_member(event_id) if event_id else "")
            self._apply(keys=APPLY_KEYS, args=args, client=pipe)
        return sum(pipe.execute())

    def period_args(self, window_starts: set[int], now: float) -> list:
        """APPLY_WINDOWS's periods: how many, then per window start its day and month, when their
        counters expire, and the last day of the month so far."""
        args: list = [len(window_starts)]
        for start in window_starts:
            (day, month), (day_end, month_end) = periods(start), period_ends(start)
            args += [start, day, month, day_end + self.period_margin_s, month_end + self.period_margin_s,
                     month_so_far(month, now)]
        return args

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
                self.restate_months({(scope, ident, day): totals}, {month: open_from}, pipe)
            written += 1
        pipe.execute()
        return written

    def restate_open_day(self, org: str, day: str, from_ms: int, closed: dict[str, dict[str, int]]) -> int:
        """Restate the day counters of an org and of its users for a day (YYYYMMDD) that is still
        open: the totals before from_ms (closed, keyed '' for the org and org/user for a user,
        from the aggregates: their window records may have expired, a replay must not count them
        again) + what the flow counted from from_ms on (window records that still live, late
        adjustments), read atomically. Absolute totals: restating twice is restating once.
        Return the counters written."""
        day_start = day_ms(day)
        args = [from_ms, day_start, day_start + 86_400_000, day, period_ends(day_start)[0] + self.period_margin_s, org]
        for subject, totals in closed.items():
            args += [subject, *(int(totals.get(name, 0)) for name in USAGE_COUNTED)]
        return int(self.redis.eval(RESTATE_OPEN_DAY, 1, RECENT_PREFIX + org, *args))

    def restate_day(self, pipe, scope: str, ident: str, day: str, totals: dict[str, int]) -> None:
        day_key = usage_keys(scope, ident, day_ms(day))[0]
        pipe.delete(day_key)
        pipe.hset(day_key, mapping={name: int(value) for name, value in with_token_total(totals).items()})
        pipe.expireat(day_key, period_ends(day_ms(day))[0] + self.period_margin_s)

    def due_bases(self, delay_s: float = RESTATE_DELAY_S, limit: int = 10_000,
                  key: str = RESTATE_KEY) -> list[tuple[str, str, float]]:
        """(org/user, YYYYMM, marked at) of the month bases to recompute (with ORG_RESTATE_KEY:
        (org, YYYYMM, marked at) of the org months), marked delay_s ago or earlier."""
        due = self.redis.zrangebyscore(key, "-inf", self.clock() - delay_s, start=0, num=limit, withscores=True)
        return [(*member.decode().rsplit("|", 1), marked) for member, marked in due]

    def missing_bases(self, users: Iterable[str]) -> list[tuple[str, str]]:
        """(org/user, YYYYMM) of the users without a month base this month (none with month bases off)."""
        if not self.month_bases:
            return []
        users = sorted(set(users))
        today = self.clock() * 1000
        month = periods(today)[1]
        missing = []
        # One script call per few thousand users: an EXISTS each through a pipeline cost ~15 µs
        # of Python per user, and the quota sink asks for every user of every flush.
        for start in range(0, len(users), 5000):
            chunk = users[start:start + 5000]
            absent = self._missing_keys(keys=[month_key("user", user, month) for user in chunk])
            missing += [(chunk[index - 1], month) for index in absent]
        return missing

    def mark_due(self, bases: list[tuple[str, str]]) -> None:
        """Mark (org/user, YYYYMM) bases due now, for restate_month_bases."""
        if bases:
            due_at = self.clock() - RESTATE_DELAY_S
            self.redis.zadd(RESTATE_KEY, {f"{user}|{month}": due_at for user, month in bases}, nx=True)

    def restate_org_months(self, due: list[tuple[str, str, float]], org_totals: OrgMonthTotals) -> int:
        """Restate the month counters of orgs (org, YYYYMM, marked at) from the aggregates' days
        before month_cutoff plus the org's day counters from it on; return how many written."""
        now = self.clock()
        by_month: dict[str, list[str]] = {}
        for org, month, _marked in due:
            by_month.setdefault(month, []).append(org)
        months: UsageByDay = {}
        for month, orgs in by_month.items():
            cutoff = month_cutoff(month, now)
            totals = org_totals(orgs, month, cutoff) if has_days_before(month, cutoff) else {}
            months.update({("org", org, f"{month}01"): totals.get(org, {}) for org in orgs if cutoff})
        written = self.restate_months(months, {month: month_cutoff(month, now) for month in by_month})
        self._forget_due(keys=[ORG_RESTATE_KEY],
                         args=[x for org, month, marked in due for x in (f"{org}|{month}", marked)])
        return written

    def restate_months(self, months: UsageByDay, open_from: dict[str, str], pipe=None) -> int:
        """Month counters (keyed by any day of their month) := the given totals of their days
        before open_from[month] + their live day counters from it on, atomically."""
        now = self.clock()
        own_pipe = pipe is None
        pipe = self.redis.pipeline(transaction=False) if own_pipe else pipe
        written = 0
        for (scope, ident, day), totals in months.items():
            month = day[:6]
            month_end = period_ends(day_ms(day))[1] + self.period_margin_s
            if month_end <= now:
                continue
            month_key = usage_keys(scope, ident, day_ms(day))[1]
            open_days = [usage_keys(scope, ident, day_ms(d))[0]
                         for d in month_days(month, open_from[month], month_so_far(month, now))]
            pipe.eval(RESTATE_MONTH, 1 + len(open_days), month_key, *open_days, month_end,
                      *(x for name, value in with_token_total(totals).items() for x in (name, int(value))))
            written += 1
        if own_pipe:
            pipe.execute()
        return written

    def write_bases(self, bases: list[tuple[str, str, float | None, dict[str, int]]], forget: bool = True) -> int:
        """Write month bases (org/user, YYYYMM, marked at, absolute totals of the month's days
        before the cutoff, requests and tokens by kind, from the aggregates), cutoff per
        base_cutoff; with forget, their marks are done, but a mark made again since it was
        read stays due. Return how many written. APPLY_CHUNK bases per script call: a base holds
        Redis about as long as a total."""
        now = self.clock()
        month = day_string(now)[:6]
        # Only the month under way gets a base (base_cutoff): one cutoff, expiry and last day for all.
        written = [(user, totals) for user, base_month, _marked, totals in bases if base_month == month]
        if written:
            cutoff = base_cutoff(month, now)
            # Stale, and gone, with the cutoff day's counter: the user's next request marks a new one.
            expires = period_ends(day_ms(cutoff))[0] + self.period_margin_s
            head = [cutoff, expires, self.default_tier, month, month_so_far(month, now),
                    len(self.alert_thresholds), *self.alert_thresholds]
            pipe = self.redis.pipeline(transaction=False)
            for start in range(0, len(written), self.apply_chunk):
                args = head.copy()
                for user, totals in written[start:start + self.apply_chunk]:
                    args += (user, *(int(totals.get(kind, 0)) for kind in USAGE_COUNTED))
                self._write_bases(keys=[TIERS_KEY, PENDING_ALERTS_KEY], args=args, client=pipe)
            pipe.execute()
        if bases and forget:
            self._forget_due(keys=[RESTATE_KEY], args=[x for user, base_month, marked, _t in bases
                                                       for x in (f"{user}|{base_month}", marked)])
        return len(written)

    def pending_alerts(self) -> list[dict]:
        return [json.loads(v) for v in self.redis.hvals(PENDING_ALERTS_KEY)]

    def ack_alerts(self, alert_ids: list[str]) -> None:
        if alert_ids:
            self.redis.hdel(PENDING_ALERTS_KEY, *alert_ids)

    def usage(self, scope: str, ident: str, when_ms: int) -> dict[str, dict[str, int]]:
        """The day counter of when_ms's day and the month to date through it (month_usage)."""
        day_key = usage_keys(scope, ident, when_ms)[0]
        return {"day": {k.decode(): int(v) for k, v in self.redis.hgetall(day_key).items()},
                "month": self.month_usage(scope, ident, when_ms)}

    def month_usage(self, scope: str, ident: str, when_ms: int) -> dict[str, int]:
        """Requests, tokens and tokens by kind of a user ('user', 'org/user') or an org ('org',
        'org') from its month's start through when_ms's day, as enforcement reads them: the
        month_usage of the Lua scripts, whatever the month key holds (a live counter, a base, none)."""
        return self.month_through(scope, ident, periods(when_ms)[0])

    def month_through(self, scope: str, ident: str, last_day: str) -> dict[str, int]:
        """month_usage through a day given as YYYYMMDD (the 31st reads a whole month)."""
        values = self._month_usage(keys=[month_key(scope, ident, last_day[:6])],
                                   args=[f"gw:usage:{scope}:{ident}:d:", last_day])
        return dict(zip(USAGE_FIELDS, map(int, values)))

    def total_tokens(self, scope: str = "user") -> int:
        """Tokens of every user (or org) over every month Redis holds (for reconciliation): the
        sum of their month_usage, each month read through its last day so far."""
        months = set()
        for key in self.redis.scan_iter(match=f"gw:usage:{scope}:*", count=1000):
            ident, _period, stamp = key.decode()[len(f"gw:usage:{scope}:"):].rsplit(":", 2)
            months.add((ident, stamp[:6]))
        return sum(self.month_through(scope, ident, month_so_far(month, self.clock()))["tokens"]
                   for ident, month in sorted(months))


class QuotaWriter:
    """The quota sink's writer: window totals into the counters (``QuotaStore.apply``), then
    the alerts that crossed a threshold to the alerts topic. Alerts stay pending in Redis
    until the broker has them: a crash in between delivers them again (with the same
    alert_id) rather than never."""

    sink = "quota"

    def __init__(self, store: QuotaStore, tiers: dict, alerts: TopicWriter, retry: Retry, dead_letters: DeadLetters,
                 lateness_s: float, keep_bases: Callable[[list[str]], object] | None = None):
        self.store = store
        self.alerts = alerts
        self.retry = retry
        self.dead_letters = dead_letters
        self.lateness_s = lateness_s
        self.keep_bases = keep_bases  # with month bases: keep_month_bases over the aggregates, given the users
        retry(self.sink, lambda: store.publish_tiers(tiers))
        retry("quota_alerts", self.deliver_alerts)

    def keep_month_bases(self, users: set[str]) -> None:
        """The batch's missing bases, and those due: one attempt (logged and counted when it
        fails), then left to the next batch with the users marked due, so an aggregates outage
        never stops or slows the quota counting."""
        try:
            self.retry("quota_bases", lambda: self.keep_bases(users), max_attempts=1)
        except Exception as exc:  # noqa: BLE001 - counted by the retry; the marks try again
            log.warning("quota month bases not written, left to the next batch",
                        extra={"sink": "quota_bases", "users": len(users), "error": f"{type(exc).__name__}: {exc}"})
            self.retry(self.sink, lambda: self.store.mark_due(self.store.missing_bases(users)))

    def deliver_alerts(self) -> None:
        pending = self.store.pending_alerts()
        if pending:
            self.dead_letters.send_rejected("quota_alerts", self.alerts.send(pending))
            self.store.ack_alerts([alert["alert_id"] for alert in pending])
            get_metrics().increment("gatewatch_quota_alerts", len(pending))

    def __call__(self, batches: list[list[dict]]) -> None:
        totals = [total for batch in batches for total in batch]
        self.retry(self.sink, lambda: self.store.apply(totals))
        if self.keep_bases is not None:
            # Only users with usage in the month under way get its base: one whose batch holds an
            # earlier month alone (a late event, a backlog) has shown nothing of this month, as a
            # replay, which restates those days without the sink, also finds (tests/test_replay.py).
            self.keep_month_bases(users_of_month(totals, periods(int(self.store.clock() * 1000))[1]))
        count_written(self.sink, len(totals))
        observe_freshness(self.sink, [t["window_start_ms"] + t["window_length_ms"] for t in totals], self.lateness_s)
        self.retry("quota_alerts", self.deliver_alerts)
