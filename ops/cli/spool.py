"""`gatewatch spool status|drain`: an orphaned API spool (ops/spool_drain.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ops.cli.options import config_option, settings_from

directory_argument = click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))


def _directory(directory: Path | None, settings) -> Path:
    return directory if directory is not None else Path(settings.api.spool_dir)


@click.group()
def spool() -> None:
    """Producer spools left behind (an API pod scaled down while Kafka was unreachable)."""


@spool.command("status")
@config_option
@directory_argument
def status_command(config, directory) -> None:
    """One JSON line per slot under DIRECTORY (default: api.spool_dir): records, bytes,
    age of the oldest record; a slot locked by a running producer shows its bytes only."""
    from ops.spool_drain import spool_status

    try:
        for slot in spool_status(_directory(directory, settings_from(config))):
            click.echo(json.dumps(slot.as_dict()))
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None


@spool.command("drain")
@config_option
@directory_argument
@click.option("--bootstrap", help="Kafka bootstrap servers (default: kafka.bootstrap).")
@click.option("--topic", help="Topic to send to (default: kafka.events_topic).")
@click.option("--stall-timeout", default=30.0, show_default=True, type=click.FloatRange(0.5),
              help="Give up on a slot after this many seconds without an acknowledgement.")
def drain_command(config, directory, bootstrap, topic, stall_timeout) -> None:
    """Send every record of every slot under DIRECTORY (default: api.spool_dir) to the events
    topic, oldest first, through the producer's own replay. Exits 0 only when Kafka has
    acknowledged them all; otherwise what is left stays spooled and a rerun goes on from it.
    Progress: JSON lines on stderr; a summary line per slot on stdout."""
    from connectors.producer import EventProducer
    from ops.logs import configure
    from ops.spool_drain import SlotInUse, drain_slot, find_slots
    from schemas.registry import registry_from_settings

    settings = settings_from(config)
    configure(settings.log_level)
    bootstrap, topic = bootstrap or settings.kafka.bootstrap, topic or settings.kafka.events_topic
    registry = registry_from_settings(settings.schemas)
    try:
        slots = find_slots(_directory(directory, settings))
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None

    def open_producer(slot: Path) -> EventProducer:
        return EventProducer(bootstrap, topic, registry, slot, max_spool_bytes=settings.api.max_spool_bytes,
                             validation=settings.validation)

    problems = []
    for slot in slots:
        try:
            result = drain_slot(slot, open_producer, stall_timeout_s=stall_timeout,
                                progress=lambda line: click.echo(json.dumps(line), err=True))
        except SlotInUse as exc:
            problems.append(str(exc))
            continue
        click.echo(json.dumps(result.as_dict()))
        if result.left:
            problems.append(f"spool slot {slot}: {result.left} of {result.records} records not acknowledged by "
                            f"{bootstrap} within {stall_timeout:g} s without progress; they stay spooled, "
                            "rerun the drain when the broker is reachable")
    if problems:
        raise click.ClickException("; ".join(problems))
    click.echo(f"drained {len(slots)} slot(s) to {topic}", err=True)
