"""Running a flow as a Bytewax cluster (`-i/-a`, or `-w` above 1): who is who, and what a
cluster may not use.

Embedded ClickHouse (chdb) is refused in a cluster. Two reasons, either enough:

- Bytewax runs its workers on threads of their own whenever a process has peers or more
  than one worker (`cluster_main`), and the process's main thread takes the GIL every
  few milliseconds to look for signals. chdb's `INSERT ... SELECT * FROM Python(table)`
  reads the Arrow table from ClickHouse pipeline threads that take the GIL themselves;
  under that contention a pipeline thread ends up holding the GIL while it waits for the
  query thread, which waits for the GIL: the process freezes for good, its metrics
  endpoint stops answering, and every other process of the cluster spins in timely's
  `step_or_park` waiting for progress that never comes (the "one process at 100 % in Rust,
  the other idle" stall). Same class of bug as chdb-io/chdb#289 ("Fix starving caused by
  GIL"). Reproduced with tansu + 2 processes at 500 events/s; stacks in ops/bench/FINDINGS.md.
- A chdb database lives on the disk of one process. In a cluster the worker that owns a
  database's key changes with the process count, so a rescaled cluster would write a
  second, partial database elsewhere.

A ClickHouse server (`clickhouse://host:port`) has neither problem.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ops.settings import Settings


class ClusterError(ValueError):
    """A cluster that cannot run as configured; the message says what to change."""


def cluster_addresses(env: Mapping[str, str] = os.environ) -> list[str]:
    """host:port of every process of the cluster this process belongs to (empty: alone)."""
    return [address for address in env.get("BYTEWAX_ADDRESSES", "").split(";") if address.strip()]


def addresses_for(processes: int, ports: list[int], host: str = "127.0.0.1") -> str:
    """The BYTEWAX_ADDRESSES value of `processes` processes on one host."""
    if len(ports) != processes:
        raise ValueError(f"{processes} processes need {processes} ports, got {len(ports)}")
    return ";".join(f"{host}:{port}" for port in ports)


def runs_threaded(processes: int, workers: int) -> bool:
    """Whether Bytewax runs the workers on threads of their own (cluster_main), not on the
    main thread (run_main)."""
    return processes > 1 or workers > 1


def check_cluster(settings: Settings, processes: int, workers: int = 1) -> None:
    """Raise ClusterError when this settings' flow must not run as `processes` x `workers`."""
    if not runs_threaded(processes, workers):
        return
    if "clickhouse" in settings.sinks and settings.clickhouse.url.startswith("chdb://"):
        raise ClusterError(
            f"embedded ClickHouse ({settings.clickhouse.url}) cannot be written by a Bytewax cluster "
            f"({processes} process(es) x {workers} worker(s)): chdb deadlocks on the GIL when a worker runs on "
            "its own thread, and its files live on one process's disk. Point clickhouse.url "
            "(GATEWATCH_CLICKHOUSE__URL) at a server, clickhouse://host:9000, or run one process with one worker.")


def check_environment(settings: Settings, env: Mapping[str, str] = os.environ) -> None:
    """check_cluster for a flow process started by `python -m bytewax.run` (which passes the
    cluster through BYTEWAX_ADDRESSES and BYTEWAX_WORKERS_PER_PROCESS when set)."""
    workers = int(env.get("BYTEWAX_WORKERS_PER_PROCESS") or 1)
    check_cluster(settings, max(1, len(cluster_addresses(env))), workers)
