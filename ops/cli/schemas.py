"""`gatewatch schemas check|list|show|register`: the event contracts, gated in CI."""

from __future__ import annotations

import json
from pathlib import Path

import click

from schemas.compat import MODES, check_directory
from schemas.registry import IDS_FILE, SCHEMA_DIR, read_ids, scan, write_ids

dir_option = click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
                          default=SCHEMA_DIR, show_default="the shipped schemas/avro",
                          help="Schema directory: <name>.v<N>.avsc files and ids.json.")


@click.group()
def schemas() -> None:
    """Versioned Avro schemas of events and pipeline records, and their compatibility."""


@schemas.command()
@dir_option
@click.option("--mode", type=click.Choice(MODES, case_sensitive=False), default="FULL", show_default=True,
              help="BACKWARD: new reads old; FORWARD: old reads new; FULL: both.")
def check(directory: Path, mode: str) -> None:
    """Fail (exit 1) when a schema version breaks compatibility with the version before it,
    when a file has no id, or when a file is not a valid schema. Each problem names the
    file and the field."""
    result = check_directory(directory, mode)
    for line in result.checked:
        click.echo(f"checked {line}")
    if result.problems:
        for problem in result.problems:
            click.echo(f"INCOMPATIBLE {problem}", err=True)
        raise SystemExit(1)
    click.echo(f"ok: {len(result.checked)} schema histories in {directory} are {mode.upper()} compatible")


@schemas.command("list")
@dir_option
def list_schemas(directory: Path) -> None:
    """Print every schema version with its id."""
    by_name, problems = scan(directory, require_ids=False)
    for name, versions in sorted(by_name.items()):
        for entry in versions:
            schema_id = "-" if entry.schema_id is None else entry.schema_id
            click.echo(f"{schema_id:>4}  {name} v{entry.version}  {entry.path.name}")
    for problem in problems:
        click.echo(f"warning: {problem}", err=True)


@schemas.command()
@dir_option
@click.argument("name")
@click.option("--version", type=click.IntRange(1), help="Default: the latest.")
def show(directory: Path, name: str, version: int | None) -> None:
    """Print one schema as JSON."""
    by_name, _ = scan(directory, require_ids=False)
    versions = by_name.get(name)
    if not versions:
        raise click.ClickException(f"no schema named {name!r} in {directory} (known: {', '.join(sorted(by_name))})")
    entry = versions[-1] if version is None else next((e for e in versions if e.version == version), None)
    if entry is None:
        raise click.ClickException(f"{name} has no version {version}")
    click.echo(json.dumps(entry.raw, indent=2))


@schemas.command()
@dir_option
@click.option("--registry-url", help="Also register the latest version of every schema with this Confluent "
                                     "Schema Registry (RecordNameStrategy subjects).")
def register(directory: Path, registry_url: str | None) -> None:
    """Give every schema file without an id the next free id (ids.json is append-only)."""
    by_name, _ = scan(directory, require_ids=False)
    ids = read_ids(directory)
    added = []
    for name, versions in sorted(by_name.items()):
        for entry in versions:
            key = f"{name}.v{entry.version}"
            if key not in ids:
                ids[key] = max(ids.values(), default=0) + 1
                added.append(f"{key} = {ids[key]}")
    if added:
        write_ids(directory, ids)
        click.echo(f"{IDS_FILE}: added " + ", ".join(added))
    else:
        click.echo("every schema already has an id")
    result = check_directory(directory)
    if not result.ok:
        for problem in result.problems:
            click.echo(f"INCOMPATIBLE {problem}", err=True)
        raise SystemExit(1)
    if registry_url:
        from schemas.registry import ConfluentRegistry, LocalRegistry

        remote = ConfluentRegistry(registry_url, local=LocalRegistry(directory))
        for name in sorted(by_name):
            schema_id, _ = remote.latest(name)
            click.echo(f"{registry_url}: {name} v{by_name[name][-1].version} registered as id {schema_id}")
