"""`gatewatch status`: lag, rates, freshness and sink health of running flow processes,
read from their Prometheus endpoints."""

from __future__ import annotations

import math
import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Snapshot:
    at: float
    counters: dict[tuple[str, tuple], float] = field(default_factory=dict)
    gauges: dict[tuple[str, tuple], float] = field(default_factory=dict)
    buckets: dict[tuple[str, tuple], list[tuple[float, float]]] = field(default_factory=dict)


def parse(text: str, at: float) -> Snapshot:
    snap = Snapshot(at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            if family.type == "counter" and sample.name.endswith("_total"):
                snap.counters[(family.name, labels)] = sample.value
            elif family.type == "gauge":
                snap.gauges[(family.name, labels)] = sample.value
            elif family.type == "histogram" and sample.name.endswith("_bucket"):
                snap.buckets.setdefault((family.name, labels), []).append((float(sample.labels["le"]), sample.value))
    return snap


def scrape(url: str) -> Snapshot:
    with urllib.request.urlopen(url, timeout=3) as response:
        return parse(response.read().decode(), time.time())


def merge(snapshots: list[Snapshot]) -> Snapshot:
    """Several processes of one flow, summed."""
    total = Snapshot(max((s.at for s in snapshots), default=time.time()))
    for snap in snapshots:
        for name, table in (("counters", snap.counters), ("gauges", snap.gauges)):
            into = getattr(total, name)
            for key, value in table.items():
                into[key] = into.get(key, 0) + value
        for key, rows in snap.buckets.items():
            into_rows = dict(total.buckets.get(key, []))
            for le, count in rows:
                into_rows[le] = into_rows.get(le, 0) + count
            total.buckets[key] = sorted(into_rows.items())
    return total


def quantile(rows: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated within its bucket."""
    rows = sorted(rows)
    if not rows or rows[-1][1] == 0:
        return None
    rank = q * rows[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in rows:
        if count >= rank:
            if math.isinf(le):
                return lower_le
            span = count - lower_count
            return lower_le + (le - lower_le) * ((rank - lower_count) / span if span else 1)
        lower_le, lower_count = le, count
    return rows[-1][0]


def _by(table: dict, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (metric, labels), value in table.items():
        if metric == name:
            key = dict(labels).get(label, "")
            out[key] = out.get(key, 0) + value
    return out


def render(before: Snapshot, after: Snapshot) -> str:
    seconds = max(1e-9, after.at - before.at)
    lines = ["gatewatch status", ""]
    rates = {stage: (value - _by(before.counters, "gatewatch_events", "stage").get(stage, 0)) / seconds
             for stage, value in _by(after.counters, "gatewatch_events", "stage").items()}
    lines.append("events/s      " + "  ".join(f"{stage} {rate:,.0f}" for stage, rate in sorted(rates.items())))
    dlq_rate = (sum(_by(after.counters, "gatewatch_dlq_records", "code").values())
                - sum(_by(before.counters, "gatewatch_dlq_records", "code").values())) / seconds
    lines.append(f"dlq/s         {dlq_rate:,.1f}   total by code: "
                 + ", ".join(f"{code} {int(v)}" for code, v in sorted(_by(after.counters, "gatewatch_dlq_records", "code").items())))
    lag = _by(after.gauges, "bytewax_kafka_consumer_lag", "partition")
    lines.append(f"consumer lag  {int(sum(lag.values())):,} messages"
                 + (f"  (by partition: {', '.join(f'{p}={int(v)}' for p, v in sorted(lag.items()))})" if lag else ""))
    lines.append(f"dedupe drops  {int(sum(_by(after.counters, 'gatewatch_dedupe_drops', '').values()))}")
    lines.append("")
    lines.append(f"{'sink':<14}{'up':>4}{'rows':>12}{'errors':>8}{'fresh p50':>11}{'fresh p99':>11}")
    sinks = set(_by(after.gauges, "gatewatch_sink_up", "sink")) | set(_by(after.counters, "gatewatch_sink_rows", "sink"))
    up = _by(after.gauges, "gatewatch_sink_up", "sink")
    rows = _by(after.counters, "gatewatch_sink_rows", "sink")
    errors = _by(after.counters, "gatewatch_sink_errors", "sink")
    for sink in sorted(sinks):
        fresh = [r for (name, labels), r in after.buckets.items()
                 if name == "gatewatch_freshness_seconds" and dict(labels).get("sink") == sink]
        p50 = quantile(fresh[0], 0.5) if fresh else None
        p99 = quantile(fresh[0], 0.99) if fresh else None
        state = {1.0: "yes", 0.0: "NO"}.get(up.get(sink), "-")
        lines.append(f"{sink:<14}{state:>4}{int(rows.get(sink, 0)):>12}{int(errors.get(sink, 0)):>8}"
                     f"{_seconds(p50):>11}{_seconds(p99):>11}")
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def usage_lines(client, day_s: float | None = None) -> list[str]:
    """Today's and this month's usage from the per-model rollups (a few rows per org and day
    or month, never the raw events nor a row per user): requests, errors, tokens and cost, the
    orgs that used the most today and the models used the most this month. The month is the
    whole calendar month as far as stored, which is month to date unless events are dated ahead."""
    db = client.database
    day = f"toDate(toDateTime({int(day_s if day_s is not None else time.time())}, 'UTC'))"
    lines = ["", f"{'usage':<14}{'requests':>12}{'errors':>9}{'tokens':>15}{'cost USD':>16}"]
    periods = (("today", "usage_model_daily", f"day = {day}"),
               ("this month", "usage_model_monthly", f"month = toStartOfMonth({day})"))
    for label, table, where in periods:
        (requests, errors, tokens, cost), = client.rows(
            f"SELECT sum(requests), sum(errors), sum(input_tokens + output_tokens + cache_read_tokens + "
            f"cache_write_tokens), sum(cost_usd) FROM {db}.{table} FINAL WHERE {where}")
        lines.append(f"{label:<14}{int(requests or 0):>12,}{int(errors or 0):>9,}{int(tokens or 0):>15,}"
                     f"{float(cost or 0):>16,.2f}")
    top = client.rows(f"SELECT org_id, sum(requests) AS n, sum(cost_usd) FROM {db}.usage_model_daily FINAL "
                      f"WHERE day = {day} GROUP BY org_id ORDER BY n DESC LIMIT 5")
    if top:
        lines.append("top orgs today " + ", ".join(f"{org} {int(n):,} req ${float(c):,.2f}" for org, n, c in top))
    models = client.rows(f"SELECT model, sum(requests) AS n, sum(cost_usd) FROM {db}.usage_model_monthly FINAL "
                         f"WHERE {periods[1][2]} GROUP BY model ORDER BY n DESC LIMIT 5")
    if models:
        lines.append("top models this month " + ", ".join(f"{model} {int(n):,} req ${float(c):,.2f}"
                                                        for model, n, c in models))
    return lines


def quota_lines(client, store, subjects: list[str], now_ms: int | None = None) -> list[str]:
    """Each subject's quota as enforcement reads it: a user ('org/user') through the gateway's
    QuotaClient (tier, limits, today's requests, the month's tokens), an org ('org') through
    QuotaStore.month_usage; both read the month with the one Lua month_usage."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    lines = ["", f"{'quota':<28}{'tier':>8}{'requests today':>16}{'tokens this month':>19}{'limit':>12}"]
    for subject in subjects:
        if "/" in subject:
            decision = client.check(*subject.split("/", 1), now_ms)
            limit = "-" if decision.tokens_per_month is None else f"{decision.tokens_per_month:,}"
            note = "" if decision.month_complete else "  (no month base: yesterday and today only)"
            lines.append(f"{subject:<28}{decision.tier:>8}{decision.requests_today:>16,}"
                         f"{decision.tokens_this_month:>19,}{limit:>12}" + ("  refused" if not decision.allowed else "")
                         + note)
        else:
            usage = store.usage("org", subject, now_ms)
            lines.append(f"{subject:<28}{'org':>8}{usage['day'].get('requests', 0):>16,}"
                         f"{usage['month']['tokens']:>19,}{'-':>12}")
    return lines
