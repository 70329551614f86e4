"""The replay dataflow: raw Parquet of a date range -> the ingest flow's steps from the
redacted text onward (dedupe, pricing, windows) -> the chosen sinks.

Every sink write is idempotent, so a replay into a rebuilt ClickHouse gives the live run's
numbers and a second replay changes nothing. The windows repeat the decision stored with
each raw row (counted, late adjustment, DLQ) instead of remaking it, so the quota and
billing get the live run's window totals and adjustments (connectors.parquet_source).
Run it with `gatewatch replay`.
"""

from __future__ import annotations

from datetime import date, timedelta

import bytewax.operators as op
from bytewax.dataflow import Dataflow

from connectors.parquet_source import ParquetSource
from dataflows.outputs import Settings, deduplicate, fan_out
from dataflows.state import ReplayWindowFloor
from sinks.clickhouse import ClickHouse, refresh_aggregates
from sinks.quota import QuotaStore, UsageByDay

REPLAY_SINKS = ("clickhouse", "quota", "billing", "dlq")


def quota_split(first: date, last: date, open_from: str) -> tuple[tuple[date, date] | None, tuple[date, date] | None]:
    """(closed days, open days) of first..last: the quota restates the closed ones from the
    aggregates; the open ones go through the quota sink, whose window records still live."""
    opened = date(int(open_from[:4]), int(open_from[4:6]), int(open_from[6:]))
    closed = (first, min(last, opened - timedelta(days=1))) if first < opened else None
    return closed, ((max(first, opened), last) if last >= opened else None)


def build_flow(settings: Settings, first: date, last: date, region: str | None = None) -> Dataflow:
    """settings.sinks says where replayed events go; Parquet is the source, never a sink."""
    if "parquet" in settings.sinks:
        raise ValueError("a replay reads the raw Parquet; it cannot also write it")
    flow = Dataflow("gatewatch_replay")
    stores = [settings.parquet.store(storage.parquet_root) for storage in settings.storages()]
    # Each event carries its file's horizon, so that the windows hold only what the files still to read may grow.
    floor = ReplayWindowFloor(int(settings.windows.length_s * 1000))
    stored = op.input("parquet_in", flow, ParquetSource(stores, first, last, region, settings.kafka.batch_size, floor))
    fan_out(deduplicate(stored, settings), [], settings)
    return flow


# -- quota of closed days ------------------------------------------------------------------
# The quota counts a window's totals once while it remembers the window (its record lives
# twice the flow's horizon). A replay of days older than that would count them again, so
# those days are not sent through the quota sink: their day and month counters are restated
# from the ClickHouse aggregates, absolute totals that give the same result however often.

_DAILY_USAGE = """
SELECT {who}, toYYYYMMDD(day), sum(requests), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
    sum(cache_write_tokens)
FROM {db}.usage_daily FINAL
WHERE day >= toDate('{low}') AND day <= toDate('{high}')
  AND ({who}) IN (SELECT DISTINCT {who} FROM {db}.usage_daily FINAL
                  WHERE day >= toDate('{first}') AND day <= toDate('{last}'))
GROUP BY {who}, day
"""
USAGE_NAMES = ("requests", "input", "output", "cache_read", "cache_write")


def iso(day: str) -> str:
    return f"{day[:4]}-{day[4:6]}-{day[6:]}"


def daily_usage(client: ClickHouse, first: str, last: str, through: str) -> UsageByDay:
    """Per user and per org, the daily totals of every day from first's month start through
    `through` (YYYYMMDD), for the users and orgs with usage in first..last."""
    usage: UsageByDay = {}
    for scope, who in (("user", "org_id, user_id"), ("org", "org_id")):
        width = who.count(",") + 1
        for row in client.rows(_DAILY_USAGE.format(who=who, db=client.database, low=iso(first[:6] + "01"),
                                                   high=iso(through), first=iso(first), last=iso(last))):
            usage[scope, "/".join(row[:width]), str(row[width])] = dict(zip(USAGE_NAMES, map(int, row[width + 1:])))
    return usage


def closed_day_restatement(usage: UsageByDay, first: str, last: str) -> tuple[UsageByDay, UsageByDay]:
    """(the day totals of first..last, the totals of their months keyed by the month's first
    day) of daily_usage's answer, which holds every closed day of those months."""
    days = {key: totals for key, totals in usage.items() if first <= key[2] <= last}
    months: UsageByDay = {}
    for (scope, ident, day), totals in usage.items():
        month = months.setdefault((scope, ident, day[:6] + "01"), dict.fromkeys(USAGE_NAMES, 0))
        for name in USAGE_NAMES:
            month[name] += totals.get(name, 0)
    touched = {(scope, ident, day[:6]) for scope, ident, day in days}
    return days, {key: totals for key, totals in months.items() if (key[0], key[1], key[2][:6]) in touched}


def restate_closed_quota(settings: Settings, store: QuotaStore, first: date, last: date, open_from: str) -> int:
    """Restate the quota counters of the replayed days before open_from (YYYYMMDD) from every
    storage's aggregates, refreshed first so they hold the replayed events; return the
    counters written."""
    closed_through = previous_day(open_from)
    first_day, last_day = f"{first:%Y%m%d}", min(f"{last:%Y%m%d}", closed_through)
    if last_day < first_day:
        return 0
    usage: UsageByDay = {}
    for storage in settings.storages():
        client = ClickHouse(settings.clickhouse.url, storage.clickhouse_database)
        if client.legacy:
            raise RuntimeError("restating the quota needs the usage aggregates (ClickHouse 21 or newer)")
        refresh_aggregates(client, settings.retention.raw_days)
        for key, totals in daily_usage(client, first_day, last_day, closed_through).items():
            held = usage.setdefault(key, dict.fromkeys(USAGE_NAMES, 0))
            for name in USAGE_NAMES:
                held[name] += totals[name]
    days, months = closed_day_restatement(usage, first_day, last_day)
    return store.restate_closed_days(days, months, open_from)


def previous_day(day: str) -> str:
    return f"{date(int(day[:4]), int(day[4:6]), int(day[6:])) - timedelta(days=1):%Y%m%d}"
