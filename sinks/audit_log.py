"""The audit log: one append-only row per unique event (who, what, when, where, from which
offset), in PostgreSQL or, for the demo, an embedded SQLite file with the same schema.

Users appear only as a keyed hash (HMAC-SHA-256 with a secret the operator holds): without
the key nobody can confirm a candidate user id against the log.
"""

from __future__ import annotations

import hashlib
import hmac


def keyed_hash(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def user_hash(key: bytes, org_id: str | None, user_id: str) -> str:
    """What the audit records instead of a user id ("*" for every org)."""
    return keyed_hash(key, f"{org_id if org_id is not None else '*'}/{user_id}")
