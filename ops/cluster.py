"""Running a flow as a Bytewax cluster (`-i/-a`, or `-w` above 1): who is who, and what a
cluster may not use.

Embedded ClickHouse (chdb) is refused in a cluster of several processes: a chdb database
lives on the disk of one process. In a cluster the worker that owns a database's key changes
with the process count, so a rescaled cluster would write a second, partial database
elsewhere. A ClickHouse server (`clickhouse://host:port`) has no such problem.

Several workers in one process (`-w N`) may write chdb: they share the process's one chdb
session and disk, and sinks.clickhouse serializes every use of that session (a migration
included) behind one lock. What once froze such a process, chdb's pipeline threads taking
the GIL to read `Python(table)` while the worker's thread waited in the query (chdb-io/chdb#289,
ops/bench/FINDINGS.md), is gone since inserts send Arrow IPC bytes.
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


def refuses_chdb(processes: int) -> bool:
    """Whether a flow of this many processes must write a ClickHouse server, not chdb
    (whatever its workers per process)."""
    return processes > 1


def check_cluster(settings: Settings, processes: int, workers: int = 1) -> None:
    """Raise ClusterError when this settings' flow must not run as `processes` x `workers`."""
    if not refuses_chdb(processes):
        return
    if "clickhouse" in settings.sinks and settings.clickhouse.url.startswith("chdb://"):
        raise ClusterError(
            f"embedded ClickHouse ({settings.clickhouse.url}) cannot be written by a Bytewax cluster "
            f"({processes} process(es) x {workers} worker(s)): its files live on one process's disk, and which "
            "process owns a database changes when the cluster is rescaled. Point clickhouse.url "
            "(GATEWATCH_CLICKHOUSE__URL) at a server, clickhouse://host:9000, or run one process "
            "(with as many workers, -w, as you like).")


def check_environment(settings: Settings, env: Mapping[str, str] = os.environ) -> None:
    """check_cluster for a flow process started by `python -m bytewax.run` (which passes the
    cluster through BYTEWAX_ADDRESSES and BYTEWAX_WORKERS_PER_PROCESS when set)."""
    workers = int(env.get("BYTEWAX_WORKERS_PER_PROCESS") or 1)
    check_cluster(settings, max(1, len(cluster_addresses(env))), workers)
