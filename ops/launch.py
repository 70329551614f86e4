"""The one way gatewatch starts a dataflow.

A deployed flow runs as ``python -m bytewax.run dataflows.<name>:flow`` in processes of its
own (`gatewatch run`, the demo, the end-to-end benchmark): the flow builds itself from the
settings in its environment, so every process of a cluster, and every restart, builds the
same flow. A flow that needs more than the settings (a replay's date range) is built by its
caller and runs in this process through `run_here`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ops.recovery import init_recovery

FLOWS = {"ingest": "dataflows.ingest:flow", "feedback": "dataflows.feedback:flow"}


@dataclass(frozen=True)
class Snapshots:
    """Bytewax recovery for a flow process: where, and how often."""

    directory: str | Path
    interval_s: float = 1
    backup_s: float = 0


def flow_command(flow: str = "ingest", workers: int = 1, snapshots: Snapshots | None = None) -> list[str]:
    """The command line of one flow process."""
    command = [sys.executable, "-m", "bytewax.run", FLOWS[flow], "-w", str(workers)]
    if snapshots is not None:
        # bytewax.run takes whole seconds only ("1.0" is an error).
        command += ["-r", str(snapshots.directory), "-s", str(max(1, round(snapshots.interval_s))),
                    "-b", str(round(snapshots.backup_s))]
    return command


def process_env(env: Mapping[str, str], process_id: int | None = None, addresses: str | None = None) -> dict[str, str]:
    """The environment of one process of a cluster. The cluster goes through the environment,
    not -i/-a, so that the flow process can read its own index (ops.cluster) and serve
    metrics on metrics.port + index."""
    env = dict(env)
    if process_id is not None:
        env["BYTEWAX_PROCESS_ID"] = str(process_id)
    if addresses:
        env["BYTEWAX_ADDRESSES"] = addresses
    return env


def run_here(flow, workers: int = 1, recovery_dir: str | Path | None = None, snapshot_s: float = 1) -> None:
    """Run a built flow in this process until its inputs end (resuming from recovery_dir)."""
    from bytewax._bytewax import cli_main
    from bytewax.recovery import RecoveryConfig

    recovery = None
    if recovery_dir:
        init_recovery(recovery_dir)
        recovery = RecoveryConfig(str(Path(recovery_dir)))
    cli_main(flow, workers_per_process=workers, epoch_interval=timedelta(seconds=snapshot_s),
             recovery_config=recovery)
