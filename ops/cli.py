"""The `gatewatch` command line."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import click

from ops.recovery import init_recovery
from ops.settings import SettingsError, load_settings

FLOWS = {"ingest": "dataflows.ingest:flow", "feedback": "dataflows.feedback:flow"}


def _settings(config: str | None):
    try:
        return load_settings(config)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


config_option = click.option("--config", "config", type=click.Path(dir_okay=False), envvar="GATEWATCH_CONFIG",
                             help="TOML settings file (default: $GATEWATCH_CONFIG).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gatewatch")
def cli() -> None:
    """gatewatch: GenAI gateway telemetry from Kafka to Parquet, ClickHouse, Redis quotas and a DLQ."""


@cli.command()
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
              help="Run the flow as a Bytewax cluster of N processes on loopback (ClickHouse then runs as a server).")
@click.option("--restart-processes", type=click.IntRange(1),
              help="With --chaos: restart the last run with this many processes from the same recovery store.")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Keep Parquet, the chdb database, the DLQ dump and logs here (default: a temporary directory, removed).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve the flow's Prometheus metrics on this port.")
def demo(events, dup_ratio, bad_ratio, late_ratio, chaos, users, seed, workers, processes, restart_processes, data_dir,
         metrics_port) -> None:
    """Run the whole pipeline on embedded defaults and reconcile every sink.

    Starts a Kafka-protocol broker and Redis from pip wheels, produces synthetic events
    (valid, duplicated, malformed), runs the ingest dataflow until the topic is drained and
    checks Parquet, ClickHouse (chdb), Redis and the DLQ against what was produced. The
    last line is one JSON object; the exit code is 1 when any count does not reconcile.
    """
    from ops import demo as demo_mod

    if restart_processes and not chaos:
        raise click.UsageError("--restart-processes is the process count after the --chaos kills; it needs --chaos")
    if chaos > events:
        raise click.UsageError(f"--chaos {chaos} needs at least {chaos} events: each killed run consumes its own share")
    keep = data_dir is not None
    root = data_dir or tempfile.mkdtemp(prefix="gatewatch-demo-")
    try:
        found, problems, _expected = demo_mod.run(demo_mod.DemoOptions(
            events=events, dup_ratio=dup_ratio, bad_ratio=bad_ratio, late_ratio=late_ratio, chaos=chaos,
            users=users, seed=seed,
            data_dir=root, metrics_port=metrics_port, workers=workers, processes=processes,
            restart_processes=restart_processes))
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


@cli.command(context_settings={"ignore_unknown_options": True})
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

    settings = _settings(config)
    processes = len(addresses.split(";")) if addresses else 1
    try:
        check_cluster(settings, processes, workers)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    command = [sys.executable, "-m", "bytewax.run", FLOWS[flow], "-w", str(workers)]
    env = dict(os.environ)
    # Passed through the environment, not -i/-a, so that the flow process can read its own
    # index and serve metrics on metrics.port + index.
    if process_id is not None:
        env["BYTEWAX_PROCESS_ID"] = str(process_id)
    if addresses:
        env["BYTEWAX_ADDRESSES"] = addresses
    if settings.recovery.enabled and not no_recovery:
        directory = recovery_dir or settings.recovery.dir
        share = (process_id or 0, processes) if recovery_share else None
        init_recovery(directory, settings.recovery.partitions, share=share)
        # bytewax.run takes whole seconds only ("1.0" is an error).
        command += ["-r", directory, "-s", str(max(1, round(settings.recovery.snapshot_interval_s))),
                    "-b", str(round(settings.recovery.backup_interval_s))]
    if config:
        env["GATEWATCH_CONFIG"] = config
    click.echo(f"running: {' '.join(command)}", err=True)
    sys.exit(subprocess.call(command, env=env))


@cli.command()
@config_option
@click.option("--kafka/--no-kafka", default=True, show_default=True, help="Create the Kafka topics.")
@click.option("--clickhouse/--no-clickhouse", default=True, show_default=True, help="Apply ClickHouse migrations.")
@click.option("--audit/--no-audit", default=True, show_default=True,
              help="Create the audit log tables and its partitions for last month to 3 months ahead.")
def migrate(config, kafka, clickhouse, audit) -> None:
    """Create Kafka topics and apply ClickHouse and audit log migrations; safe to run again."""
    settings = _settings(config)
    if kafka:
        from ops.services import create_topics

        k = settings.kafka
        topics = {k.events_topic: k.partitions, k.dlq_topic: 1, k.billing_topic: k.partitions, k.quota_alerts_topic: 1,
                  k.feedback_topic: k.partitions}
        try:
            create_topics(k.bootstrap, topics)
        except Exception as exc:  # the broker's own error says more than we could
            raise click.ClickException(f"creating topics on {k.bootstrap} failed: {exc}") from None
        click.echo(f"kafka topics ready on {k.bootstrap}: {', '.join(topics)}")
    if clickhouse:
        from sinks.clickhouse import ClickHouse

        for database in sorted({settings.clickhouse.database} | {s.clickhouse_database for s in settings.storages()}):
            try:
                applied = ClickHouse(settings.clickhouse.url, database).migrate(
                    settings.retention.raw_days, settings.retention.aggregate_days)
            except Exception as exc:
                raise click.ClickException(f"ClickHouse migration of {database} on {settings.clickhouse.url} "
                                           f"failed: {exc}") from None
            click.echo(f"clickhouse {settings.clickhouse.url} {database}: applied {applied or 'nothing (up to date)'}")
    if audit:
        from ops.audit import prepare_audit

        try:
            months = prepare_audit(settings)
        except Exception as exc:
            raise click.ClickException(f"audit log migration failed: {exc}") from None
        click.echo(f"audit log ready, partitions {', '.join(months)}")


@cli.command()
@config_option
@click.option("--url", "urls", multiple=True,
              help="Metrics endpoint(s) of flow processes (default: 127.0.0.1:metrics.port).")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.1), help="Seconds between scrapes.")
@click.option("--watch", is_flag=True, help="Refresh until interrupted.")
@click.option("--usage", is_flag=True, help="Also today's and this month's usage from the ClickHouse aggregates.")
def status(config, urls, interval, watch, usage) -> None:
    """One screen of lag, rates, freshness and sink health from running flows' metrics."""
    import time

    from ops import status as status_mod

    if not urls:
        port = _settings(config).metrics.port
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

            settings = _settings(config)
            click.echo("\n".join(status_mod.usage_lines(ClickHouse(settings.clickhouse.url, settings.clickhouse.database))))
        if not watch:
            return
        before = after


@cli.command("config")
@config_option
def show_config(config) -> None:
    """Print the effective settings as JSON (after defaults, TOML file and environment)."""
    click.echo(json.dumps(_settings(config).model_dump(), indent=2, default=str))


@cli.group()
def bench() -> None:
    """Benchmarks (figures are printed, never asserted)."""


def _mount(group: click.Group, module: str, attribute: str) -> None:
    """Add a command that lives beside the code it drives."""
    group.add_command(getattr(importlib.import_module(module), attribute))


_mount(cli, "ops.cli_services", "services")
_mount(cli, "ops.cli_schemas", "schemas")
_mount(cli, "ops.cli_redact", "redact")
_mount(cli, "ops.cli_dlq", "dlq")
_mount(cli, "ops.cli_replay", "replay")
_mount(cli, "ops.cli_replay", "retention")
_mount(cli, "ops.cli_compact", "compact")
_mount(cli, "ops.cli_privacy", "forget")
_mount(cli, "ops.cli_privacy", "export")
_mount(cli, "ops.cli_privacy", "audit")
_mount(cli, "ops.cli_privacy", "vault")
_mount(cli, "ops.cli_loadgen", "loadgen")
_mount(cli, "ops.cli_api", "serve")
_mount(cli, "ops.cli_api", "api_keys")
_mount(cli, "ops.cli_deploy", "deploy")
_mount(bench, "ops.bench.redaction", "redaction")
_mount(bench, "ops.bench.state", "state")
_mount(bench, "ops.bench.e2e", "e2e")
_mount(bench, "ops.bench.stages", "stages")
_mount(bench, "ops.bench.api", "api")
_mount(bench, "ops.bench.producer", "producer")
_mount(bench, "ops.bench.history", "history")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
