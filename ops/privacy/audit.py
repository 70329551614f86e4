"""The access audit: every CLI command that reads or changes stored data appends who ran
it, what, on which scope and how it ended to the audit store's append-only access_audit
table (audit.url: PostgreSQL, or embedded SQLite), and to ClickHouse's access_audit as well
(dashboards read it there); `gatewatch audit` reads the audit store.

The "started" row is written before the command touches anything: when the audit table
cannot be written, the command does not run.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from datetime import date, datetime, timezone
from typing import Iterator

import pyarrow as pa

from ops.settings import Settings
from sinks.audit_log import AuditStore, load_hash_key, months_back, open_store
from sinks.clickhouse import ClickHouse

AUDIT_SCHEMA = pa.schema([("at", pa.timestamp("ms", tz="UTC")), ("command_id", pa.string()), ("actor", pa.string()),
                          ("command", pa.string()), ("scope", pa.string()), ("outcome", pa.string())])


def hash_key(settings: Settings) -> bytes:
    """The key of the audit's user hash (sinks.audit_log.load_hash_key)."""
    secret = settings.audit.hash_key
    return load_hash_key(secret.get_secret_value() if secret is not None else None, settings.audit.hash_key_file)


def actor() -> str:
    """GATEWATCH_ACTOR when a wrapper (a portal, a CI job) knows the person; else user@host."""
    return os.environ.get("GATEWATCH_ACTOR") or f"{getpass.getuser()}@{socket.gethostname()}"


def audit_row(command_id: str, command: str, scope: dict, outcome: str, now_ms: int | None = None) -> dict:
    return {"at": now_ms if now_ms is not None else int(time.time() * 1000), "command_id": command_id,
            "actor": actor(), "command": command, "scope": json.dumps(scope, sort_keys=True, default=str),
            "outcome": outcome}


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def open_audit(settings: Settings) -> AuditStore:
    """The audit store of audit.url, its tables created (by their owner) if missing."""
    store = open_store(settings.audit.url, settings.audit.app_role)
    store.migrate()
    return store


def prepare_audit(settings: Settings, today: date | None = None, ahead: int = 3) -> list[str]:
    """Tables and monthly partitions from last month to `ahead` months on (run by the owner,
    so that an application role never meets a month without its partition)."""
    today = today or datetime.now(timezone.utc).date()
    store = open_audit(settings)
    try:
        return store.create_months(months_back(date(today.year, today.month, 1), 1), ahead + 2)
    finally:
        store.close()


class AccessAudit:
    def __init__(self, settings: Settings):
        self.store = open_audit(settings)
        self.clickhouse = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
        self.clickhouse.migrate(settings.retention.raw_days, settings.retention.aggregate_days)

    def append(self, row: dict) -> None:
        self.store.append_access(row)
        self.clickhouse.insert("access_audit", pa.Table.from_pylist([row], AUDIT_SCHEMA))

    def read(self, since: datetime | None = None, command: str | None = None) -> list[dict]:
        since_ms = int(since.astimezone(timezone.utc).timestamp() * 1000) if since is not None else None
        return [{**row, "at": _iso(row["at"])} for row in self.store.read_access(since_ms, command)]


@contextmanager
def audited(settings: Settings, command: str, scope: dict) -> Iterator[None]:
    log = AccessAudit(settings)
    command_id = str(uuid.uuid4())
    log.append(audit_row(command_id, command, scope, "started"))
    try:
        yield
    except BaseException as exc:
        log.append(audit_row(command_id, command, scope, f"failed: {type(exc).__name__}"))
        raise
    log.append(audit_row(command_id, command, scope, "succeeded"))
