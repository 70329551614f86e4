"""The `gatewatch` command line: the whole command tree, one `add_command` per line.

Each module holds the commands of one area and stays thin: it parses options, loads the
settings (`ops.cli.options`) and calls the code that does the work elsewhere in `ops/`.

    pipeline   demo, run, migrate, status, config
    services   services up|down|status        (local servers, ops/dev/services)
    loadgen    loadgen                         (ops/dev/loadgen)
    schemas    schemas check|list|show|register
    redact     redact
    dlq        dlq inspect|replay
    replay     replay, retention apply
    compact    compact                         (sinks/parquet_compaction)
    privacy    forget, export, audit, vault read|rotate   (ops/privacy)
    api        serve, api-keys create|list|revoke
    deploy     deploy render
    spool      spool status|drain              (ops/spool_drain)
    chdb_host  chdb-host                       (ops/chdb_host: one chdb per machine)
    bench      bench e2e|stages|redaction|state|api|producer|history|tracing|quota|refresh   (ops/bench)
"""

from __future__ import annotations

import click

from ops.bench.api import api as bench_api
from ops.bench.e2e import e2e as bench_e2e
from ops.bench.history import history as bench_history
from ops.bench.producer import producer as bench_producer
from ops.bench.quota import quota as bench_quota
from ops.bench.redaction import redaction as bench_redaction
from ops.bench.refresh import refresh as bench_refresh
from ops.bench.stages import stages as bench_stages
from ops.bench.state import state as bench_state
from ops.bench.tracing import tracing as bench_tracing
from ops.cli.api import api_keys, serve
from ops.cli.chdb_host import chdb_host
from ops.cli.compact import compact
from ops.cli.deploy import deploy
from ops.cli.dlq import dlq
from ops.cli.loadgen import loadgen
from ops.cli.pipeline import demo, migrate, run, show_config, status
from ops.cli.privacy import audit, export, forget, vault
from ops.cli.redact import redact
from ops.cli.replay import replay, retention
from ops.cli.schemas import schemas
from ops.cli.services import services
from ops.cli.spool import spool


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gatewatch")
def cli() -> None:
    """gatewatch: GenAI gateway telemetry from Kafka to Parquet, ClickHouse, Redis quotas and a DLQ."""


@cli.group()
def bench() -> None:
    """Benchmarks (figures are printed, never asserted)."""


cli.add_command(demo)
cli.add_command(run)
cli.add_command(migrate)
cli.add_command(status)
cli.add_command(show_config)
cli.add_command(services)
cli.add_command(loadgen)
cli.add_command(schemas)
cli.add_command(redact)
cli.add_command(dlq)
cli.add_command(replay)
cli.add_command(retention)
cli.add_command(compact)
cli.add_command(forget)
cli.add_command(export)
cli.add_command(audit)
cli.add_command(vault)
cli.add_command(serve)
cli.add_command(api_keys)
cli.add_command(deploy)
cli.add_command(spool)
cli.add_command(chdb_host)

bench.add_command(bench_e2e)
bench.add_command(bench_stages)
bench.add_command(bench_redaction)
bench.add_command(bench_state)
bench.add_command(bench_api)
bench.add_command(bench_tracing)
bench.add_command(bench_producer)
bench.add_command(bench_history)
bench.add_command(bench_quota)
bench.add_command(bench_refresh)


def main() -> None:
    cli()
