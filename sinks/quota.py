"""Per-user and per-org token and request counters in Redis, applied exactly once in effect.

The flow emits, for each (org, user, window), the window's running absolute totals with the
number of distinct events they cover. One Lua script stores the newest totals of the window
and adds only the difference to the day and month counters, and it ignores totals that
cover no more events than it already holds. A retried, replayed or re-emitted window
therefore never counts a token twice.
"""

from __future__ import annotations

from datetime import datetime, timezone

import redis

TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")

APPLY_WINDOW = """
local n = tonumber(ARGV[1])
local prev_n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
if n <= prev_n then return 0 end
local kinds = {'input', 'output', 'cache_read', 'cache_write'}
local deltas = {}
local total = 0
for i, kind in ipairs(kinds) do
  local value = tonumber(ARGV[i + 1])
  local delta = value - tonumber(redis.call('HGET', KEYS[1], kind) or '0')
  deltas[i] = delta
  total = total + delta
  redis.call('HSET', KEYS[1], kind, value)
end
redis.call('HSET', KEYS[1], 'n', n)
redis.call('EXPIRE', KEYS[1], ARGV[6])
for k = 2, #KEYS do
  redis.call('HINCRBY', KEYS[k], 'requests', n - prev_n)
  redis.call('HINCRBY', KEYS[k], 'tokens', total)
  for i, kind in ipairs(kinds) do
    redis.call('HINCRBY', KEYS[k], kind, deltas[i])
  end
  redis.call('EXPIRE', KEYS[k], ARGV[6])
end
return 1
"""

COUNTER_TTL_S = 40 * 86400


def usage_keys(scope: str, ident: str, window_start_ms: int) -> tuple[str, str]:
    """(day key, month key) of a user ('user', 'org/user') or an org ('org', 'org')."""
    start = datetime.fromtimestamp(window_start_ms / 1000, tz=timezone.utc)
    return (f"gw:usage:{scope}:{ident}:d:{start:%Y%m%d}", f"gw:usage:{scope}:{ident}:m:{start:%Y%m}")


def window_key(total: dict) -> str:
    return f"gw:win:{total['org_id']}/{total['user_id']}:{total['window_start_ms']}"


class QuotaStore:
    def __init__(self, url: str):
        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self._apply = self.redis.register_script(APPLY_WINDOW)

    def apply(self, totals: list[dict]) -> int:
        """Apply window totals in one round trip; return how many changed a counter."""
        pipe = self.redis.pipeline(transaction=False)
        for total in totals:
            user = f"{total['org_id']}/{total['user_id']}"
            keys = [window_key(total), *usage_keys("user", user, total["window_start_ms"]),
                    *usage_keys("org", total["org_id"], total["window_start_ms"])]
            args = [total["n"], *(total[kind] for kind in TOKEN_KINDS), COUNTER_TTL_S]
            self._apply(keys=keys, args=args, client=pipe)
        return sum(pipe.execute())

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
