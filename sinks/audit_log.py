"""The audit log: one append-only row per unique event (who, what, when, where, from which
offset) and the access audit of data commands, in PostgreSQL or, for the demo, an embedded
SQLite file with the same schema and guarantees.

- One row per event: the key is (org_id, event_id) (plus event_time on PostgreSQL, which
  wants the partition key in every unique key; an event's time never changes), and rows
  go in with ON CONFLICT DO NOTHING, so retries, duplicates and replays insert nothing twice.
- Append-only: triggers refuse UPDATE and DELETE for everyone; on PostgreSQL the
  application role is granted SELECT and INSERT only.
- Partitioned by month of event_time; retention drops whole partitions (a DROP is not a
  DELETE, and only the owner may do it).

Users appear only as a keyed hash (HMAC-SHA-256 with a secret the operator holds): without
the key nobody can confirm a candidate user id against the log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

from schemas.vocabulary import user_key
from sinks.metrics import count_written, observe_freshness
from sinks.retry import Retry

EVENT_COLUMNS = ("org_id", "event_id", "event_time", "request_id", "user_hash", "model", "classification",
                 "policy_flags", "safety_decisions", "pii_entity_counts", "region", "source_partition",
                 "source_offset")
ACCESS_COLUMNS = ("at", "command_id", "actor", "command", "scope", "outcome")
_MONTH_TABLE = re.compile(r"^audit_log_y(\d{4})m(\d{2})$")


def keyed_hash(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def user_hash(key: bytes, org_id: str | None, user_id: str) -> str:
    """What the audit records instead of a user id ("*" for every org)."""
    return keyed_hash(key, user_key(org_id if org_id is not None else "*", user_id))


def audit_row(event: dict, key: bytes) -> dict:
    """The audit record of one unique (redacted) event: no text, no user id."""
    return {"org_id": event["org_id"], "event_id": event["event_id"], "event_time": event["event_time"],
            "request_id": event["request_id"], "user_hash": user_hash(key, event["org_id"], event["user_id"]),
            "model": event["model"], "classification": event.get("classification") or "",
            "policy_flags": list(event.get("policy_flags") or ()),
            "safety_decisions": list(event.get("safety_decisions") or ()),
            "pii_entity_counts": dict(event.get("pii_entity_counts") or {}),
            "region": event["region"], "source_partition": event.get("source_partition"),
            "source_offset": event.get("source_offset")}


def month_of(epoch_ms: int) -> date:
    at = datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc)
    return date(at.year, at.month, 1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def months_back(month: date, count: int) -> date:
    index = month.year * 12 + month.month - 1 - count
    return date(index // 12, index % 12 + 1, 1)


def month_table(month: date) -> str:
    return f"audit_log_y{month.year:04d}m{month.month:02d}"


def table_month(name: str) -> date | None:
    match = _MONTH_TABLE.match(name)
    return date(int(match.group(1)), int(match.group(2)), 1) if match else None


class MissingPartition(PermissionError):
    """An event's month has no partition and this role may not add one."""


class AuditStore(Protocol):
    def migrate(self) -> None: ...
    def insert_events(self, rows: list[dict]) -> int: ...
    def append_access(self, row: dict) -> None: ...
    def read_access(self, since_ms: int | None = None, command: str | None = None) -> list[dict]: ...
    def event_count(self) -> int: ...
    def events_of(self, user_hash: str) -> list[dict]: ...
    def months(self) -> list[date]: ...
    def create_months(self, first: date, count: int) -> list[str]: ...
    def drop_months_before(self, oldest_kept: date) -> list[str]: ...
    def close(self) -> None: ...


def open_store(url: str, app_role: str | None = None) -> AuditStore:
    """sqlite:///PATH or postgresql://user@host:port/db."""
    if url.startswith("sqlite:///"):
        return SqliteAudit(url[len("sqlite:///"):])
    return PostgresAudit(url, app_role)


def _month_ranges(rows: list[dict]) -> set[date]:
    return {month_of(row["event_time"]) for row in rows}


def _consecutive_months(first: date, count: int) -> set[date]:
    months = [first]
    while len(months) < count:
        months.append(next_month(months[-1]))
    return set(months)


# -- SQLite: one table per month behind a view ---------------------------------------------

_SQLITE_EVENT_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    org_id TEXT NOT NULL, event_id TEXT NOT NULL, event_time INTEGER NOT NULL, request_id TEXT NOT NULL,
    user_hash TEXT NOT NULL, model TEXT NOT NULL, classification TEXT NOT NULL, policy_flags TEXT NOT NULL,
    safety_decisions TEXT NOT NULL, pii_entity_counts TEXT NOT NULL, region TEXT NOT NULL,
    source_partition INTEGER, source_offset INTEGER,
    logged_at INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER) * 1000),
    PRIMARY KEY (org_id, event_id)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS {table}_no_update BEFORE UPDATE ON {table}
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS {table}_no_delete BEFORE DELETE ON {table}
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: DELETE refused'); END;
"""

_SQLITE_ACCESS_TABLE = """
CREATE TABLE IF NOT EXISTS access_audit (
    at INTEGER NOT NULL, command_id TEXT NOT NULL, actor TEXT NOT NULL, command TEXT NOT NULL,
    scope TEXT NOT NULL, outcome TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS access_audit_no_update BEFORE UPDATE ON access_audit
BEGIN SELECT RAISE(ABORT, 'the access audit is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS access_audit_no_delete BEFORE DELETE ON access_audit
BEGIN SELECT RAISE(ABORT, 'the access audit is append-only: DELETE refused'); END;
"""


class SqliteAudit:
    """The embedded audit: monthly tables audit_log_yYYYYmMM, the view audit_log over them."""

    def __init__(self, path: str):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self.connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA busy_timeout=30000")

    def migrate(self) -> None:
        self.connection.executescript(_SQLITE_ACCESS_TABLE)

    def _tables(self) -> list[str]:
        names = [name for (name,) in self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return sorted(name for name in names if table_month(name))

    def _ensure_months(self, months: set[date]) -> None:
        missing = {month_table(m) for m in months} - set(self._tables())
        if not missing:
            return
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            for table in sorted(missing):
                for statement in _SQLITE_EVENT_TABLE.format(table=table).split(";\n"):
                    if statement.strip():
                        self.connection.execute(statement)
            self._rebuild_view()
            self.connection.execute("COMMIT")
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise

    def _rebuild_view(self) -> None:
        tables = self._tables()
        self.connection.execute("DROP VIEW IF EXISTS audit_log")
        if tables:
            self.connection.execute("CREATE VIEW audit_log AS " + " UNION ALL ".join(
                f"SELECT * FROM {table}" for table in tables))

    def insert_events(self, rows: list[dict]) -> int:
        with self._lock:
            self._ensure_months(_month_ranges(rows))
            by_table: dict[str, list[tuple]] = {}
            for row in rows:
                by_table.setdefault(month_table(month_of(row["event_time"])), []).append(tuple(
                    json.dumps(row[c], sort_keys=True) if isinstance(row[c], (list, dict)) else row[c]
                    for c in EVENT_COLUMNS))
            placeholders = ", ".join("?" for _ in EVENT_COLUMNS)
            inserted = 0
            self.connection.execute("BEGIN IMMEDIATE")
            try:
                for table, values in by_table.items():
                    before = self.connection.total_changes
                    self.connection.executemany(f"INSERT INTO {table} ({', '.join(EVENT_COLUMNS)}) "
                                                f"VALUES ({placeholders}) ON CONFLICT DO NOTHING", values)
                    inserted += self.connection.total_changes - before
                self.connection.execute("COMMIT")
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise
            return inserted

    def append_access(self, row: dict) -> None:
        with self._lock:
            self.connection.execute(f"INSERT INTO access_audit ({', '.join(ACCESS_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?)",
                                    tuple(row[c] for c in ACCESS_COLUMNS))

    def read_access(self, since_ms: int | None = None, command: str | None = None) -> list[dict]:
        rows = self.connection.execute(
            f"SELECT {', '.join(ACCESS_COLUMNS)} FROM access_audit WHERE at >= ? AND (? IS NULL OR command = ?) "
            "ORDER BY at, command_id, outcome = 'started' DESC", (since_ms or 0, command, command)).fetchall()
        return [dict(zip(ACCESS_COLUMNS, row)) for row in rows]

    def event_count(self) -> int:
        return self.connection.execute("SELECT count(*) FROM audit_log").fetchone()[0] if self._tables() else 0

    def events_of(self, user_hash: str) -> list[dict]:
        if not self._tables():
            return []
        rows = self.connection.execute(f"SELECT {', '.join(EVENT_COLUMNS)} FROM audit_log WHERE user_hash = ? "
                                       "ORDER BY event_time, event_id", (user_hash,)).fetchall()
        decoded = ("policy_flags", "safety_decisions", "pii_entity_counts")
        return [{c: json.loads(v) if c in decoded else v for c, v in zip(EVENT_COLUMNS, row)} for row in rows]

    def months(self) -> list[date]:
        return [table_month(name) for name in self._tables()]

    def create_months(self, first: date, count: int) -> list[str]:
        months = _consecutive_months(first, count)
        with self._lock:
            self._ensure_months(months)
        return [month_table(m) for m in sorted(months)]

    def drop_months_before(self, oldest_kept: date) -> list[str]:
        with self._lock:
            dropped = [month_table(m) for m in self.months() if m < oldest_kept]
            if dropped:
                self.connection.execute("BEGIN IMMEDIATE")
                for table in dropped:
                    self.connection.execute(f"DROP TABLE {table}")
                self._rebuild_view()
                self.connection.execute("COMMIT")
            return dropped

    def close(self) -> None:
        self.connection.close()


# -- PostgreSQL: a table partitioned by month ----------------------------------------------

_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    org_id text NOT NULL, event_id text NOT NULL, event_time timestamptz NOT NULL, request_id text NOT NULL,
    user_hash text NOT NULL, model text NOT NULL, classification text NOT NULL, policy_flags text[] NOT NULL,
    safety_decisions text[] NOT NULL, pii_entity_counts jsonb NOT NULL, region text NOT NULL,
    source_partition integer, source_offset bigint, logged_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, event_id, event_time)
) PARTITION BY RANGE (event_time);
CREATE INDEX IF NOT EXISTS audit_log_user_hash ON audit_log (user_hash);
CREATE TABLE IF NOT EXISTS access_audit (
    at timestamptz NOT NULL, command_id uuid NOT NULL, actor text NOT NULL, command text NOT NULL,
    scope jsonb NOT NULL, outcome text NOT NULL
);
CREATE OR REPLACE FUNCTION gatewatch_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE OR REPLACE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION gatewatch_append_only();
CREATE OR REPLACE TRIGGER access_audit_append_only BEFORE UPDATE OR DELETE ON access_audit
    FOR EACH ROW EXECUTE FUNCTION gatewatch_append_only();
CREATE OR REPLACE TRIGGER access_audit_no_truncate BEFORE TRUNCATE ON access_audit
    FOR EACH STATEMENT EXECUTE FUNCTION gatewatch_append_only()
"""


def _pg_timestamp(epoch_ms: int) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc)


class PostgresAudit:
    """PostgreSQL through psycopg 3. Batches are COPYed into a temporary table and moved
    with one INSERT ... SELECT ... ON CONFLICT DO NOTHING."""

    def __init__(self, url: str, app_role: str | None = None):
        import psycopg

        self.url = url
        self.app_role = app_role
        self._connection = psycopg.connect(url, connect_timeout=5)
        self._known_months: set[date] = set()
        self._lock = threading.RLock()

    @property
    def connection(self):
        """The session, opened again after the server went away (the sink's retries land here)."""
        import psycopg

        if self._connection.closed or self._connection.broken:
            self._connection = psycopg.connect(self.url, connect_timeout=5)
        return self._connection

    def _run(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock, self.connection.transaction(), self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def migrate(self) -> None:
        with self._lock, self.connection.transaction(), self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext('gatewatch audit migrate'))")
            cursor.execute("SELECT c.relowner = r.oid FROM pg_class c, pg_roles r "
                           "WHERE c.oid = to_regclass('audit_log') AND r.rolname = current_user")
            owner = cursor.fetchone()
            if owner is not None and not owner[0]:
                return  # the application role: its owner has migrated, it may not
            cursor.execute(_PG_SCHEMA)
            if self.app_role:
                for table in ("audit_log", "access_audit"):
                    cursor.execute(f'REVOKE ALL ON {table} FROM "{self.app_role}"')
                    cursor.execute(f'GRANT SELECT, INSERT ON {table} TO "{self.app_role}"')

    def _ensure_months(self, months: set[date]) -> None:
        import psycopg

        for month in sorted(months - self._known_months):
            table = month_table(month)
            (exists,), = self._run("SELECT to_regclass(%s) IS NOT NULL", (table,))
            if not exists:
                try:
                    self._run(f"SELECT pg_advisory_xact_lock(hashtext('gatewatch audit migrate'));"
                              f"CREATE TABLE IF NOT EXISTS {table} PARTITION OF audit_log "
                              f"FOR VALUES FROM ('{month.isoformat()}') TO ('{next_month(month).isoformat()}')")
                except psycopg.errors.InsufficientPrivilege:
                    # The sink retries this until the owner has added the month.
                    raise MissingPartition(f"the audit log has no partition {table} for {month:%Y-%m} and this "
                                           "role may not create it: the table owner must add it "
                                           "(PostgresAudit.create_months)") from None
            self._known_months.add(month)

    def create_months(self, first: date, count: int) -> list[str]:
        """Partitions of count months from first on (the owner runs this ahead of time)."""
        months = _consecutive_months(first, count)
        self._ensure_months(months)
        return [month_table(m) for m in sorted(months)]

    def insert_events(self, rows: list[dict]) -> int:
        self._ensure_months(_month_ranges(rows))
        from psycopg.types.json import Jsonb

        with self._lock, self.connection.transaction(), self.connection.cursor() as cursor:
            cursor.execute("CREATE TEMP TABLE IF NOT EXISTS audit_incoming "
                           "(LIKE audit_log INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
            with cursor.copy(f"COPY audit_incoming ({', '.join(EVENT_COLUMNS)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(tuple(
                        _pg_timestamp(row[c]) if c == "event_time" else Jsonb(row[c]) if c == "pii_entity_counts"
                        else row[c] for c in EVENT_COLUMNS))
            cursor.execute(f"INSERT INTO audit_log ({', '.join(EVENT_COLUMNS)}) SELECT {', '.join(EVENT_COLUMNS)} "
                           "FROM audit_incoming ON CONFLICT DO NOTHING")
            return cursor.rowcount

    def append_access(self, row: dict) -> None:
        self._run(f"INSERT INTO access_audit ({', '.join(ACCESS_COLUMNS)}) VALUES (%s, %s, %s, %s, %s, %s)",
                  (_pg_timestamp(row["at"]), *(row[c] for c in ACCESS_COLUMNS[1:])))

    def read_access(self, since_ms: int | None = None, command: str | None = None) -> list[dict]:
        rows = self._run(
            "SELECT (extract(epoch FROM at) * 1000)::bigint, command_id::text, actor, command, scope::text, outcome "
            "FROM access_audit WHERE at >= %s AND (%s::text IS NULL OR command = %s) "
            "ORDER BY at, command_id, outcome = 'started' DESC", (_pg_timestamp(since_ms or 0), command, command))
        return [dict(zip(ACCESS_COLUMNS, row)) for row in rows]

    def event_count(self) -> int:
        return self._run("SELECT count(*) FROM audit_log")[0][0]

    def events_of(self, user_hash: str) -> list[dict]:
        rows = self._run(f"SELECT {', '.join(EVENT_COLUMNS)} FROM audit_log WHERE user_hash = %s "
                         "ORDER BY event_time, event_id", (user_hash,))
        return [{**dict(zip(EVENT_COLUMNS, row)), "event_time": int(row[2].timestamp() * 1000)} for row in rows]

    def months(self) -> list[date]:
        names = self._run("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                          "WHERE i.inhparent = 'audit_log'::regclass")
        return sorted(m for (name,) in names if (m := table_month(name)))

    def drop_months_before(self, oldest_kept: date) -> list[str]:
        dropped = [month_table(m) for m in self.months() if m < oldest_kept]
        for table in dropped:
            self._run(f"DROP TABLE {table}")
            self._known_months.discard(table_month(table))
        return dropped

    def close(self) -> None:
        self._connection.close()


def load_hash_key(secret_b64: str | None, key_file: str) -> bytes:
    """The key of the audit's user hash: the configured secret (base64), else the key file,
    created with a random key readable by its owner only the first time it is needed."""
    if secret_b64 is not None:
        return base64.b64decode(secret_b64)
    path = os.path.abspath(key_file)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    for _attempt in range(50):
        # Another process may have created the file and not written it yet.
        encoded = open(path).read().strip()
        if encoded:
            return base64.b64decode(encoded)
        time.sleep(0.02)
    raise RuntimeError(f"the audit hash key file {path} is empty")


def open_migrated(url: str, app_role: str | None = None) -> AuditStore:
    """The audit store of url, its tables created (by their owner) if missing."""
    store = open_store(url, app_role)
    store.migrate()
    return store


class AuditWriter:
    """The audit sink's writer: one audit row per unique event; the store ignores rows it
    already holds, so a retried batch or a replay adds nothing."""

    sink = "audit"

    def __init__(self, open_audit_store: Callable[[], AuditStore], hash_key: bytes, retry: Retry, lateness_s: float):
        self.retry = retry
        self.hash_key = hash_key
        self.lateness_s = lateness_s
        self.store = retry(self.sink, open_audit_store)

    def __call__(self, batches: list[tuple[str, list[dict]]]) -> None:
        rows = [audit_row(event, self.hash_key) for _partition, events in batches for event in events]
        self.retry(self.sink, lambda: self.store.insert_events(rows))
        count_written(self.sink, len(rows))
        observe_freshness(self.sink, [row["event_time"] for row in rows], self.lateness_s)
