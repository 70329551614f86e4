"""`gatewatch serve` (the ingestion API) and `gatewatch api-keys` (its per-org keys);
the server's wiring is `ops.api`."""

from __future__ import annotations

import os

import click

from ops.api import SERVERS, run_server
from ops.cli.options import config_option, settings_from


@click.command("serve")
@config_option
@click.option("--host", help="Listen address (default: api.host).")
@click.option("--port", type=click.IntRange(0, 65535), help="Listen port (default: api.port, 4318 as OTLP/HTTP).")
@click.option("--workers", type=click.IntRange(1, 64), help="Worker processes (default: api.workers).")
@click.option("--server", type=click.Choice(SERVERS), default="granian", show_default=True,
              help="HTTP server (granian measured faster here; see README).")
def serve(config, host, port, workers, server) -> None:
    """The ingestion API: OTLP/HTTP GenAI spans on POST /v1/traces and gateway events as
    JSON on POST /v1/events, authenticated by per-org API keys, into Kafka."""
    settings = settings_from(config)
    if config:
        os.environ["GATEWATCH_CONFIG"] = config
    api = settings.api
    host, port, workers = host or api.host, api.port if port is None else port, workers or api.workers
    click.echo(f"gatewatch serve: {server} on http://{host}:{port} ({workers} worker(s)) -> kafka "
               f"{settings.kafka.bootstrap} topic {settings.kafka.events_topic}", err=True)
    run_server(server, host, port, workers)


@click.group("api-keys")
def api_keys() -> None:
    """Per-org API keys of `gatewatch serve` (only their hashes are stored), in api.keys_url
    (PostgreSQL, shared by every replica) or the SQLite file api.keys_path."""


def _store(config):
    from connectors.ingest_api.keys import open_key_store

    return open_key_store(settings_from(config).api.key_store_url)


@api_keys.command("create")
@config_option
@click.option("--org", required=True, help="Organisation every event sent with this key belongs to.")
@click.option("--region", help="Data-residency region forced on this key's events (default: the event's own).")
def create_key(config, org, region) -> None:
    """Create a key and print it once (it cannot be shown again)."""
    settings = settings_from(config)
    if region and region not in settings.validation.regions:
        raise click.BadParameter(f"{region!r} is not one of validation.regions ({', '.join(settings.validation.regions)})",
                                 param_hint="--region")
    key, record = _store(config).create(org, region)
    click.echo(f"created key {record.key_id} for org {org}" + (f" in region {region}" if region else "")
               + "; store it now, it is not shown again:", err=True)
    click.echo(key)


@api_keys.command("list")
@config_option
@click.option("--org", help="Only this organisation's keys.")
def list_keys(config, org) -> None:
    """Key ids, orgs, regions and state (never the keys)."""
    import json

    for record in _store(config).list(org):
        click.echo(json.dumps({"key_id": record.key_id, "org_id": record.org_id, "region": record.region,
                               "created_at": record.created_at, "revoked": record.revoked_at is not None}))


@api_keys.command("revoke")
@config_option
@click.argument("key_id")
def revoke_key(config, key_id) -> None:
    """Revoke a key by id; running servers refuse it within api.key_cache_s seconds."""
    if not _store(config).revoke(key_id):
        raise click.ClickException(f"no active key {key_id}")
    click.echo(f"revoked {key_id}")
