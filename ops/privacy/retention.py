"""Retention of raw Parquet (whole event_date partitions older than retention.raw_days go)
and of the audit log (whole monthly partitions older than audit.months go).

ClickHouse deletes by its own TTLs (ops/migrations, kept to the settings by
sinks.clickhouse_ttl); this covers what ClickHouse does not own.
"""

from __future__ import annotations

import re
from datetime import date, timedelta

from sinks.audit_log import AuditStore, month_table, months_back
from sinks.parquet import ParquetStore

_DATE_DIR = re.compile(r"^event_date=(\d{4}-\d{2}-\d{2})$")


def expired_dates(dates: list[date], today: date, raw_days: int) -> list[date]:
    """Event dates with no day left inside the retention period (today counts as day one)."""
    oldest_kept = today - timedelta(days=raw_days - 1)
    return sorted(d for d in dates if d < oldest_kept)


def partition_dates(store: ParquetStore) -> dict[date, str]:
    """{event date: its directory} under the store's root."""
    store.fs.invalidate_cache(store.root)
    if not store.fs.exists(store.root):
        return {}
    found = {}
    for path in store.fs.ls(store.root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        match = _DATE_DIR.match(name)
        if match:
            found[date.fromisoformat(match.group(1))] = path
    return found


def apply(store: ParquetStore, today: date, raw_days: int, dry_run: bool = False) -> list[tuple[date, str, int]]:
    """Delete expired date partitions; return (date, directory, files) of each."""
    directories = partition_dates(store)
    deleted = []
    for day in expired_dates(list(directories), today, raw_days):
        path = directories[day]
        files = [p for p in store.fs.find(path) if p.endswith(".parquet")]
        if not dry_run:
            store.fs.rm(path, recursive=True)
        deleted.append((day, path, len(files)))
    return deleted


def audit_oldest_kept(today: date, months: int) -> date:
    """First month of the audit log still kept: this month and the months-1 before it."""
    return months_back(date(today.year, today.month, 1), months - 1)


def apply_audit(store: AuditStore, today: date, months: int, dry_run: bool = False) -> list[str]:
    """Drop the audit log's monthly partitions older than the retention; return their names."""
    oldest = audit_oldest_kept(today, months)
    if dry_run:
        return [month_table(m) for m in store.months() if m < oldest]
    return store.drop_months_before(oldest)
