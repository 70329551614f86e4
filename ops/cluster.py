"""Running a flow as a Bytewax cluster (`-i/-a`, or `-w` above 1): who is who, and what a
cluster may not use.

Embedded ClickHouse (chdb://) is refused in a cluster of several processes: a chdb database
lives on the disk of one process. In a cluster the worker that owns a database's key changes
with the process count, so a rescaled cluster would write a second, partial database
elsewhere. A ClickHouse server (`clickhouse://host:port`) has no such problem, and neither
has a chdb host (`chdb+unix:///path/host.sock`, `gatewatch chdb-host`) when every process of
the cluster runs on its machine: they all write its one database, whichever worker owns a
key and however many processes there are. Processes on several machines would each reach
their own machine's host, so that is refused.

Several workers in one process (`-w N`) may write chdb: each has its own handle on the
process's one chdb engine (sinks.chdb_session), their statements run in parallel, and only
their migrations take turns. What once froze such a process, chdb's pipeline threads taking
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


LOOPBACK_NAMES = frozenset({"localhost", "::1", "[::1]"})


def machines_of(addresses: list[str]) -> int:
    """How many machines the host:port addresses of a cluster name (loopback is one)."""
    hosts = {address.rsplit(":", 1)[0].strip() for address in addresses}
    return len({"loopback" if host in LOOPBACK_NAMES or host.startswith("127.") else host for host in hosts})


def check_cluster(settings: Settings, processes: int, workers: int = 1, machines: int = 1) -> None:
    """Raise ClusterError when this settings' flow must not run as `processes` x `workers`
    spread over `machines`."""
    if not refuses_chdb(processes) or "clickhouse" not in settings.sinks:
        return
    url = settings.clickhouse.url
    if url.startswith("chdb://"):
        raise ClusterError(
            f"embedded ClickHouse ({url}) cannot be written by a Bytewax cluster "
            f"({processes} process(es) x {workers} worker(s)): its files live on one process's disk, and which "
            "process owns a database changes when the cluster is rescaled. Point clickhouse.url "
            "(GATEWATCH_CLICKHOUSE__URL) at a server, clickhouse://host:9000, or, with every process on one "
            "machine, at a chdb host that serves that directory to all of them (`gatewatch chdb-host --url "
            f"{url} --socket /path/host.sock`, then chdb+unix:///path/host.sock); or run one process "
            "(with as many workers, -w, as you like).")
    if url.startswith("chdb+unix://") and machines > 1:
        raise ClusterError(
            f"a chdb host ({url}) serves the processes of its own machine, and this cluster spans {machines} "
            "machines: each would write its own machine's database. Point clickhouse.url at a ClickHouse "
            "server (clickhouse://host:9000) or run the cluster on one machine.")


def check_environment(settings: Settings, env: Mapping[str, str] = os.environ) -> None:
    """check_cluster for a flow process started by `python -m bytewax.run` (which passes the
    cluster through BYTEWAX_ADDRESSES and BYTEWAX_WORKERS_PER_PROCESS when set)."""
    workers = int(env.get("BYTEWAX_WORKERS_PER_PROCESS") or 1)
    addresses = cluster_addresses(env)
    check_cluster(settings, max(1, len(addresses)), workers, machines_of(addresses))
