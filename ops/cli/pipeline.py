"""The pipeline's own commands: `demo`, `run`, `migrate`, `status` and `config`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import click

from ops.cli.options import config_option, settings_from
from ops.launch import FLOWS, Snapshots, flow_command, process_env
from ops.migrate import clickhouse_databases, migrate_audit, migrate_clickhouse, migrate_kafka
from ops.recovery import init_recovery


@click.command()
@click.option("--events", default=5000, show_default=True, type=click.IntRange(1), help="Messages to produce.")
@click.option("--dup-ratio", default=0.05, show_default=True, type=click.FloatRange(0, 0.9),
              help="Share of messages that repeat an earlier event.")
@click.option("--bad-ratio", default=0.02, show_default=True, type=click.FloatRange(0, 0.9),
              help="Share of malformed messages (they must land in the DLQ).")
@click.option("--late-ratio", default=0.01, show_default=True, type=click.FloatRange(0, 0.5),
              help="Share of events dated beyond the allowed lateness (they go to the DLQ, not the quota).")
@click.option("--chaos", default=0, show_default=True, type=click.IntRange(0),
              help="SIGKILL the flow this many times while producing, resuming from recovery each time.")
@click.option("--users", default=200, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=7, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Bytewax worker threads.")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(1),
              help="Run the flow as a Bytewax cluster of N processes on loopback (writing one chdb through a chdb host).")
@click.option("--restart-processes", type=click.IntRange(1),
              help="With --chaos: restart the last run with this many processes from the same recovery store.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Keep Parquet, the chdb database, the DLQ dump and logs here (default: a temporary directory, removed).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve the flow's Prometheus metrics on this port.")
@click.option("--via-api", is_flag=True,
              help="Send the events through `gatewatch serve` (JSON batches on /v1/events, a share as OTLP GenAI "
                   "spans on /v1/traces) instead of producing them to Kafka.")
@click.option("--otlp-share", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="With --via-api: the share of events sent as OpenTelemetry spans.")
@click.option("--v2-ratio", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Share of events of schema version 2 (reasoning tokens, trace and span ids); the rest are v1.")
def demo(events, dup_ratio, bad_ratio, late_ratio, chaos, users, seed, workers, processes, restart_processes, data_dir,
         metrics_port, via_api, otlp_share, v2_ratio) -> None:
    """Run the whole pipeline on embedded defaults and reconcile every sink.

    Starts a Kafka-protocol broker and Redis from pip wheels, produces synthetic events
    (valid, duplicated, malformed), runs the ingest dataflow until the topic is drained and
    checks Parquet, ClickHouse (chdb), Redis and the DLQ against what was produced. The
    last line is one JSON object; the exit code is 1 when any count does not reconcile.
    """
    from ops.dev import demo as demo_mod

    if restart_processes and not chaos:
        raise click.UsageError("--restart-processes is the process count after the --chaos kills; it needs --chaos")
    if via_api and chaos:
        raise click.UsageError("--via-api cannot be combined with --chaos (chaos produces to Kafka while the flow runs)")
    if chaos > events:
        raise click.UsageError(f"--chaos {chaos} needs at least {chaos} events: each killed run consumes its own share")
    keep = data_dir is not None
    root = data_dir or tempfile.mkdtemp(prefix="gatewatch-demo-")
    try:
        found, problems, _expected = demo_mod.run(demo_mod.DemoOptions(
            events=events, dup_ratio=dup_ratio, bad_ratio=bad_ratio, late_ratio=late_ratio, chaos=chaos,
            users=users, seed=seed,
            data_dir=root, metrics_port=metrics_port, workers=workers, processes=processes,
            restart_processes=restart_processes, via_api=via_api, otlp_share=otlp_share, v2_ratio=v2_ratio))
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    if not keep:
        found["data_dir"] = None
    click.echo(demo_mod.human_summary(found, problems), err=True)
    click.echo(json.dumps(found, sort_keys=True))
    sys.exit(0 if not problems else 1)


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("flow", type=click.Choice(sorted(FLOWS)))
@config_option
@click.option("-w", "--workers", default=1, show_default=True, type=click.IntRange(1), help="Worker threads per process.")
@click.option("-i", "--process-id", type=click.IntRange(0), help="This process's index in a cluster.")
@click.option("-a", "--addresses", help="Semicolon-separated host:port of every process in the cluster.")
@click.option("--recovery-dir", help="Bytewax recovery directory (default: settings recovery.dir).")
@click.option("--no-recovery", is_flag=True, help="Run without recovery snapshots.")
@click.option("--recovery-share", is_flag=True,
              help="The recovery directory is this process's own disk: create only its share of the partitions.")
def run(flow, config, workers, process_id, addresses, recovery_dir, no_recovery, recovery_share) -> None:
    """Deploy a dataflow against the configured servers (wraps `python -m bytewax.run`)."""
    from ops.cluster import ClusterError, check_cluster

    settings = settings_from(config)
    processes = len(addresses.split(";")) if addresses else 1
    try:
        check_cluster(settings, processes, workers)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    snapshots = None
    if settings.recovery.enabled and not no_recovery:
        directory = recovery_dir or settings.recovery.dir
        share = (process_id or 0, processes) if recovery_share else None
        init_recovery(directory, settings.recovery.partitions, share=share)
        snapshots = Snapshots(directory, settings.recovery.snapshot_interval_s, settings.recovery.backup_interval_s)
    command = flow_command(flow, workers, snapshots)
    env = process_env(os.environ, process_id, addresses)
    if config:
        env["GATEWATCH_CONFIG"] = config
    click.echo(f"running: {' '.join(command)}", err=True)
    sys.exit(subprocess.call(command, env=env))


@click.command()
@config_option
@click.option("--kafka/--no-kafka", default=True, show_default=True, help="Create the Kafka topics.")
@click.option("--clickhouse/--no-clickhouse", default=True, show_default=True, help="Apply ClickHouse migrations.")
@click.option("--audit/--no-audit", default=True, show_default=True,
              help="Create the audit log tables and its partitions for last month to 3 months ahead.")
def migrate(config, kafka, clickhouse, audit) -> None:
    """Create Kafka topics and apply ClickHouse and audit log migrations; safe to run again."""
    settings = settings_from(config)
    if kafka:
        try:
            topics = migrate_kafka(settings.kafka)
        except Exception as exc:  # the broker's own error says more than we could
            raise click.ClickException(f"creating topics on {settings.kafka.bootstrap} failed: {exc}") from None
        click.echo(f"kafka topics ready on {settings.kafka.bootstrap}: {', '.join(topics)}")
    if clickhouse:
        for database in clickhouse_databases(settings):
            try:
                applied = migrate_clickhouse(settings, database)
            except Exception as exc:
                raise click.ClickException(f"ClickHouse migration of {database} on {settings.clickhouse.url} "
                                           f"failed: {exc}") from None
            click.echo(f"clickhouse {settings.clickhouse.url} {database}: applied {applied or 'nothing (up to date)'}")
    if audit:
        try:
            months = migrate_audit(settings)
        except Exception as exc:
            raise click.ClickException(f"audit log migration failed: {exc}") from None
        click.echo(f"audit log ready, partitions {', '.join(months)}")


@click.command()
@config_option
@click.option("--url", "urls", multiple=True,
              help="Metrics endpoint(s) of flow processes (default: 127.0.0.1:metrics.port).")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.1), help="Seconds between scrapes.")
@click.option("--watch", is_flag=True, help="Refresh until interrupted.")
@click.option("--usage", is_flag=True, help="Also today's and this month's usage from the ClickHouse aggregates.")
@click.option("--quota", "quota_subjects", multiple=True, metavar="ORG[/USER]",
              help="Also the quota of this user or org as enforcement reads it (repeatable).")
def status(config, urls, interval, watch, usage, quota_subjects) -> None:
    """One screen of lag, rates, freshness and sink health from running flows' metrics."""
    import time

    from ops import status as status_mod

    if not urls:
        port = settings_from(config).metrics.port
        if port is None:
            raise click.ClickException("no metrics endpoint: pass --url or set metrics.port")
        urls = (f"http://127.0.0.1:{port}/metrics",)

    def snapshot():
        try:
            return status_mod.merge([status_mod.scrape(url) for url in urls])
        except OSError as exc:
            raise click.ClickException(f"cannot read {', '.join(urls)}: {exc}") from None

    before = snapshot()
    while True:
        time.sleep(interval)
        after = snapshot()
        if watch:
            click.clear()
        click.echo(status_mod.render(before, after))
        if usage:
            from sinks.clickhouse import ClickHouse

            settings = settings_from(config)
            click.echo("\n".join(status_mod.usage_lines(ClickHouse(settings.clickhouse.url, settings.clickhouse.database))))
        if quota_subjects:
            click.echo("\n".join(status_mod.quota_lines(*quota_readers(settings_from(config)), list(quota_subjects))))
        if not watch:
            return
        before = after


def quota_readers(settings):
    """(QuotaClient, QuotaStore) as the flow's settings configure them; the client writes a
    user's missing month base from the aggregates, as a gateway given them does."""
    from functools import partial

    from connectors.quota_client import QuotaClient
    from sinks.clickhouse import ClickHouse, month_usage_before
    from sinks.quota import QuotaStore

    quota = settings.quota
    aggregates = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    client = QuotaClient(settings.redis.url, quota.default_tier, socket_timeout_s=2, month_bases=quota.month_bases,
                         month_totals=partial(month_usage_before, aggregates) if quota.month_bases else None,
                         alert_thresholds=tuple(quota.alert_thresholds))
    return client, QuotaStore(settings.redis.url, quota.default_tier, month_bases=quota.month_bases)


@click.command("config")
@config_option
def show_config(config) -> None:
    """Print the effective settings as JSON (after defaults, TOML file and environment)."""
    click.echo(json.dumps(settings_from(config).model_dump(), indent=2, default=str))
