"""ClickHouse's TTLs follow the retention settings after the migrations that wrote them ran:
a changed setting reaches every table it governs, deletes what it has expired, and an
unchanged one rewrites nothing."""

import json
import random
import time
import uuid

import pytest

from ops.dev.loadgen import make_event
from sinks.clickhouse import ClickHouse, close_chdb, migrate_embedded
from sinks.clickhouse_ttl import AGGREGATE, RAW, TTL_SETTING, ttls_of
from sinks.retry import retry_policy
from tests.processes import run_cli

DAY_MS = 86_400_000


def ttls(client: ClickHouse) -> dict[tuple[str, str | None], int]:
    return {(ttl.table, ttl.column): ttl.days
            for table, query in client.rows(f"SELECT name, create_table_query FROM system.tables "
                                             f"WHERE database = '{client.database}'")
            for ttl in ttls_of(table, query)}


def create_queries(client: ClickHouse) -> dict[str, str]:
    return {table: query.replace(f"{client.database}.", "DB.") for table, query in client.rows(
        f"SELECT name, create_table_query FROM system.tables WHERE database = '{client.database}'")}


def mutations(client: ClickHouse) -> int:
    (count,), = client.rows(f"SELECT count() FROM system.mutations WHERE database = '{client.database}'")
    return count


def wait_for_mutations(client: ClickHouse, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while client.rows(f"SELECT command, latest_fail_reason FROM system.mutations "
                      f"WHERE database = '{client.database}' AND NOT is_done"):
        assert time.monotonic() < deadline, "TTL mutations still running after a minute"
        time.sleep(0.2)


@pytest.fixture
def chdb_url(tmp_path):
    yield f"chdb://{tmp_path / 'chdb'}"
    close_chdb()


def test_every_ttl_of_a_migrated_database_follows_a_declared_setting(chdb_url):
    client = ClickHouse(chdb_url, "declared")
    client.migrate(raw_ttl_days=11, aggregate_ttl_days=222)
    days = {RAW: 11, AGGREGATE: 222}
    assert ttls(client) == {target: days[setting] for target, setting in TTL_SETTING.items()}


def test_changed_settings_leave_the_tables_a_fresh_migration_with_them_makes(chdb_url):
    changed, fresh = ClickHouse(chdb_url, "changed"), ClickHouse(chdb_url, "fresh")
    changed.migrate(raw_ttl_days=30, aggregate_ttl_days=365)
    assert [str(c) for c in changed.apply_retention(7, 90, dry_run=True)][:2] == [
        "TTL of audit_log: 365 -> 90 days", "TTL of events.prompt: 30 -> 7 days"]
    assert set(ttls(changed).values()) == {30, 365}, "a dry run changed a TTL"

    applied = [str(change) for change in changed.apply_retention(7, 90)]
    assert len(applied) == len(TTL_SETTING) and "TTL of events: 30 -> 7 days" in applied
    fresh.migrate(raw_ttl_days=7, aggregate_ttl_days=90)
    assert create_queries(changed) == create_queries(fresh)

    before = mutations(changed)
    assert changed.apply_retention(7, 90) == []
    assert mutations(changed) == before, "an unchanged setting started a rewrite of the tables"


def test_a_shortened_retention_deletes_what_it_expired_and_keeps_the_rest(chdb_url):
    client = ClickHouse(chdb_url, f"short_{uuid.uuid4().hex[:6]}")
    client.migrate(raw_ttl_days=30, aggregate_ttl_days=365)
    db, now_ms, rng = client.database, int(time.time() * 1000), random.Random(3)
    by_age = {}
    for age_days in (3, 10):
        event = make_event(rng, now_ms - age_days * DAY_MS, 5, 0.0)[0]
        event.update(classification="internal", policy_flags=[], pii_entity_counts={},
                     source_partition=0, source_offset=age_days)
        client.insert_events([event])
        by_age[age_days] = event["event_id"]
        client.execute(f"INSERT INTO {db}.feedback (event_id, request_id, event_time, user_id, org_id, region, "
                       f"rating, comment, classification) VALUES ('{event['event_id']}', 'r{age_days}', "
                       f"fromUnixTimestamp64Milli({event['event_time']}), 'u', 'o', 'eu', 'up', "
                       f"'comment {age_days}', 'internal')")
    for age_days in (20, 100):
        client.execute(f"INSERT INTO {db}.usage_daily (day, org_id, user_id, model, region, experiment_id, "
                       f"variant, requests, computed_at) VALUES (today() - {age_days}, 'o', 'u{age_days}', 'm', "
                       f"'eu', '', '', 1, now64(3))")

    client.apply_retention(7, 90)
    wait_for_mutations(client)

    assert client.rows(f"SELECT event_id FROM {db}.events") == [(by_age[3],)]
    assert sorted(client.rows(f"SELECT request_id, comment FROM {db}.feedback")) == [
        ("r10", None), ("r3", "comment 3")]
    assert client.rows(f"SELECT user_id FROM {db}.usage_daily") == [("u20",)]
    assert sorted(client.rows(f"SELECT event_id FROM {db}.audit_log")) == sorted((e,) for e in by_age.values())


def test_a_flow_start_on_chdb_applies_changed_settings(chdb_url):
    client = ClickHouse(chdb_url, "started")
    migrate_embedded(client, retry_policy(0.01, 0.1), raw_days=30, aggregate_days=365)
    migrate_embedded(client, retry_policy(0.01, 0.1), raw_days=10, aggregate_days=365)
    assert {days for target, days in ttls(client).items() if TTL_SETTING[target] == RAW} == {10}


def targets(setting: str) -> set[str]:
    return {table if column is None else f"{table}.{column}"
            for (table, column), of in TTL_SETTING.items() if of == setting}


def test_migrate_and_retention_apply_bring_clickhouse_ttls_to_the_settings(chdb_url, tmp_path):
    ClickHouse(chdb_url, "gatewatch").migrate(raw_ttl_days=30, aggregate_ttl_days=365)
    close_chdb()  # the commands open the same directory from their own processes
    env = {"GATEWATCH_CLICKHOUSE__URL": chdb_url, "GATEWATCH_RETENTION__RAW_DAYS": "14",
           "GATEWATCH_PARQUET__ROOT": str(tmp_path / "raw"), "GATEWATCH_VAULT__ROOT": str(tmp_path / "vault"),
           "GATEWATCH_AUDIT__URL": f"sqlite:///{tmp_path / 'audit.sqlite3'}",
           "GATEWATCH_AUDIT__HASH_KEY_FILE": str(tmp_path / "key")}
    dry = run_cli("retention", "apply", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "would change ClickHouse gatewatch: TTL of events.prompt: 30 -> 14 days" in dry.stdout

    migrated = run_cli("migrate", "--no-kafka", "--no-audit", env=env)
    assert migrated.returncode == 0, migrated.stderr[-2000:]
    assert "TTL of events.prompt: 30 -> 14 days" in migrated.stdout

    applied = run_cli("retention", "apply", env={**env, "GATEWATCH_RETENTION__AGGREGATE_DAYS": "200"})
    assert applied.returncode == 0, applied.stderr[-2000:]
    assert set(json.loads(applied.stdout.splitlines()[-1])["clickhouse_ttls"]) == {
        f"gatewatch: TTL of {target}: 365 -> 200 days" for target in targets(AGGREGATE)}
    days = {RAW: 14, AGGREGATE: 200}
    assert ttls(ClickHouse(chdb_url, "gatewatch")) == {target: days[of] for target, of in TTL_SETTING.items()}
