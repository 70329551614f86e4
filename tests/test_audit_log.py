"""The audit log in PostgreSQL (a real server) and its embedded SQLite twin: one row per
unique event whatever is inserted twice, append-only, monthly partitions dropped by retention."""

from __future__ import annotations

import json
import random
import sqlite3
from datetime import date

import psycopg
import pytest

from ops.dev.loadgen import make_event
from sinks.audit_log import MissingPartition, PostgresAudit, SqliteAudit, audit_row, month_of, open_store, user_hash

KEY = b"k" * 32
NOV_2026_MS = 1_795_000_000_000  # 2026-11-18
DAY_MS = 86_400_000


def events(count: int, seed: int = 1, start_ms: int = NOV_2026_MS, step_ms: int = 60_000) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        event = make_event(rng, start_ms + n * step_ms, 6, 0.0)[0]
        out.append({**event, "classification": "internal", "pii_entity_counts": {"EMAIL_ADDRESS": n % 3},
                    "policy_flags": ["pii_redacted"] if n % 2 else [], "source_partition": n % 2, "source_offset": n})
    return out


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        audit = SqliteAudit(str(tmp_path / "audit.sqlite3"))
    else:
        owner_url, _app_url = request.getfixturevalue("postgres_server").database()
        audit = PostgresAudit(owner_url, app_role="gatewatch_app")
    audit.migrate()
    yield audit
    audit.close()


def test_one_row_per_unique_event_after_duplicates_and_a_replay(store):
    rows = [audit_row(e, KEY) for e in events(300)]
    assert store.insert_events(rows[:200] + rows[150:200]) == 200  # a batch holding duplicates
    assert store.insert_events(rows) == 100  # a replay of everything: only the new 100 go in
    assert store.insert_events(rows[:50]) == 0
    assert store.event_count() == 300
    one = rows[7]
    held = store.events_of(one["user_hash"])
    assert {r["event_id"] for r in held} == {r["event_id"] for r in rows if r["user_hash"] == one["user_hash"]}
    stored = next(r for r in held if r["event_id"] == one["event_id"])
    assert {k: stored[k] for k in one} == one


def test_rows_hold_a_keyed_user_hash_and_no_text(store):
    event = events(1)[0]
    store.insert_events([audit_row(event, KEY)])
    (stored,) = store.events_of(user_hash(KEY, event["org_id"], event["user_id"]))
    assert event["user_id"] not in repr(stored) and "prompt" not in stored
    assert stored["user_hash"] != user_hash(b"x" * 32, event["org_id"], event["user_id"])


def refused(store, sql: str) -> str:
    if isinstance(store, SqliteAudit):
        with pytest.raises(sqlite3.DatabaseError) as caught:
            store.connection.execute(sql)
    else:
        with pytest.raises(psycopg.Error) as caught, store.connection.transaction():
            store.connection.execute(sql)
    return str(caught.value)


def test_update_and_delete_are_refused_even_for_the_owner(store):
    store.insert_events([audit_row(e, KEY) for e in events(10)])
    store.append_access({"at": 1, "command_id": "00000000-0000-0000-0000-000000000001", "actor": "a",
                         "command": "forget", "scope": "{}", "outcome": "started"})
    table = "audit_log_y2026m11"
    assert "append-only" in refused(store, f"UPDATE {table} SET model = 'x'")
    assert "append-only" in refused(store, f"DELETE FROM {table}")
    assert "append-only" in refused(store, "UPDATE access_audit SET actor = 'mallory'")
    assert "append-only" in refused(store, "DELETE FROM access_audit")
    if isinstance(store, PostgresAudit):
        assert "append-only" in refused(store, "UPDATE audit_log SET model = 'x'")
        assert "append-only" in refused(store, "DELETE FROM audit_log")
    assert store.event_count() == 10 and len(store.read_access()) == 1


def test_the_application_role_may_insert_and_read_only(postgres_server):
    owner_url, app_url = postgres_server.database("gatewatch_app")
    owner = PostgresAudit(owner_url, app_role="gatewatch_app")
    owner.migrate()
    owner.create_months(date(2026, 11, 1), 2)
    app = open_store(app_url)
    try:
        assert app.insert_events([audit_row(e, KEY) for e in events(5)]) == 5
        for sql in ("UPDATE audit_log SET model = 'x'", "DELETE FROM audit_log", "TRUNCATE audit_log",
                    "DROP TABLE audit_log_y2026m11", "DELETE FROM audit_log_y2026m11"):
            message = refused(app, sql)
            assert "permission denied" in message or "must be owner" in message, (sql, message)
        # A month without a partition: only the owner may add it, the app gets a clear error.
        later = [audit_row(events(1, start_ms=NOV_2026_MS + 60 * DAY_MS)[0], KEY)]
        assert "the table owner must add it" in str(pytest.raises(MissingPartition, app.insert_events, later).value)
        owner.create_months(date(2027, 1, 1), 1)
        assert app.insert_events(later) == 1
        assert app.event_count() == 6
    finally:
        app.close()
        owner.close()


def test_retention_drops_whole_months(store):
    rows = [audit_row(e, KEY) for e in events(90, step_ms=DAY_MS)]  # Nov 2026 .. Feb 2027
    store.insert_events(rows)
    assert store.months() == [date(2026, 11, 1), date(2026, 12, 1), date(2027, 1, 1), date(2027, 2, 1)]
    dropped = store.drop_months_before(date(2027, 1, 1))
    assert dropped == ["audit_log_y2026m11", "audit_log_y2026m12"]
    kept = [r for r in rows if month_of(r["event_time"]) >= date(2027, 1, 1)]
    assert store.event_count() == len(kept) and 0 < len(kept) < len(rows)
    assert store.insert_events(kept) == 0


def test_the_access_audit_round_trip(store):
    for n, outcome in enumerate(("started", "succeeded")):
        store.append_access({"at": 1_795_000_000_000 + n, "command_id": "6f1c4f0e-1111-4222-8333-444455556666",
                             "actor": "alice", "command": "export", "scope": '{"subject": "ab"}', "outcome": outcome})
    rows = store.read_access(command="export")
    assert [r["outcome"] for r in rows] == ["started", "succeeded"] and rows[0]["actor"] == "alice"
    assert store.read_access(command="forget") == [] and store.read_access(since_ms=1_795_000_000_001)[0]["at"] > 0


def test_retention_apply_drops_audit_months_and_vault_days_past_their_retention(tmp_path):
    from ops.privacy import retention
    from tests.processes import run_cli

    assert retention.audit_oldest_kept(date(2027, 2, 15), 2) == date(2027, 1, 1)
    assert retention.audit_oldest_kept(date(2027, 2, 15), 24) == date(2025, 3, 1)
    store = SqliteAudit(str(tmp_path / "audit.sqlite3"))
    store.migrate()
    store.insert_events([audit_row(e, KEY) for e in events(90, step_ms=DAY_MS)])  # Nov 2026 .. Feb 2027
    env = {"GATEWATCH_AUDIT__URL": f"sqlite:///{tmp_path / 'audit.sqlite3'}", "GATEWATCH_AUDIT__MONTHS": "2",
           "GATEWATCH_AUDIT__HASH_KEY_FILE": str(tmp_path / "key"), "GATEWATCH_PARQUET__ROOT": str(tmp_path / "raw"),
           "GATEWATCH_CLICKHOUSE__URL": f"chdb://{tmp_path / 'chdb'}",
           "GATEWATCH_VAULT__ROOT": str(tmp_path / "vault"), "GATEWATCH_VAULT__DAYS": "30"}
    for day in ("2027-01-10", "2027-02-01"):
        (tmp_path / "vault" / f"event_date={day}" / "region=eu").mkdir(parents=True)
        (tmp_path / "vault" / f"event_date={day}" / "region=eu" / "part-1.parquet").write_bytes(b"sealed")
    dry = run_cli("retention", "apply", "--today", "2027-02-15", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert store.months()[0] == date(2026, 11, 1)
    applied = run_cli("retention", "apply", "--today", "2027-02-15", env=env)
    assert applied.returncode == 0, applied.stderr[-2000:]
    summary = json.loads(applied.stdout.splitlines()[-1])
    assert summary["audit_partitions"] == ["audit_log_y2026m11", "audit_log_y2026m12"]
    assert store.months() == [date(2027, 1, 1), date(2027, 2, 1)]
    assert summary["vault_dates"] == ["2027-01-10"]
    assert [p.name for p in (tmp_path / "vault").iterdir()] == ["event_date=2027-02-01"]
    assert [r["command"] for r in store.read_access()] == ["retention apply"] * 4


def test_migrate_prepares_the_audit_partitions_an_app_role_needs(postgres_server, tmp_path):
    from ops.privacy.audit import prepare_audit
    from ops.settings import load_settings

    owner_url, app_url = postgres_server.database("gatewatch_app")
    settings = load_settings(environ={"GATEWATCH_AUDIT__URL": owner_url, "GATEWATCH_AUDIT__APP_ROLE": "gatewatch_app"},
                             use_service_state=False)
    assert prepare_audit(settings, today=date(2026, 12, 5)) == [
        "audit_log_y2026m11", "audit_log_y2026m12", "audit_log_y2027m01", "audit_log_y2027m02", "audit_log_y2027m03"]
    app = open_store(app_url)
    try:
        app.migrate()  # not the owner: leaves the schema alone instead of failing
        assert app.insert_events([audit_row(e, KEY) for e in events(3)]) == 3
    finally:
        app.close()


def test_data_commands_are_audited_in_postgresql(postgres_server, redis_url, tmp_path):
    from tests.processes import run_cli

    owner_url, _app_url = postgres_server.database()
    env = {"GATEWATCH_AUDIT__URL": owner_url, "GATEWATCH_AUDIT__HASH_KEY_FILE": str(tmp_path / "key"),
           "GATEWATCH_ACTOR": "dana", "GATEWATCH_CLICKHOUSE__URL": f"chdb://{tmp_path / 'chdb'}",
           "GATEWATCH_PARQUET__ROOT": str(tmp_path / "raw"), "GATEWATCH_REDIS__URL": redis_url.rsplit("/", 1)[0] + "/8",
           "GATEWATCH_RECOVERY__DIR": str(tmp_path / "recovery")}
    assert run_cli("export", "--user", "u-9", "--out", str(tmp_path / "out"), env=env).returncode == 0
    assert run_cli("forget", "--user", "u-9", "--yes", env=env).returncode == 1  # not found
    listed = run_cli("audit", env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["actor"], r["command"], r["outcome"]) for r in rows] == [
        ("dana", "export", "started"), ("dana", "export", "succeeded"),
        ("dana", "forget", "started"), ("dana", "forget", "failed: ClickException")]
    store = PostgresAudit(owner_url)
    try:
        assert "permission denied" not in refused(store, "DELETE FROM access_audit")
        (count,), = store._run("SELECT count(*) FROM access_audit")
        assert count == 4
    finally:
        store.close()
