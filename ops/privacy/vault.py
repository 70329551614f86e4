"""Wiring of the prompt/response vault (sinks/vault.py) to settings: who may read it, and
what forget and export do with it."""

from __future__ import annotations

from ops.privacy.audit import actor, hash_key
from ops.settings import Settings
from sinks.audit_log import user_hash
from sinks.vault import KeyStore, VaultFiles, open_record

READER_ROLES = ("auditor", "admin")


class VaultRefused(PermissionError):
    """The actor's role may not read the vault."""


def key_store(settings: Settings) -> KeyStore:
    return KeyStore(settings.vault.key_store, settings.vault.kek_bytes(), settings.vault.kek_id)


def vault_files(settings: Settings) -> VaultFiles:
    return VaultFiles(settings.vault.root, settings.parquet.s3_endpoint_url)


def role_of(settings: Settings, who: str | None = None) -> str | None:
    return settings.vault.roles.get(who or actor())


def require_reader(settings: Settings) -> str:
    role = role_of(settings)
    if role not in READER_ROLES:
        raise VaultRefused(f"{actor()} has role {role or 'none'}; reading the vault needs one of "
                           f"{', '.join(READER_ROLES)} (vault.roles)")
    return role


def read_request(settings: Settings, request_id: str) -> list[dict]:
    """The opened records of one request (the caller has checked the role and audited the read)."""
    keys = key_store(settings)
    try:
        return [open_record(record, keys) for record in vault_files(settings).records("request_id", {request_id})]
    finally:
        keys.close()


def user_keys(settings: Settings, keys: KeyStore, user_id: str, org_id: str | None) -> list[tuple[str, str]]:
    """The (org, user hash) data keys of a user: in one org, or in every org holding one."""
    key = hash_key(settings)
    return keys.orgs_of(lambda org: user_hash(key, org, user_id) if org_id in (None, org) else None)


def export_user(settings: Settings, user_id: str, org_id: str | None) -> list[dict]:
    """The user's records, opened (a forgotten user has no keys left, so none)."""
    keys = key_store(settings)
    try:
        held = user_keys(settings, keys, user_id, org_id)
        records = vault_files(settings).records("user_hash", {hashed for _org, hashed in held})
        mine = [r for r in records if (r["org_id"], r["user_hash"]) in set(held)]
        return [open_record(record, keys) for record in mine]
    finally:
        keys.close()


def shred_user(settings: Settings, user_id: str, org_id: str | None) -> int:
    """Destroy the user's data keys; return how many. Their vault files stay, unreadable."""
    keys = key_store(settings)
    try:
        return keys.shred(user_keys(settings, keys, user_id, org_id))
    finally:
        keys.close()


def vault_configured(settings: Settings) -> bool:
    return settings.vault.kek_id is not None


def count_user_keys(settings: Settings, user_id: str, org_id: str | None) -> int:
    keys = key_store(settings)
    try:
        return len(user_keys(settings, keys, user_id, org_id))
    finally:
        keys.close()
