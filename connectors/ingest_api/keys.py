"""Per-org API keys for the ingestion API, stored as hashes in a SQLite file.

A key reads ``gwk_<key_id>_<secret>``: ``key_id`` (public, 12 hex digits) names the row,
the secret (32 random bytes, URL-safe base64) is shown once by ``create`` and only its
SHA-256 is stored (a random 256-bit secret needs no slow password hash). Lookups are
cached for ``cache_ttl_s`` seconds, which bounds how long a revoked key keeps working.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "gwk_"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
  key_id TEXT PRIMARY KEY,
  secret_sha256 TEXT NOT NULL,
  org_id TEXT NOT NULL,
  region TEXT,
  created_at REAL NOT NULL,
  revoked_at REAL
)"""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    org_id: str
    region: str | None
    created_at: float
    revoked_at: float | None = None


class KeyRevoked(Exception):
    """The key existed but was revoked (HTTP 403)."""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeyStore:
    def __init__(self, path: str | Path, cache_ttl_s: float = 2.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cache_ttl_s = cache_ttl_s
        self._local = threading.local()
        self._cache: dict[str, tuple[float, ApiKey | None, bool]] = {}
        with self._db() as db:
            db.execute(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=5, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            self._local.db = db
        return db

    def create(self, org_id: str, region: str | None = None) -> tuple[str, ApiKey]:
        """A new key for ``org_id``: (the full key, shown once; its stored record)."""
        if not org_id.strip():
            raise ValueError("org_id must not be empty")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        record = ApiKey(key_id, org_id, region, time.time())
        self._db().execute("INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, NULL)",
                           (key_id, _digest(secret), org_id, region, record.created_at))
        return f"{PREFIX}{key_id}_{secret}", record

    def revoke(self, key_id: str) -> bool:
        """Revoke by key id (or a full key); False when no active key has that id."""
        if key_id.startswith(PREFIX):
            key_id = key_id[len(PREFIX):].split("_", 1)[0]
        cursor = self._db().execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                                    (time.time(), key_id))
        return cursor.rowcount == 1

    def list(self, org_id: str | None = None) -> list[ApiKey]:
        query = "SELECT key_id, org_id, region, created_at, revoked_at FROM api_keys"
        rows = (self._db().execute(query + " WHERE org_id = ? ORDER BY created_at", (org_id,)) if org_id
                else self._db().execute(query + " ORDER BY created_at"))
        return [ApiKey(*row) for row in rows]

    def authenticate(self, key: str) -> ApiKey | None:
        """The key's record; None for an unknown or malformed key; KeyRevoked when revoked."""
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is None or cached[0] < now:
            record, revoked = self._lookup(key)
            if len(self._cache) > 10_000:
                self._cache.clear()  # bounded: unknown keys from a scanner cannot grow it
            cached = (now + self.cache_ttl_s, record, revoked)
            self._cache[key] = cached
        _expires, record, revoked = cached
        if revoked:
            raise KeyRevoked(record.key_id)
        return record

    def _lookup(self, key: str) -> tuple[ApiKey | None, bool]:
        if not key.startswith(PREFIX) or key.count("_") < 2:
            return None, False
        key_id, secret = key[len(PREFIX):].split("_", 1)
        row = self._db().execute("SELECT secret_sha256, org_id, region, created_at, revoked_at FROM api_keys "
                                 "WHERE key_id = ?", (key_id,)).fetchone()
        if row is None or not hmac.compare_digest(row[0], _digest(secret)):
            return None, False
        record = ApiKey(key_id, row[1], row[2], row[3], row[4])
        return record, record.revoked_at is not None
