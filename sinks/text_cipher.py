"""AES-GCM encryption of the raw prompt and response columns of Parquet files.

Each value is sealed on its own, with the event id and column name as associated data,
so a ciphertext copied to another row or column fails to open. The key id is stored in
the file's metadata; keys themselves only ever live in settings.
"""

from __future__ import annotations

import base64
import os

import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TEXT_COLUMNS = ("prompt", "response")
KEY_ID_METADATA = b"gatewatch.text_key_id"
NONCE_BYTES = 12


class TextKeyError(ValueError):
    """A file needs a key that settings do not hold, or a value does not open with it."""


def decode_key(encoded: str) -> bytes:
    try:
        key = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ValueError("an encryption key must be base64") from None
    if len(key) not in (16, 24, 32):
        raise ValueError(f"an AES key is 16, 24 or 32 bytes, this one decodes to {len(key)}")
    return key


def _aad(event_id: str, column: str) -> bytes:
    return f"{event_id}/{column}".encode()


def seal_value(aes: AESGCM, text: str, event_id: str, column: str) -> str:
    nonce = os.urandom(NONCE_BYTES)
    return base64.b64encode(nonce + aes.encrypt(nonce, text.encode(), _aad(event_id, column))).decode()


def open_value(aes: AESGCM, sealed: str, event_id: str, column: str) -> str:
    raw = base64.b64decode(sealed)
    try:
        return aes.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _aad(event_id, column)).decode()
    except InvalidTag:
        raise TextKeyError(f"the {column} of event {event_id} does not open with its file's key") from None


def _map_text(table: pa.Table, transform) -> pa.Table:
    event_ids = table.column("event_id").to_pylist()
    for column in TEXT_COLUMNS:
        values = table.column(column).to_pylist()
        mapped = [None if value is None else transform(value, event_id, column)
                  for value, event_id in zip(values, event_ids)]
        table = table.set_column(table.schema.get_field_index(column), column, pa.array(mapped, pa.string()))
    return table


def seal_table(table: pa.Table, key_id: str, key: bytes) -> pa.Table:
    """The table with prompt and response encrypted and the key id in its metadata."""
    aes = AESGCM(key)
    sealed = _map_text(table, lambda value, event_id, column: seal_value(aes, value, event_id, column))
    return sealed.replace_schema_metadata({**(table.schema.metadata or {}), KEY_ID_METADATA: key_id.encode()})


def open_table(table: pa.Table, keys: dict[str, bytes]) -> pa.Table:
    """The table with its text decrypted; a table written without a key comes back as it is."""
    key_id = (table.schema.metadata or {}).get(KEY_ID_METADATA)
    if key_id is None:
        return table
    key_id = key_id.decode()
    if key_id not in keys:
        raise TextKeyError(f"raw text was encrypted with key id {key_id!r}, which is not among parquet.text_keys")
    aes = AESGCM(keys[key_id])
    opened = _map_text(table, lambda value, event_id, column: open_value(aes, value, event_id, column))
    metadata = {k: v for k, v in table.schema.metadata.items() if k != KEY_ID_METADATA}
    return opened.replace_schema_metadata(metadata or None)
