"""QuotaClient: the gateway asks, before calling a model, whether a user may make a request.

One Redis round trip (one Lua script) reads the user's tier and limits and its usage today
and this month, as kept by the ingest flow's quota sink. With month bases (the default), a
user's month before yesterday is a base the quota sink writes from the ClickHouse daily
aggregates; a user returning after days away has none until then. Given ``month_totals``
(e.g. ``partial(sinks.clickhouse.month_usage_before, client)``) the client writes the
missing base itself before deciding, so it never under-counts a returning user's month;
without it the decision says ``month_complete=False`` and the gateway chooses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from sinks.quota import CHECK, TIERS_KEY, MonthTotals, QuotaStore, fill_month_bases, usage_keys


@dataclass(frozen=True)
class QuotaDecision:
    allowed: bool
    tier: str
    requests_today: int
    requests_per_day: int | None
    tokens_this_month: int
    tokens_per_month: int | None
    overage_allowed: bool
    month_complete: bool = True
    """False with month bases when the user's base was missing: tokens_this_month then holds
    only yesterday's and today's usage."""

    @property
    def reason(self) -> str | None:
        if self.allowed:
            return None
        if self.requests_per_day is not None and self.requests_today >= self.requests_per_day:
            return f"daily request limit of {self.requests_per_day} reached on tier {self.tier}"
        return f"monthly token limit of {self.tokens_per_month} reached on tier {self.tier}"


class QuotaClient:
    def __init__(self, url: str, default_tier: str = "free", socket_timeout_s: float = 0.05, month_bases: bool = True,
                 month_totals: MonthTotals | None = None, alert_thresholds: tuple[float, ...] = (0.8, 1.0)):
        # A short timeout: the request path must not hang on Redis (callers decide fail-open or closed).
        self.redis = redis.Redis.from_url(url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s)
        self.url = url
        self.default_tier = default_tier
        self.month_bases = month_bases
        self.month_totals = month_totals
        self.alert_thresholds = alert_thresholds
        self._check = self.redis.register_script(CHECK)

    def check(self, org_id: str, user_id: str, now_ms: int | None = None) -> QuotaDecision:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        decision = self._decide(org_id, user_id, now_ms)
        if not decision.month_complete and self.month_totals is not None:
            # At most once a day per user: the base lives until yesterday's counter expires.
            store = QuotaStore(self.url, self.default_tier, self.alert_thresholds, clock=lambda: now_ms / 1000)
            fill_month_bases(store, self.month_totals, [f"{org_id}/{user_id}"])
            decision = self._decide(org_id, user_id, now_ms)
        return decision

    def _decide(self, org_id: str, user_id: str, now_ms: int) -> QuotaDecision:
        user = f"{org_id}/{user_id}"
        day, month = usage_keys("user", user, now_ms)
        keys = [f"gw:tier:user:{user}", f"gw:limits:user:{user}", TIERS_KEY, day, month]
        allowed, tier, requests, rpd, tokens, tpm, overage, has_month = self._check(keys=keys, args=[self.default_tier])
        return QuotaDecision(
            allowed=bool(allowed), tier=tier.decode() if isinstance(tier, bytes) else tier,
            requests_today=int(requests), requests_per_day=None if rpd < 0 else int(rpd),
            tokens_this_month=int(tokens), tokens_per_month=None if tpm < 0 else int(tpm),
            overage_allowed=overage == 1, month_complete=bool(has_month) or not self.month_bases)
