"""PostgreSQL from Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``), for
the audit log: a cluster made once with ``initdb`` (superuser ``gatewatch``, trust auth on
127.0.0.1 only) and a database ``gatewatch``.

PostgreSQL refuses to run as root, so under root the server runs as the ``postgres`` user and
its cluster lives where that user can reach it (``/var/lib/gatewatch/postgres-<hash of the
data dir>``; a home directory such as /root is closed to it); otherwise in ``data_dir/cluster``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops.dev.services.supervision import HOST, Service, ServiceUnavailable, _start

SUPERUSER = "gatewatch"
DATABASE = "gatewatch"
CLUSTERS_FOR_ROOT = Path("/var/lib/gatewatch")


def postgres_bin_dir() -> str | None:
    """The newest installed ``/usr/lib/postgresql/<version>/bin`` with initdb and postgres."""
    found = [d for d in glob.glob("/usr/lib/postgresql/*/bin")
             if os.access(f"{d}/postgres", os.X_OK) and os.access(f"{d}/initdb", os.X_OK)]
    return max(found, key=lambda d: int(Path(d).parent.name.split(".")[0]), default=None)


def _server_user() -> str | None:
    """Who runs the server: ``postgres`` when we are root, else ourselves (None)."""
    return "postgres" if os.geteuid() == 0 else None


def cluster_dir(data_dir: Path) -> Path:
    if _server_user() is None:
        return data_dir / "cluster"
    return CLUSTERS_FOR_ROOT / f"postgres-{hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]}"


def _as_server_user(user: str | None) -> dict[str, Any]:
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _init_cluster(bin_dir: str, cluster: Path, user: str | None) -> None:
    """initdb once; a cluster that exists keeps its data."""
    if (cluster / "PG_VERSION").exists():
        return
    cluster.mkdir(parents=True, exist_ok=True, mode=0o700)
    if user is not None:
        shutil.chown(cluster, user, user)
    initdb = subprocess.run(
        [f"{bin_dir}/initdb", "-D", str(cluster), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
         "--locale=C"], cwd=str(cluster), stdin=subprocess.DEVNULL, capture_output=True, timeout=180,
        **_as_server_user(user))
    if initdb.returncode:
        raise ServiceUnavailable(f"postgres: initdb failed in {cluster}: "
                                 f"{initdb.stderr.decode(errors='replace')[-800:]}")


def start_postgres(
    data_dir: str | os.PathLike,
    port: int | None = None,
    timeout: float = 60,
    die_with_parent: bool = False,
) -> Service:
    """PostgreSQL on 127.0.0.1 with its log in ``data_dir``; the address is
    ``postgresql://gatewatch@127.0.0.1:PORT/gatewatch``."""
    bin_dir = postgres_bin_dir()
    if not bin_dir:
        raise ServiceUnavailable("postgres: no PostgreSQL server binaries (apt-get install postgresql)")
    data_dir = Path(data_dir).absolute()
    user = _server_user()
    cluster = cluster_dir(data_dir)
    _init_cluster(bin_dir, cluster, user)

    def build(directory: Path, chosen: int) -> tuple[list[str], dict]:
        # The socket goes into the cluster directory: /var/run/postgresql may not exist.
        return [f"{bin_dir}/postgres", "-D", str(cluster), "-p", str(chosen), "-k", str(cluster),
                "-c", f"listen_addresses={HOST}"], {
            "cluster_dir": str(cluster), "run_as": user,
            # SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client to leave.
            "stop_signal": int(signal.SIGINT)}

    def probe_for(service: Service) -> Callable[[], Any]:
        def probe() -> None:
            import psycopg

            with psycopg.connect(f"postgresql://{SUPERUSER}@{service.host}:{service.port}/postgres",
                                 connect_timeout=2, autocommit=True) as connection:
                exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
                if not exists:
                    connection.execute(f"CREATE DATABASE {DATABASE}")

        return probe

    return _start("postgres", "postgresql", data_dir, port, build, probe_for,
                  lambda p: f"postgresql://{SUPERUSER}@{HOST}:{p}/{DATABASE}", timeout, die_with_parent,
                  run_as=user)
