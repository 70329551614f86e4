"""`gatewatch chdb-host`: one embedded ClickHouse per machine for every flow process on it
(ops/chdb_host.py)."""

from __future__ import annotations

import os
from pathlib import Path

import click


@click.command("chdb-host")
@click.option("--url", required=True, metavar="chdb://DIR[?setting=value&...]",
              help="The chdb database the host owns (server settings in the query, as for a flow's chdb:// URL).")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False),
              help="Unix socket to serve on; flows write to clickhouse.url = chdb+unix://<absolute path>.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Prometheus metrics on 127.0.0.1:PORT (statements, errors, seconds, bytes).")
def chdb_host(url: str, socket_path: str, metrics_port: int | None) -> None:
    """Serve one chdb database to every flow process of this machine over a Unix socket.

    The host replaces this interpreter with a lean one (chdb without pyarrow, bytewax or the
    redactor), so its resident memory is chdb's once for the machine. It runs in the
    foreground until SIGTERM or Ctrl-C; JSON logs go to stderr."""
    if not url.startswith("chdb://"):
        raise click.UsageError(f"--url must be chdb://DIR, got {url!r}")
    from ops.chdb_host import host_command, host_env

    command = host_command(url, Path(socket_path).resolve(), metrics_port)
    os.execve(command[0], command, host_env(dict(os.environ)))
