"""The one way gatewatch starts a dataflow; the settings are loaded here, in the composition
root, and passed to the flow's build function (``dataflows`` never imports ``ops``).

A deployed flow runs as ``python -m bytewax.run ops.launch:ingest`` (or ``:feedback``) in
processes of its own (`gatewatch run`, the demo, the end-to-end benchmark): the flow builds
itself from the settings in its environment, so every process of a cluster, and every
restart, builds the same flow, with JSON logs, the Prometheus backend of the metrics hook
(installed by importing ``ops.metrics``), the metrics endpoint, OpenTelemetry spans when
``tracing.otlp_endpoint`` is set (``ops.tracing``), the cluster check and a stack
dump on SIGUSR1. A flow that needs more than the settings (a replay's date range) is built by
its caller and runs in this process through `run_here`.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import gc
import logging
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Callable

from bytewax.dataflow import Dataflow

from dataflows.feedback import build_flow as build_feedback
from dataflows.ingest import build_flow as build_ingest
from dataflows.replay import build_flow as build_replay_flow
from ops import metrics
from ops.allocators import CHDB_JEMALLOC, FLOW_ALLOCATOR_ENV, malloc_report
from ops.cluster import check_environment
from ops.logs import configure as configure_logs
from ops.recovery import init_recovery
from ops.settings import Settings, load_settings
from ops.tracing import install_tracing

# Reached through __getattr__ below: no module-level name may be called like a flow.
FLOWS: dict[str, Callable[[Settings], Dataflow]] = {"ingest": build_ingest, "feedback": build_feedback}
ENTRY_POINTS = {name: f"ops.launch:{name}" for name in FLOWS}
"""What `python -m bytewax.run` is given for each flow."""


def build(flow: str, settings: Settings) -> Dataflow:
    """A flow of FLOWS with this process's logs configured."""
    configure_logs(settings.log_level)
    return FLOWS[flow](settings)


def build_replay(settings: Settings, first: date, last: date, region: str | None = None) -> Dataflow:
    configure_logs(settings.log_level)
    return build_replay_flow(settings, first, last, region)


def allocator_report() -> dict[str, str | None]:
    """What this process's allocators are, read inside it: logged at start-up so an operator
    (and a test) can see that FLOW_ALLOCATOR_ENV took effect."""
    import pyarrow as pa

    return {"arrow_pool": pa.default_memory_pool().backend_name, **malloc_report()}


def from_environment(flow: str) -> Dataflow:
    """A flow for `python -m bytewax.run`: settings from the environment, metrics served."""
    os.environ.setdefault("JE_MALLOC_CONF", CHDB_JEMALLOC)
    settings = load_settings()
    # A cluster of processes cannot write embedded chdb (ops/cluster.py says why).
    check_environment(settings, {**os.environ, **bytewax_scaling(sys.argv)})
    # `kill -USR1 <pid>` prints every thread's stack to the log: what a stuck flow is waiting on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if settings.metrics.port is not None:
        index = int(os.environ.get("BYTEWAX_PROCESS_ID", 0)) if settings.metrics.offset_by_process else 0
        metrics.serve(settings.metrics.port + index, settings.metrics.host)
    if settings.metrics.dump_path:
        atexit.register(metrics.dump_counters, settings.metrics.dump_path)
    install_tracing(settings.tracing, f"flow-{flow}")
    built = build(flow, settings)
    settle_heap()
    logging.getLogger(__name__).info("allocators", extra=allocator_report())
    return built


def bytewax_scaling(argv: list[str], env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The cluster of a flow process started by `python -m bytewax.run`, as environment
    variables (ops.cluster reads those): bytewax.run takes -w/-a from its arguments too, and
    from the Helm chart's hostfile, without putting them in the environment. Nothing when
    argv is not bytewax.run's."""
    if Path(argv[0] if argv else "").parts[-2:] != ("bytewax", "run.py"):
        return {}
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("-w", "--workers-per-process")
    parser.add_argument("-a", "--addresses")
    known, _others = parser.parse_known_args(argv[1:])
    addresses = known.addresses
    if addresses is None and env.get("BYTEWAX_HOSTFILE_PATH"):
        addresses = ";".join(line.strip() for line in Path(env["BYTEWAX_HOSTFILE_PATH"]).read_text().splitlines()
                             if line.strip())
    scaling = {"BYTEWAX_WORKERS_PER_PROCESS": known.workers_per_process, "BYTEWAX_ADDRESSES": addresses}
    return {name: value for name, value in scaling.items() if value is not None}


YOUNG_GENERATION = 50_000
"""Allocations between young collections. CPython's default (700) runs a full collection every
few hundred thousand allocations, and each walks every object the process holds (~270,000
after the redaction models load, plus the batched events): 15 full collections in a 100,000
event drain with the default, 1 with this (ops/bench/FINDINGS.md)."""


def settle_heap() -> None:
    """Start-up work done once, before the first event, so the drain does not pay for it: the
    first Parquet table imports pandas (pyarrow does, on its first list conversion), and the
    young generation grows. No gc.freeze(): frozen objects are never collected at exit, and
    with it a flow process exited non-zero, without a traceback, at chdb's shutdown
    (test_chaos)."""
    from sinks.parquet import to_table

    to_table([])
    gc.collect()
    gc.set_threshold(YOUNG_GENERATION, 20, 10)


def __getattr__(name: str) -> Dataflow:
    # Built only when bytewax.run asks for the attribute: importing this module builds nothing.
    if name in FLOWS:
        return from_environment(name)
    raise AttributeError(name)


@dataclass(frozen=True)
class Snapshots:
    """Bytewax recovery for a flow process: where, and how often."""

    directory: str | Path
    interval_s: float = 1
    backup_s: float = 0


def flow_command(flow: str = "ingest", workers: int = 1, snapshots: Snapshots | None = None) -> list[str]:
    """The command line of one flow process: a flow of FLOWS, or a MODULE:ATTR entry point
    (a variant measured by `bench e2e --flow`)."""
    command = [sys.executable, "-m", "bytewax.run", ENTRY_POINTS.get(flow, flow), "-w", str(workers)]
    if snapshots is not None:
        # bytewax.run takes whole seconds only ("1.0" is an error).
        command += ["-r", str(snapshots.directory), "-s", str(max(1, round(snapshots.interval_s))),
                    "-b", str(round(snapshots.backup_s))]
    return command


def process_env(env: Mapping[str, str], process_id: int | None = None, addresses: str | None = None) -> dict[str, str]:
    """The environment of one process of a cluster. The cluster goes through the environment,
    not -i/-a, so that the flow process can read its own index (ops.cluster) and serve
    metrics on metrics.port + index. FLOW_ALLOCATOR_ENV fills what the environment leaves unset."""
    env = {**FLOW_ALLOCATOR_ENV, **env}
    if process_id is not None:
        env["BYTEWAX_PROCESS_ID"] = str(process_id)
    if addresses:
        env["BYTEWAX_ADDRESSES"] = addresses
    return env


def run_here(flow: Dataflow, workers: int = 1, recovery_dir: str | Path | None = None, snapshot_s: float = 1) -> None:
    """Run a built flow in this process until its inputs end (resuming from recovery_dir)."""
    from bytewax._bytewax import cli_main
    from bytewax.recovery import RecoveryConfig

    recovery = None
    if recovery_dir:
        init_recovery(recovery_dir)
        recovery = RecoveryConfig(str(Path(recovery_dir)))
    cli_main(flow, workers_per_process=workers, epoch_interval=timedelta(seconds=snapshot_s),
             recovery_config=recovery)
