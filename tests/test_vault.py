"""The prompt/response vault: envelope encryption round trip, crypto-shredding of one user,
KEK rotation without rewriting files, and reads only for the auditor and admin roles, each
in the access audit."""

from __future__ import annotations

import base64
import json
import os
import random

import pytest

from ops.dev.loadgen import make_event
from sinks.vault import KeyStore, VaultFiles, VaultKeyError, open_record, seal_event
from tests.processes import run_cli

HASH_KEY = b"h" * 32


def kek() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def decoded_events(count: int, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        event = make_event(rng, 1_795_000_000_000 + n * 1000, 4, 0.0)[0]
        out.append({**event, "prompt": f"my email is person{n}@example.com", "response": f"noted, person{n}"})
    return out


@pytest.fixture
def keys(tmp_path):
    store = KeyStore(str(tmp_path / "keys.sqlite3"), {"k1": base64.b64decode(kek())}, "k1")
    yield store
    store.close()


def test_sealed_records_open_only_with_their_user_key_and_event(keys, tmp_path):
    events = decoded_events(20)
    records = [seal_event(e, keys, HASH_KEY) for e in events]
    files = VaultFiles(str(tmp_path / "vault"))
    files.write(records)
    raw = b"".join(open(path, "rb").read() for path in files.files())
    assert b"person3@example.com" not in raw and events[0]["user_id"].encode() not in raw
    stored = files.records("request_id", {events[3]["request_id"]})
    assert [open_record(r, keys)["prompt"] for r in stored] == [events[3]["prompt"]]
    swapped = {**records[3], "prompt_sealed": records[3]["response_sealed"]}
    with pytest.raises(VaultKeyError):
        open_record(swapped, keys)


def test_shredding_a_user_key_makes_only_their_records_unreadable(keys, tmp_path):
    events = decoded_events(40)
    files = VaultFiles(str(tmp_path / "vault"))
    files.write([seal_event(e, keys, HASH_KEY) for e in events])
    victim = events[0]
    victim_hash = seal_event(victim, keys, HASH_KEY)["user_hash"]
    mine = [r for r in files.records("org_id", {victim["org_id"]}) if r["user_hash"] == victim_hash]
    others = [r for r in files.records("org_id", {e["org_id"] for e in events}) if r not in mine]
    assert mine and others
    before = {path: open(path, "rb").read() for path in files.files()}
    assert keys.shred([(victim["org_id"], mine[0]["user_hash"])]) == 1
    fresh = KeyStore(keys.connection.execute("PRAGMA database_list").fetchone()[2], keys.keks, keys.active_kek)
    for record in mine:
        with pytest.raises(VaultKeyError):
            open_record(record, fresh)
    assert all(open_record(r, fresh)["prompt"].startswith("my email is") for r in others)
    assert {path: open(path, "rb").read() for path in files.files()} == before  # no file was rewritten
    fresh.close()


def test_kek_rotation_rewraps_data_keys_without_touching_files(tmp_path):
    old, new = base64.b64decode(kek()), base64.b64decode(kek())
    path = str(tmp_path / "keys.sqlite3")
    first = KeyStore(path, {"old": old}, "old")
    files = VaultFiles(str(tmp_path / "vault"))
    events = decoded_events(10)
    files.write([seal_event(e, first, HASH_KEY) for e in events])
    first.close()
    before = {p: open(p, "rb").read() for p in files.files()}
    rotating = KeyStore(path, {"old": old, "new": new}, "new")
    users = len({(e["org_id"], e["user_id"]) for e in events})
    assert rotating.kek_ids() == {"old": users}
    assert rotating.rotate() == users and rotating.kek_ids() == {"new": users}
    rotating.close()
    after = KeyStore(path, {"new": new}, "new")  # the old KEK is retired
    assert [open_record(r, after)["prompt"] for r in files.records("request_id", {events[5]["request_id"]})] == [
        events[5]["prompt"]]
    assert {p: open(p, "rb").read() for p in files.files()} == before
    after.close()


def test_reads_need_a_reader_role_and_every_read_is_audited_first(keys, tmp_path):
    events = decoded_events(5)
    files = VaultFiles(str(tmp_path / "vault"))
    files.write([seal_event(e, keys, HASH_KEY) for e in events])
    env = {"GATEWATCH_VAULT__ROOT": str(tmp_path / "vault"),
           "GATEWATCH_VAULT__KEY_STORE": str(tmp_path / "keys.sqlite3"),
           "GATEWATCH_VAULT__KEKS": json.dumps({"k1": base64.b64encode(keys.keks["k1"]).decode()}),
           "GATEWATCH_VAULT__KEK_ID": "k1", "GATEWATCH_VAULT__ROLES": json.dumps({"carol": "auditor", "bob": "admin"}),
           "GATEWATCH_AUDIT__URL": f"sqlite:///{tmp_path / 'audit.sqlite3'}",
           "GATEWATCH_AUDIT__HASH_KEY": base64.b64encode(HASH_KEY).decode(),
           "GATEWATCH_CLICKHOUSE__URL": f"chdb://{tmp_path / 'chdb'}"}
    wanted = events[2]["request_id"]
    read = run_cli("vault", "read", "--request-id", wanted, "--reason", "legal hold 42",
                   env={**env, "GATEWATCH_ACTOR": "carol"})
    assert read.returncode == 0, read.stderr[-2000:]
    (record,) = [json.loads(line) for line in read.stdout.splitlines()]
    assert record["prompt"] == events[2]["prompt"] and record["response"] == events[2]["response"]
    refused = run_cli("vault", "read", "--request-id", wanted, "--reason", "curious",
                      env={**env, "GATEWATCH_ACTOR": "mallory"})
    assert refused.returncode != 0 and "refused" in refused.stderr and "person2" not in refused.stdout + refused.stderr
    audit = run_cli("audit", "--command", "vault read", env=env)
    rows = [json.loads(line) for line in audit.stdout.splitlines()]
    assert [(r["actor"], r["outcome"]) for r in rows] == [("carol", "started"), ("carol", "succeeded"),
                                                          ("mallory", "started"), ("mallory", "failed: VaultRefused")]
    assert json.loads(rows[0]["scope"]) == {"request_id": wanted, "reason": "legal hold 42", "role": "auditor"}
