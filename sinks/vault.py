"""The prompt/response vault: the original (unredacted) text of each event, sealed with
envelope encryption, for compliance reads under legal hold.

- A data key per (org, user) seals the text (AES-256-GCM; "event_id/field" as associated
  data, so a ciphertext moved to another event or field fails to open).
- Data keys live only wrapped by a key-encryption key (KEK) from settings, in a small key
  store (SQLite), under (org, keyed user hash): neither the key store nor the vault files
  hold a user id.
- Forgetting a user deletes their data keys (crypto-shredding): every copy of their vault
  files, backups included, is unreadable from then on, without rewriting any file.
- Rotating the KEK re-wraps the data keys; vault files are not touched.

Records are sealed before they are batched, so neither the flow's recovery snapshots nor
the files ever hold the plain text.
"""

from __future__ import annotations

import base64
import contextlib
import os
import sqlite3
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas.vocabulary import event_key
from sinks.audit_log import user_hash
from sinks.metrics import count_written
from sinks.retry import Retry

VAULT_FIELDS = ("prompt", "response")
NONCE_BYTES = 12
VAULT_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("request_id", pa.string()), ("org_id", pa.string()), ("user_hash", pa.string()),
    ("event_time", pa.timestamp("ms", tz="UTC")), ("region", pa.string()), ("model", pa.string()),
    ("safety_decisions", pa.list_(pa.string())), ("policy_flags", pa.list_(pa.string())),
    ("prompt_sealed", pa.string()), ("response_sealed", pa.string()),
])


class VaultKeyError(Exception):
    """A record cannot be opened: its data key is gone (shredded) or its KEK is unknown."""


def _seal(key: bytes, plain: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plain, aad)


def _open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)


def field_aad(event_id: str, field: str) -> bytes:
    return f"{event_id}/{field}".encode()


def seal_field(data_key: bytes, text: str | None, event_id: str, field: str) -> str | None:
    if text is None:
        return None
    return base64.b64encode(_seal(data_key, text.encode(), field_aad(event_id, field))).decode()


def open_field(data_key: bytes, sealed: str | None, event_id: str, field: str) -> str | None:
    if sealed is None:
        return None
    try:
        return _open(data_key, base64.b64decode(sealed), field_aad(event_id, field)).decode()
    except InvalidTag:
        raise VaultKeyError(f"the {field} of event {event_id} does not open with its data key") from None


class KeyStore:
    """Wrapped data keys by (org_id, user_hash), in SQLite (WAL: several flow processes
    share it). Deleting a row is the crypto-shredding of that user's vault records."""

    def __init__(self, path: str, keks: dict[str, bytes], active_kek: str):
        if active_kek not in keks:
            raise ValueError(f"the active KEK {active_kek!r} is not among the KEKs ({', '.join(keks) or 'none'})")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.keks, self.active_kek = keks, active_kek
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], bytes] = {}
        self.connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("CREATE TABLE IF NOT EXISTS data_keys (org_id TEXT NOT NULL, user_hash TEXT NOT NULL, "
                                "kek_id TEXT NOT NULL, wrapped BLOB NOT NULL, PRIMARY KEY (org_id, user_hash))")

    @staticmethod
    def _aad(org_id: str, user_hash_: str) -> bytes:
        return f"{org_id}/{user_hash_}".encode()

    def _unwrap(self, org_id: str, user_hash_: str, kek_id: str, wrapped: bytes) -> bytes:
        if kek_id not in self.keks:
            raise VaultKeyError(f"the data key of a user in {org_id} is wrapped by KEK {kek_id!r}, which settings "
                                "do not hold")
        return _open(self.keks[kek_id], wrapped, self._aad(org_id, user_hash_))

    def data_key(self, org_id: str, user_hash_: str, create: bool = False) -> bytes:
        """The user's data key (made and stored on first use if create); VaultKeyError if shredded."""
        cached = self._cache.get((org_id, user_hash_))
        if cached is not None:
            return cached
        with self._lock:
            if create:
                key = AESGCM.generate_key(bit_length=256)
                wrapped = _seal(self.keks[self.active_kek], key, self._aad(org_id, user_hash_))
                # Another process may store the user's key first: theirs wins, everyone reads it back.
                self.connection.execute("INSERT OR IGNORE INTO data_keys VALUES (?, ?, ?, ?)",
                                        (org_id, user_hash_, self.active_kek, wrapped))
            row = self.connection.execute("SELECT kek_id, wrapped FROM data_keys WHERE org_id = ? AND user_hash = ?",
                                          (org_id, user_hash_)).fetchone()
        if row is None:
            raise VaultKeyError("no data key for this user: never stored, or shredded when the user was forgotten")
        key = self._unwrap(org_id, user_hash_, *row)
        if create:
            self._cache[(org_id, user_hash_)] = key
        return key

    def orgs_of(self, user_hash_of) -> list[tuple[str, str]]:
        """(org, user hash) rows whose hash is user_hash_of(org)."""
        rows = self.connection.execute("SELECT org_id, user_hash FROM data_keys").fetchall()
        return [(org, hashed) for org, hashed in rows if hashed == user_hash_of(org)]

    def shred(self, keys: list[tuple[str, str]]) -> int:
        """Delete these data keys for good (VACUUM: no freed page keeps the wrapped bytes)."""
        with self._lock:
            with self.connection:
                self.connection.executemany("DELETE FROM data_keys WHERE org_id = ? AND user_hash = ?", keys)
            self.connection.execute("VACUUM")
            self.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for key in keys:
            self._cache.pop(key, None)
        return len(keys)

    def rotate(self) -> int:
        """Re-wrap every data key not under the active KEK; return how many were re-wrapped."""
        with self._lock, self.connection:
            rows = self.connection.execute("SELECT org_id, user_hash, kek_id, wrapped FROM data_keys "
                                           "WHERE kek_id != ?", (self.active_kek,)).fetchall()
            for org_id, hashed, kek_id, wrapped in rows:
                key = self._unwrap(org_id, hashed, kek_id, wrapped)
                self.connection.execute(
                    "UPDATE data_keys SET kek_id = ?, wrapped = ? WHERE org_id = ? AND user_hash = ?",
                    (self.active_kek, _seal(self.keks[self.active_kek], key, self._aad(org_id, hashed)),
                     org_id, hashed))
        return len(rows)

    def kek_ids(self) -> dict[str, int]:
        return dict(self.connection.execute("SELECT kek_id, count(*) FROM data_keys GROUP BY kek_id").fetchall())

    def close(self) -> None:
        self.connection.close()


def seal_event(event: dict, keys: KeyStore, hash_key: bytes) -> dict:
    """The vault record of one decoded (not yet redacted) event: text sealed, user hashed."""
    hashed = user_hash(hash_key, event["org_id"], event["user_id"])
    data_key = keys.data_key(event["org_id"], hashed, create=True)
    return {"event_id": event["event_id"], "request_id": event["request_id"], "org_id": event["org_id"],
            "user_hash": hashed, "event_time": event["event_time"], "region": event["region"],
            "model": event["model"], "safety_decisions": list(event.get("safety_decisions") or ()),
            "policy_flags": list(event.get("policy_flags") or ()),
            **{f"{field}_sealed": seal_field(data_key, event.get(field), event["event_id"], field)
               for field in VAULT_FIELDS}}


def open_record(record: dict, keys: KeyStore) -> dict:
    """A vault record with its text opened; VaultKeyError if the user's key was shredded."""
    data_key = keys.data_key(record["org_id"], record["user_hash"])
    opened = {k: v for k, v in record.items() if not k.endswith("_sealed")}
    for field in VAULT_FIELDS:
        opened[field] = open_field(data_key, record[f"{field}_sealed"], record["event_id"], field)
    return opened


def partition_of(record: dict) -> str:
    day = datetime.fromtimestamp(record["event_time"] / 1000, tz=timezone.utc).date()
    return f"event_date={day.isoformat()}/region={record['region']}"


class VaultFiles:
    """Sealed records as Parquet under root (a directory or s3://bucket/prefix), one file
    per written batch and partition."""

    def __init__(self, root: str, s3_endpoint_url: str | None = None):
        self.root = root.rstrip("/")
        on_s3 = root.startswith("s3://")
        options = {"client_kwargs": {"endpoint_url": s3_endpoint_url}} if on_s3 and s3_endpoint_url else {}
        self.fs, _ = fsspec.core.url_to_fs(self.root, **options)
        self.base = self.root.split("://", 1)[-1] if on_s3 else os.path.abspath(self.root)

    def write(self, records: list[dict]) -> list[str]:
        by_partition: dict[str, list[dict]] = {}
        for record in records:
            by_partition.setdefault(partition_of(record), []).append(record)
        written = []
        for partition, rows in by_partition.items():
            path = f"{self.base}/{partition}/part-{uuid.uuid4().hex}.parquet"
            self.fs.makedirs(f"{self.base}/{partition}", exist_ok=True)
            with self.fs.open(path, "wb") as handle:
                pq.write_table(pa.Table.from_pylist(rows, VAULT_SCHEMA), handle, compression="zstd")
            written.append(path)
        return written

    def files(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            self.fs.invalidate_cache(self.base)
            return sorted(p for p in self.fs.find(self.base) if p.endswith(".parquet"))
        return []

    def records(self, column: str, values: set[str]) -> list[dict]:
        """Every record whose column is one of values, each event once (a duplicate that
        reached the vault before the flow's dedupe is the same event)."""
        found: dict[str, dict] = {}
        for path in self.files():
            with self.fs.open(path, "rb") as handle:
                table = pq.read_table(handle)
            table = table.filter(pc.is_in(table.column(column), pa.array(sorted(values), pa.string())))
            for row in table.to_pylist():
                row["event_time"] = int(row["event_time"].timestamp() * 1000)
                found.setdefault(event_key(row["org_id"], row["event_id"]), row)
        return list(found.values())


class VaultSealer:
    """Seals each decoded event's original text with its user's data key; the key store
    is opened in the worker that first needs it (``open_keys``)."""

    def __init__(self, open_keys: Callable[[], KeyStore], hash_key: bytes, retry: Retry):
        self.open_keys = open_keys
        self.hash_key = hash_key
        self.retry = retry
        self.keys: KeyStore | None = None

    def __call__(self, event: dict) -> dict:
        if self.keys is None:
            self.keys = self.open_keys()
        return self.retry("vault_keys", lambda: seal_event(event, self.keys, self.hash_key))


class VaultWriter:
    """The vault sink's writer: sealed records, batched by partition, as Parquet files."""

    sink = "vault"

    def __init__(self, files: VaultFiles, retry: Retry):
        self.files = files
        self.retry = retry

    def __call__(self, batches: list[tuple[str, list[dict]]]) -> None:
        records = [record for _partition, batch in batches for record in batch]
        self.retry(self.sink, lambda: self.files.write(records))
        count_written(self.sink, len(records))
