"""Per-org API keys for the ingestion API, stored as hashes in SQLite (one host) or
PostgreSQL (every replica of ``serve`` behind an autoscaler sharing one table).

A key reads ``gwk_<key_id>_<secret>``: ``key_id`` (public, 12 hex digits) names the row,
the secret (32 random bytes, URL-safe base64) is shown once by ``create`` and only its
SHA-256 is stored (a random 256-bit secret needs no slow password hash). Lookups are
cached for ``cache_ttl_s`` seconds in each process, which bounds how long a revoked key
keeps working on any replica: revocation is one UPDATE in the shared table.

When the database cannot answer (PostgreSQL restarting), a key this process has already
checked keeps its last answer until the database answers again (``KeyStoreUnavailable``
only for keys it has never seen): a short outage of the key store does not stop ingestion,
and a revocation made during it takes effect when it ends.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "gwk_"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
  key_id TEXT PRIMARY KEY,
  secret_sha256 TEXT NOT NULL,
  org_id TEXT NOT NULL,
  region TEXT,
  created_at DOUBLE PRECISION NOT NULL,
  revoked_at DOUBLE PRECISION
)"""
_INSERT = "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, NULL)"
_REVOKE = "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL"
_LIST = "SELECT key_id, org_id, region, created_at, revoked_at FROM api_keys"
_LOOKUP = "SELECT secret_sha256, org_id, region, created_at, revoked_at FROM api_keys WHERE key_id = ?"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    org_id: str
    region: str | None
    created_at: float
    revoked_at: float | None = None


class KeyRevoked(Exception):
    """The key existed but was revoked (HTTP 403)."""


class KeyStoreUnavailable(Exception):
    """The key database cannot answer and this key is not in the cache."""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeyStore:
    """Keys in a SQLite file (the default, for one host); ``PostgresKeyStore`` for replicas."""

    unavailable: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)
    """What the database raises while it cannot answer (as opposed to a bug)."""

    def __init__(self, path: str | Path, cache_ttl_s: float = 2.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open(cache_ttl_s)

    def _open(self, cache_ttl_s: float) -> None:
        self.cache_ttl_s = cache_ttl_s
        self._local = threading.local()
        self._cache: dict[str, tuple[float, ApiKey | None, bool]] = {}
        self._create_schema()

    # -- the database: SQLite here, overridden by PostgresKeyStore -------------------------

    def _create_schema(self) -> None:
        self._execute(_SCHEMA)

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def _execute(self, sql: str, params: tuple = ()):
        """A cursor of ``sql`` (``?`` placeholders) on this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db.execute(sql, params)

    # -- keys -------------------------------------------------------------------------------

    def create(self, org_id: str, region: str | None = None) -> tuple[str, ApiKey]:
        """A new key for ``org_id``: (the full key, shown once; its stored record)."""
        if not org_id.strip():
            raise ValueError("org_id must not be empty")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        record = ApiKey(key_id, org_id, region, time.time())
        self._execute(_INSERT, (key_id, _digest(secret), org_id, region, record.created_at))
        return f"{PREFIX}{key_id}_{secret}", record

    def revoke(self, key_id: str) -> bool:
        """Revoke by key id (or a full key); False when no active key has that id."""
        if key_id.startswith(PREFIX):
            key_id = key_id[len(PREFIX):].split("_", 1)[0]
        return self._execute(_REVOKE, (time.time(), key_id)).rowcount == 1

    def list(self, org_id: str | None = None) -> list[ApiKey]:
        rows = (self._execute(_LIST + " WHERE org_id = ? ORDER BY created_at", (org_id,)) if org_id
                else self._execute(_LIST + " ORDER BY created_at"))
        return [ApiKey(*row) for row in rows.fetchall()]

    def authenticate(self, key: str) -> ApiKey | None:
        """The key's record; None for an unknown or malformed key; KeyRevoked when revoked;
        KeyStoreUnavailable when the database is down and the key was never checked here."""
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is None or cached[0] < now:
            try:
                record, revoked = self._lookup(key)
            except self.unavailable as exc:
                self._local.db = None  # reconnect on the next call
                if cached is None:
                    raise KeyStoreUnavailable(f"the API key store cannot answer: {type(exc).__name__}") from None
                log.warning("API key store unavailable (%s); using this key's last known state", type(exc).__name__)
                return self._answer(cached)
            if len(self._cache) > 10_000:
                self._cache.clear()  # bounded: unknown keys from a scanner cannot grow it
            cached = (now + self.cache_ttl_s, record, revoked)
            self._cache[key] = cached
        return self._answer(cached)

    @staticmethod
    def _answer(cached: tuple[float, ApiKey | None, bool]) -> ApiKey | None:
        _expires, record, revoked = cached
        if revoked:
            raise KeyRevoked(record.key_id)
        return record

    def _lookup(self, key: str) -> tuple[ApiKey | None, bool]:
        if not key.startswith(PREFIX) or key.count("_") < 2:
            return None, False
        key_id, secret = key[len(PREFIX):].split("_", 1)
        row = self._execute(_LOOKUP, (key_id,)).fetchone()
        if row is None or not hmac.compare_digest(row[0], _digest(secret)):
            return None, False
        record = ApiKey(key_id, row[1], row[2], row[3], row[4])
        return record, record.revoked_at is not None


class PostgresKeyStore(ApiKeyStore):
    """Keys in PostgreSQL, shared by every ``serve`` replica: one connection per thread, in
    autocommit (each statement is its own transaction)."""

    def __init__(self, url: str, cache_ttl_s: float = 2.0, connect_timeout_s: float = 5):
        import psycopg

        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.unavailable = (psycopg.OperationalError, psycopg.InterfaceError)
        self._open(cache_ttl_s)

    def _create_schema(self) -> None:
        import psycopg

        # Replicas starting together would race on CREATE TABLE IF NOT EXISTS (a unique
        # violation in pg_type): a transaction-scoped advisory lock lets one create it.
        with psycopg.connect(self.url, connect_timeout=self.connect_timeout_s) as db:
            db.execute("SELECT pg_advisory_xact_lock(hashtext('gatewatch.api_keys'))")
            db.execute(_SCHEMA)

    def _connect(self):
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout_s)

    def _execute(self, sql: str, params: tuple = ()):
        return super()._execute(sql.replace("?", "%s"), params)


def open_key_store(url: str, cache_ttl_s: float = 2.0) -> ApiKeyStore:
    """The key store at ``url``: ``postgresql://…`` for replicas, else a SQLite file
    (``sqlite:///PATH``, as audit.url reads, or a plain path)."""
    if url.startswith(POSTGRES_SCHEMES):
        return PostgresKeyStore(url, cache_ttl_s)
    return ApiKeyStore(url.removeprefix("sqlite:///"), cache_ttl_s)
