"""`gatewatch compact`: one copy of every event per raw Parquet partition, small files merged."""

from __future__ import annotations

import json
from dataclasses import asdict

import click

from ops.cli.options import config_option, settings_from
from sinks.parquet_compaction import SMALL_ROWS, compact_partition, partitions


@click.command("compact")
@config_option
@click.option("--root", help="Raw Parquet root (default: settings parquet.root).")
@click.option("--partition", "only", help="Only partitions starting with this, e.g. event_date=2026-11-29.")
@click.option("--small-rows", default=SMALL_ROWS, show_default=True, type=click.IntRange(1),
              help="Files with fewer rows are merged.")
def compact(config: str | None, root: str | None, only: str | None, small_rows: int) -> None:
    """Remove the copies a crash left in raw Parquet (one per event and partition) and merge
    small files; safe to interrupt and to run again. Progress per partition on stderr, one
    JSON summary last on stdout."""
    store = settings_from(config).parquet.store(root)
    chosen = {p: files for p, files in sorted(partitions(store).items()) if only is None or p.startswith(only)}
    results = []
    for number, (partition, files) in enumerate(chosen.items(), 1):
        done = compact_partition(store, partition, files, small_rows)
        results.append(done)
        click.echo(f"compact {number}/{len(chosen)} {partition}: files {done.files_before} -> {done.files_after}, "
                   f"rows {done.rows_before} -> {done.rows_after}", err=True)
    click.echo(json.dumps({"partitions": len(results),
                           "files_before": sum(r.files_before for r in results),
                           "files_after": sum(r.files_after for r in results),
                           "rows_before": sum(r.rows_before for r in results),
                           "rows_after": sum(r.rows_after for r in results),
                           "changed": [asdict(r) for r in results if r.written or r.deleted]}))
