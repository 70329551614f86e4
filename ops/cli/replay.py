"""`gatewatch replay` (backfill from raw Parquet) and `gatewatch retention apply`."""

from __future__ import annotations

import json
import threading
import time
from datetime import date
from pathlib import Path

import click
from prometheus_client import REGISTRY

from ops.cli.options import config_option, settings_from
from ops.launch import run_here
from ops.tracing import install_tracing


DATE = click.DateTime(formats=["%Y-%m-%d"])


def _progress(total_files: int, total_rows: int, started: float, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        click.echo(progress_text(total_files, total_rows, started), err=True)


def replayed() -> tuple[int, int]:
    """(files, rows) this process has replayed so far."""
    sample = REGISTRY.get_sample_value
    return int(sample("gatewatch_replay_files_total") or 0), int(sample("gatewatch_replay_rows_total") or 0)


def progress_text(total_files: int, total_rows: int, started: float) -> str:
    files, rows = replayed()
    rate = rows / max(1e-9, time.monotonic() - started)
    return f"replay  files {int(files)}/{total_files}  rows {int(rows)}/{total_rows}  {rate:,.0f} rows/s"


@click.command()
@click.option("--from", "first", required=True, type=DATE, help="First event date (YYYY-MM-DD).")
@click.option("--to", "last", required=True, type=DATE, help="Last event date, inclusive.")
@click.option("--region", help="Only this region's partitions.")
@click.option("--to-sinks", default="clickhouse,quota,billing", show_default=True,
              help="Where replayed events go: any of clickhouse, quota, billing, dlq.")
@click.option("--dry-run", is_flag=True, help="List the files and rows it would read, and stop.")
@click.option("-w", "--workers", default=1, show_default=True, type=click.IntRange(1))
@click.option("--recovery-dir", type=click.Path(file_okay=False),
              help="Bytewax recovery directory: run again with the same one to resume after a crash.")
@config_option
def replay(first, last, region, to_sinks, dry_run, workers, recovery_dir, config) -> None:
    """Backfill: read raw Parquet of a date range and write it again to the chosen sinks.

    Writes are idempotent (ClickHouse rows collapse by event_id, Redis takes window totals
    once, billing events keep their ids), so a replay gives the live run's numbers and a
    second replay changes nothing. Days older than the quota's window records are restated
    from the aggregates instead of replayed into the quota."""
    from connectors.parquet_source import list_files
    from dataflows.replay import REPLAY_SINKS
    from ops.privacy.audit import audited

    first, last = first.date(), last.date()
    if last < first:
        raise click.BadParameter("--to is before --from")
    sinks = [s.strip() for s in to_sinks.split(",") if s.strip()]
    unknown = [s for s in sinks if s not in REPLAY_SINKS]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: a replay writes to {', '.join(REPLAY_SINKS)}",
                                 param_hint="--to-sinks")
    settings = settings_from(config, {"sinks": sinks})
    scope = {"from": first.isoformat(), "to": last.isoformat(), "region": region, "sinks": sinks, "dry_run": dry_run}
    with audited(settings, "replay", scope):
        files = [f for storage in settings.storages()
                 for f in list_files(settings.parquet.store(storage.parquet_root), first, last, region, count_rows=True)]
        total_rows = sum(f.rows for f in files)
        if dry_run:
            for f in files:
                click.echo(f"{f.event_date}  {f.region:<6} {f.rows:>8} rows  {f.path}")
            click.echo(json.dumps({"dry_run": True, "files": len(files), "rows": total_rows,
                                   "regions": sorted({f.region for f in files})}))
            return
        if not files:
            raise click.ClickException(f"no raw Parquet for {first}..{last} under {settings.parquet.root}")
        install_tracing(settings.tracing, "replay")
        started = time.monotonic()
        stop = threading.Event()
        reporter = threading.Thread(target=_progress, args=(len(files), total_rows, started, stop), daemon=True)
        reporter.start()
        try:
            restated = replay_runs(settings, first, last, region, workers, recovery_dir)
        finally:
            stop.set()
            reporter.join()
        seconds = time.monotonic() - started
        click.echo(progress_text(len(files), total_rows, started), err=True)
        rows = replayed()[1]
        click.echo(json.dumps({"files": len(files), "rows": rows, "sinks": sinks, "seconds": round(seconds, 2),
                               "rows_per_s": round(rows / seconds, 1), "quota_restated": restated}))


def replay_runs(settings, first: date, last: date, region: str | None, workers: int, recovery_dir: str | None) -> int:
    """Run the replay; return the quota counters restated. Days older than the quota's window
    records (closed) skip the quota sink and are restated from the aggregates afterwards, so
    a replay after the records expired does not count them twice; the open days run after
    them through every sink (resuming from a sub-directory of --recovery-dir)."""
    from dataflows.replay import quota_split, restate_closed_quota
    from ops.launch import build_replay
    from sinks.quota import QuotaStore, first_open_day, open_windows_from_ms

    if "quota" not in settings.sinks:
        run_here(build_replay(settings, first, last, region), workers, recovery_dir,
                 settings.recovery.snapshot_interval_s)
        return 0
    windows, quota = settings.windows, settings.quota
    record_ttl_s = 2 * (windows.allowed_lateness_s + windows.length_s + windows.flush_interval_s)
    store = QuotaStore(settings.redis.url, quota.default_tier, tuple(quota.alert_thresholds),
                       window_ttl_s=record_ttl_s, month_bases=quota.month_bases)
    open_from = first_open_day(store.clock(), record_ttl_s)
    closed, opened = quota_split(first, last, open_from)
    others = [sink for sink in settings.sinks if sink != "quota"]
    if closed and others:
        run_here(build_replay(settings.model_copy(update={"sinks": others}), *closed, region), workers,
                 recovery_dir, settings.recovery.snapshot_interval_s)
    if opened:
        # Windows of the open days older than this may have lost their records: the quota sink
        # leaves them out and they are restated below, like closed days.
        counts_from_ms = open_windows_from_ms(store.clock(), record_ttl_s / 2, int(windows.length_s * 1000))
        counting = settings.model_copy(update={
            "quota": quota.model_copy(update={"replay_counts_from_ms": counts_from_ms})})
        run_here(build_replay(counting, *opened, region), workers,
                 recovery_dir and str(Path(recovery_dir) / "open-days"), settings.recovery.snapshot_interval_s)
    restated = 0
    if closed:
        restated += restate_closed_quota(settings, store, *closed, open_from)
    if opened:
        restated += restate_open_quota(settings, store, *opened, open_from)
    if closed and quota.month_bases:  # the users' bases marked due: rewrite them now from the refreshed aggregates
        restated += restate_bases_now(settings, store)
    return restated


def restate_open_quota(settings, store, first: date, last: date, open_from: str) -> int:
    """Restate the day counters of the replayed open days (first..last) as their raw events
    dated before the window records' horizon, as it is now (the replay may have outlasted the
    records of its start; everything it read is in ClickHouse) + what the quota counted from
    then on, and the month counters that are live counters (orgs', users' without month
    bases) as the aggregates' days before open_from + the day counters from it on; return
    the counters written."""
    from dataflows.outputs import aggregate_clients, summed_totals
    from dataflows.replay import USAGE_NAMES
    from sinks.quota import open_windows_from_ms
    from sinks.clickhouse import month_usage_before, org_month_usage_before, usage_before_time

    counts_from_ms = open_windows_from_ms(store.clock(), store.window_ttl_s / 2, int(settings.windows.length_s * 1000))
    clients = aggregate_clients(settings)
    closed: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
    for client in clients:
        for org, user, day, *values in usage_before_time(client, f"{first:%Y%m%d}", f"{last:%Y%m%d}", counts_from_ms):
            for subject in ("", f"{org}/{user}"):
                held = closed.setdefault((org, day), {}).setdefault(subject, {})
                for name, value in zip(USAGE_NAMES, values):
                    held[name] = held.get(name, 0) + value
    written = sum(store.restate_open_day(org, day, counts_from_ms, subjects)
                  for (org, day), subjects in sorted(closed.items()))
    months: dict = {}
    for month in sorted({day[:6] for _org, day in closed}):
        orgs = sorted({org for org, day in closed if day[:6] == month})
        org_totals = summed_totals(clients, org_month_usage_before, orgs, month, open_from)
        months.update({("org", org, f"{month}01"): org_totals.get(org, {}) for org in orgs})
        if not store.month_bases:
            users = sorted({tuple(s.split("/", 1)) for (org, day), subjects in closed.items() if day[:6] == month
                            for s in subjects if s})
            user_totals = summed_totals(clients, month_usage_before, users, month, open_from)
            months.update({("user", "/".join(u), f"{month}01"): user_totals.get(u, {}) for u in users})
    return written + store.restate_months(months, {key[2][:6]: open_from for key in months})


def restate_bases_now(settings, store) -> int:
    """Rewrite the month bases marked due (a replay's closed days) from the aggregates, without
    waiting for a flow's quota sink."""
    from functools import partial

    from dataflows.outputs import aggregate_clients, summed_totals
    from sinks.clickhouse import month_usage_before
    from sinks.quota import restate_month_bases

    # The replay's marks are due at once; a flow's newer marks wait for their delay as always.
    return restate_month_bases(store, partial(summed_totals, aggregate_clients(settings), month_usage_before))


@click.group()
def retention() -> None:
    """Raw data retention (ClickHouse deletes by TTLs kept to the same settings)."""


@retention.command("apply")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; delete nothing.")
@click.option("--today", type=DATE, help="Pretend today is this date (default: today, UTC).")
@config_option
def retention_apply(dry_run, today, config) -> None:
    """Delete raw Parquet partitions older than retention.raw_days, printing each, and set
    ClickHouse's TTLs to the retention settings."""
    from ops.migrate import clickhouse_databases
    from ops.privacy import retention as policy
    from ops.privacy.audit import audited, open_audit
    from sinks.clickhouse import ClickHouse

    settings = settings_from(config)
    today = today.date() if today else date.today()
    days = settings.retention.raw_days
    with audited(settings, "retention apply", {"today": today.isoformat(), "raw_days": days, "dry_run": dry_run}):
        deleted = [gone for storage in settings.storages()
                   for gone in policy.apply(settings.parquet.store(storage.parquet_root), today, days, dry_run)]
        verb = "would delete" if dry_run else "deleted"
        for day, path, files in deleted:
            click.echo(f"{verb} {path} ({files} files, event date {day})")
        audit_months = policy.apply_audit(open_audit(settings), today, settings.audit.months, dry_run)
        for table in audit_months:
            click.echo(f"{verb} audit log partition {table}")
        vault_days = policy.apply(settings.parquet.store(settings.vault.root), today, settings.vault.days, dry_run)
        for day, path, files in vault_days:
            click.echo(f"{verb} vault partition {path} ({files} files, event date {day})")
        ttl_changes = [f"{database}: {change}" for database in clickhouse_databases(settings)
                       for change in ClickHouse(settings.clickhouse.url, database).apply_retention(
                           days, settings.retention.aggregate_days, dry_run)]
        for change in ttl_changes:
            click.echo(f"{'would change' if dry_run else 'changed'} ClickHouse {change}")
        click.echo(json.dumps({"dry_run": dry_run, "raw_days": days, "partitions": len(deleted),
                               "files": sum(files for _d, _p, files in deleted),
                               "dates": [day.isoformat() for day, _p, _f in deleted],
                               "audit_partitions": audit_months,
                               "vault_dates": [day.isoformat() for day, _p, _f in vault_days],
                               "clickhouse_ttls": ttl_changes}))
