"""``up``/``down``/``status`` of the dev CLI (``gatewatch services``): start the servers whose
binaries are installed on their preferred ports and record them in the state file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ops.dev.services.supervision import ServiceUnavailable, Service, port_is_free, _port_conflict
from ops.dev.services.kafka import start_kafka
from ops.dev.services.redis import redis_binary, start_redis
from ops.dev.services.s3 import start_s3
from ops.dev.services.clickhouse import clickhouse_binary, start_clickhouse
from ops.dev.services.postgres import start_postgres
from ops.dev.services.state import _save_state, _state_path, load_state, state_dir_default

SERVICE_NAMES = ("kafka", "redis", "s3", "clickhouse", "postgres")
# PostgreSQL only serves the audit log, whose default is an embedded SQLite file: it starts
# when asked for (by name, or ``up(postgres=True)``).
DEFAULT_SERVICES = ("kafka", "redis", "s3", "clickhouse")
# Ports `up` tries first, so that the settings defaults match when they are free.
PREFERRED_PORTS = {"kafka": 9092, "redis": 6379, "s3": 5000, "clickhouse": 9000, "postgres": 5432}


def _available(name: str) -> bool:
    if name == "clickhouse":
        return clickhouse_binary() is not None
    if name == "redis":
        return redis_binary() is not None
    return True


def _start_named(name: str, data_dir: Path, port: int | None, kafka_kind: str, s3_kind: str) -> Service:
    if name == "kafka":
        return start_kafka(data_dir, port, kind=kafka_kind)
    if name == "redis":
        return start_redis(data_dir, port, appendonly=True)
    if name == "s3":
        return start_s3(data_dir, port, kind=s3_kind)
    if name == "postgres":
        return start_postgres(data_dir, port)
    http_port = 8123 if port == PREFERRED_PORTS["clickhouse"] and port_is_free(8123) else None
    return start_clickhouse(data_dir, port, http_port=http_port)


def up(
    state_dir: str | os.PathLike | None = None,
    names: Iterable[str] | None = None,
    kafka_kind: str = "noida",
    s3_kind: str = "moto",
    on_start: Callable[[Service, bool], None] | None = None,
    postgres: bool = False,
) -> dict[str, Service]:
    """Start the named services (default: all of DEFAULT_SERVICES whose binaries are installed,
    and PostgreSQL when ``postgres``) in the background, record them in
    ``state_dir/services.json`` and return every recorded service.

    A service recorded and still alive is left running. Each service keeps its data under
    ``state_dir/<name>`` and gets its preferred port (9092, 6379, 5000, 9000) when free.
    Raises ServiceUnavailable naming the one that failed; the ones started before it stay up
    and recorded (``down`` stops them).
    """
    state_dir = Path(state_dir or state_dir_default()).expanduser()
    names = list(names or [])
    # PostgreSQL asked for and not installed fails with how to install it, never silently.
    wanted = list(dict.fromkeys(names)) if names else \
        [n for n in DEFAULT_SERVICES if _available(n)] + (["postgres"] if postgres else [])
    unknown = [n for n in wanted if n not in SERVICE_NAMES]
    if unknown:
        raise ValueError(f"unknown service(s) {unknown}: choose from {', '.join(SERVICE_NAMES)}")
    services = load_state(state_dir)
    for name in wanted:
        current = services.get(name)
        if current is not None and current.alive():
            if on_start:
                on_start(current, False)
            continue
        data_dir = state_dir / name
        # Same port as last time if it is still free (clients keep working), else the
        # preferred one if free, else any free one.
        port = None
        for candidate in ((current.port if current else None), PREFERRED_PORTS[name]):
            if candidate and port_is_free(candidate):
                port = candidate
                break
        try:
            service = _start_named(name, data_dir, port, kafka_kind, s3_kind)
        except ServiceUnavailable as exc:
            if port is None or not _port_conflict(exc):
                raise
            service = _start_named(name, data_dir, None, kafka_kind, s3_kind)  # port taken meanwhile
        services[name] = service
        _save_state(state_dir, services)
        if on_start:
            on_start(service, True)
    return services


def down(state_dir: str | os.PathLike | None = None, names: Iterable[str] | None = None,
         timeout: float = 10) -> list[str]:
    """Stop recorded services (all, or ``names``) by PID; returns the names that were running.
    The data directories stay, so the next ``up`` finds the data again (noida, redis AOF)."""
    state_dir = Path(state_dir or state_dir_default()).expanduser()
    services = load_state(state_dir)
    chosen = list(names) if names else list(services)
    stopped = []
    for name in chosen:
        service = services.pop(name, None)
        if service is None:
            continue
        if service.alive():
            stopped.append(name)
        service.stop(timeout=timeout)
    if services:
        _save_state(state_dir, services)
    else:
        with contextlib.suppress(FileNotFoundError):
            _state_path(state_dir).unlink()
    return stopped


def status(state_dir: str | os.PathLike | None = None) -> list[tuple[str, str, bool]]:
    """``(name, address, alive)`` for every recorded service."""
    return [(name, service.address, service.alive()) for name, service in load_state(state_dir).items()]
