"""The ingestion API's wiring: settings into connectors.ingest_api.

One EventProducer per server worker process, each with its own spool slot, and the API
key store. `app_factory` is what each granian/uvicorn worker imports, so this module
stays free of the CLI.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

SERVERS = ("granian", "uvicorn")
SPOOL_SLOTS = 64


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
    from connectors.ingest_api.keys import open_key_store

    api = settings.api
    config = ApiConfig(default_region=api.default_region, max_body_bytes=api.max_body_bytes,
                       max_decompressed_bytes=api.max_decompressed_bytes,
                       max_items_per_request=api.max_items_per_request, max_pending=api.max_pending,
                       retry_after_s=api.retry_after_s)
    return IngestApp(lambda: open_producer(settings), open_key_store(api.key_store_url, api.key_cache_s), config,
                     open_dead_letters=lambda: DeadLetters(settings.kafka.bootstrap, settings.kafka.dlq_topic))


def tune_gc() -> None:
    """A request allocates thousands of short-lived dicts and lists: with the default
    thresholds (gen0 at 700) the cyclic collector ran ~4 times per 500-event request and
    now and then walked every object the imports left (protobuf descriptors, schemas),
    4.3 us per event in `gatewatch serve` (gc.callbacks, OTLP). Objects alive after
    start-up are frozen out of collections, and gen0 waits for 20,000 allocations:
    nearly all request garbage is freed by reference counting before that."""
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def app_factory():
    """Entry point of each server worker process (settings from GATEWATCH_CONFIG and env)."""
    from ops.logs import configure
    from ops.settings import load_settings
    from ops.tracing import install_tracing

    settings = load_settings(os.environ.get("GATEWATCH_CONFIG"))
    configure(settings.log_level)
    install_tracing(settings.tracing, "serve")
    app = build_app(settings)
    tune_gc()
    return app


def run_server(server: str, host: str, port: int, workers: int) -> None:
    target = "ops.api:app_factory"
    if server == "granian":
        from granian import Granian
        from granian.constants import Interfaces

        Granian(target, address=host, port=port, interface=Interfaces.ASGI, workers=workers, factory=True,
                log_enabled=False).serve()
    else:
        import uvicorn

        uvicorn.run(target, host=host, port=port, workers=workers, factory=True, log_config=None,
                    access_log=False, lifespan="on")
