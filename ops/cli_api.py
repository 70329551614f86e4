"""`gatewatch serve` (the ingestion API) and `gatewatch api-keys` (its per-org keys).

ops wires settings into connectors.ingest_api: one EventProducer per worker process,
each with its own spool slot, and the API key store.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

SERVERS = ("granian", "uvicorn")
SPOOL_SLOTS = 64
log = logging.getLogger("ops.api")


def _load(config: str | None):
    from ops.settings import SettingsError, load_settings

    try:
        return load_settings(config)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def open_producer(settings):
    """An EventProducer on the first free spool slot (a slot's lock belongs to one
    process; a restarted server takes its predecessor's slot and replays it)."""
    from connectors.producer import EventProducer
    from schemas.registry import registry_from_settings

    api = settings.api
    options = {"max_spool_bytes": api.max_spool_bytes, "validation": settings.validation, "durable": api.durable}
    registry = registry_from_settings(settings.schemas)
    for slot in range(SPOOL_SLOTS):
        try:
            return EventProducer(settings.kafka.bootstrap, settings.kafka.events_topic, registry,
                                 Path(api.spool_dir) / f"w{slot}", **options)
        except RuntimeError as exc:
            if "used by another producer" not in str(exc):
                raise
    raise RuntimeError(f"all {SPOOL_SLOTS} spool slots under {api.spool_dir} are in use")


def build_app(settings):
    from connectors.ingest_api.app import ApiConfig, IngestApp
    from connectors.ingest_api.dead_letters import DeadLetters
    from connectors.ingest_api.keys import ApiKeyStore

    api = settings.api
    config = ApiConfig(default_region=api.default_region, max_body_bytes=api.max_body_bytes,
                       max_decompressed_bytes=api.max_decompressed_bytes,
                       max_items_per_request=api.max_items_per_request, max_pending=api.max_pending,
                       retry_after_s=api.retry_after_s)
    return IngestApp(lambda: open_producer(settings), ApiKeyStore(api.keys_path, api.key_cache_s), config,
                     open_dead_letters=lambda: DeadLetters(settings.kafka.bootstrap, settings.kafka.dlq_topic))


def app_factory():
    """Entry point of each server worker process (settings from GATEWATCH_CONFIG and env)."""
    from ops.logs import configure

    settings = _load(os.environ.get("GATEWATCH_CONFIG"))
    configure(settings.log_level)
    return build_app(settings)


def run_server(server: str, host: str, port: int, workers: int) -> None:
    target = "ops.cli_api:app_factory"
    if server == "granian":
        from granian import Granian
        from granian.constants import Interfaces

        Granian(target, address=host, port=port, interface=Interfaces.ASGI, workers=workers, factory=True,
                log_enabled=False).serve()
    else:
        import uvicorn

        uvicorn.run(target, host=host, port=port, workers=workers, factory=True, log_config=None,
                    access_log=False, lifespan="on")


@click.command("serve")
@click.option("--config", type=click.Path(dir_okay=False), envvar="GATEWATCH_CONFIG",
              help="TOML settings file; its [api] section applies (default: $GATEWATCH_CONFIG).")
@click.option("--host", help="Listen address (default: api.host).")
@click.option("--port", type=click.IntRange(0, 65535), help="Listen port (default: api.port, 4318 as OTLP/HTTP).")
@click.option("--workers", type=click.IntRange(1, 64), help="Worker processes (default: api.workers).")
@click.option("--server", type=click.Choice(SERVERS), default="granian", show_default=True,
              help="HTTP server (granian measured faster here; see README).")
def serve(config, host, port, workers, server) -> None:
    """The ingestion API: OTLP/HTTP GenAI spans on POST /v1/traces and gateway events as
    JSON on POST /v1/events, authenticated by per-org API keys, into Kafka."""
    settings = _load(config)
    if config:
        os.environ["GATEWATCH_CONFIG"] = config
    api = settings.api
    host, port, workers = host or api.host, api.port if port is None else port, workers or api.workers
    click.echo(f"gatewatch serve: {server} on http://{host}:{port} ({workers} worker(s)) -> kafka "
               f"{settings.kafka.bootstrap} topic {settings.kafka.events_topic}", err=True)
    run_server(server, host, port, workers)


@click.group("api-keys")
def api_keys() -> None:
    """Per-org API keys of `gatewatch serve` (only their hashes are stored)."""


def _store(config):
    from connectors.ingest_api.keys import ApiKeyStore

    return ApiKeyStore(_load(config).api.keys_path)


_config_option = click.option("--config", type=click.Path(dir_okay=False), envvar="GATEWATCH_CONFIG",
                              help="TOML settings file (default: $GATEWATCH_CONFIG).")


@api_keys.command("create")
@_config_option
@click.option("--org", required=True, help="Organisation every event sent with this key belongs to.")
@click.option("--region", help="Data-residency region forced on this key's events (default: the event's own).")
def create_key(config, org, region) -> None:
    """Create a key and print it once (it cannot be shown again)."""
    settings = _load(config)
    if region and region not in settings.validation.regions:
        raise click.BadParameter(f"{region!r} is not one of validation.regions ({', '.join(settings.validation.regions)})",
                                 param_hint="--region")
    key, record = _store(config).create(org, region)
    click.echo(f"created key {record.key_id} for org {org}" + (f" in region {region}" if region else "")
               + "; store it now, it is not shown again:", err=True)
    click.echo(key)


@api_keys.command("list")
@_config_option
@click.option("--org", help="Only this organisation's keys.")
def list_keys(config, org) -> None:
    """Key ids, orgs, regions and state (never the keys)."""
    import json

    for record in _store(config).list(org):
        click.echo(json.dumps({"key_id": record.key_id, "org_id": record.org_id, "region": record.region,
                               "created_at": record.created_at, "revoked": record.revoked_at is not None}))


@api_keys.command("revoke")
@_config_option
@click.argument("key_id")
def revoke_key(config, key_id) -> None:
    """Revoke a key by id; running servers refuse it within api.key_cache_s seconds."""
    if not _store(config).revoke(key_id):
        raise click.ClickException(f"no active key {key_id}")
    click.echo(f"revoked {key_id}")
