"""`gatewatch replay` (backfill from raw Parquet) and `gatewatch retention apply`."""

from __future__ import annotations

import json
import threading
import time
from datetime import date

import click
from prometheus_client import REGISTRY

from ops.cli.options import config_option, settings_from
from ops.launch import run_here


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
    second replay changes nothing."""
    from connectors.parquet_source import list_files
    from dataflows.replay import REPLAY_SINKS
    from ops.launch import build_replay
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
        flow = build_replay(settings, first, last, region)
        started = time.monotonic()
        stop = threading.Event()
        reporter = threading.Thread(target=_progress, args=(len(files), total_rows, started, stop), daemon=True)
        reporter.start()
        try:
            run_here(flow, workers, recovery_dir, settings.recovery.snapshot_interval_s)
        finally:
            stop.set()
            reporter.join()
        seconds = time.monotonic() - started
        click.echo(progress_text(len(files), total_rows, started), err=True)
        rows = replayed()[1]
        click.echo(json.dumps({"files": len(files), "rows": rows, "sinks": sinks, "seconds": round(seconds, 2),
                               "rows_per_s": round(rows / seconds, 1)}))


@click.group()
def retention() -> None:
    """Raw data retention (ClickHouse applies its own TTLs from the same settings)."""


@retention.command("apply")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; delete nothing.")
@click.option("--today", type=DATE, help="Pretend today is this date (default: today, UTC).")
@config_option
def retention_apply(dry_run, today, config) -> None:
    """Delete raw Parquet partitions older than retention.raw_days, printing each."""
    from ops.privacy import retention as policy
    from ops.privacy.audit import audited, open_audit

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
        click.echo(json.dumps({"dry_run": dry_run, "raw_days": days, "partitions": len(deleted),
                               "files": sum(files for _d, _p, files in deleted),
                               "dates": [day.isoformat() for day, _p, _f in deleted],
                               "audit_partitions": audit_months,
                               "vault_dates": [day.isoformat() for day, _p, _f in vault_days]}))
