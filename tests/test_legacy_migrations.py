"""The pre-21 migrations are generated from the modern files (sinks.legacy_sql); the
real 18.16 server in tests/test_clickhouse_server.py applies them. Commit 5ce2742 proved the
generation equal to the former hand-written legacy files, statement by statement."""
import re

import pytest

from sinks.clickhouse import MIGRATIONS_DIR, _statements, migration_statements
from sinks.legacy_sql import LEGACY_SKIPPED, created_object, to_legacy, with_overrides

MODERN = [p for p in sorted(MIGRATIONS_DIR.glob("*.sql")) if p.stem not in LEGACY_SKIPPED]
PRE_21_ONLY = re.compile(r"DateTime64|LowCardinality|\bMap\(|CODEC|\bTTL\b|now64|\bBool\b")


def column_names(statement):
    body = statement.partition("(")[2].rpartition(")\nENGINE")[0]
    return [line.split()[0] for line in body.splitlines() if line.strip()]


@pytest.mark.parametrize("path", MODERN, ids=lambda p: p.stem)
def test_legacy_statements_create_the_same_objects_without_pre_21_features(path):
    modern, legacy = _statements(path.read_text()), migration_statements(path, legacy=True)
    assert [created_object(s) for s in legacy] == [created_object(s) for s in modern]
    for statement in legacy:
        assert not PRE_21_ONLY.search(statement), statement
    for new, old in zip(modern, legacy):
        if new.startswith("CREATE TABLE"):
            assert column_names(old) == [c for c in column_names(new) if c != "pii_entity_counts"]


def test_the_migrations_a_legacy_server_skips_have_a_reason():
    assert set(LEGACY_SKIPPED) == {"050_usage_aggregates", "060_model_daily", "071_usage_reasoning",
                                   "080_events_trace_index", "090_model_monthly",
                                   "100_events_compact_parts", "110_events_vertical_merges",
                                   "120_usage_daily_by_user"}
    assert all((MIGRATIONS_DIR / f"{name}.sql").exists() for name in LEGACY_SKIPPED)
    overrides = {p.name for p in (MIGRATIONS_DIR / "legacy").glob("*.sql")}
    assert overrides == {"040_feedback.sql"}, "a legacy file that is not an override is a copy: generate it"
    feedback = migration_statements(MIGRATIONS_DIR / "040_feedback.sql", legacy=True)
    assert "ANY INNER JOIN" in feedback[-1] and "DateTime('UTC')" in feedback[0]


def test_the_rewrites_of_one_table():
    modern = """CREATE TABLE IF NOT EXISTS {db}.t
(
    at DateTime64(3, 'UTC'),
    org_id LowCardinality(String),
    tags Array(LowCardinality(String)),
    counts Map(LowCardinality(String), UInt32),
    ok Bool,
    n UInt64 CODEC(T64, ZSTD(1)),
    text Nullable(String) TTL toDateTime(at) + INTERVAL {raw_ttl_days} DAY CODEC(ZSTD(3)),
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(ingested_at)
ORDER BY (org_id, toDate(at), n)
TTL toDateTime(at) + INTERVAL {aggregate_ttl_days} DAY;
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.w TO {db}.u AS SELECT org_id, counts, n FROM {db}.t ORDER BY (n, toDate(at));
"""
    assert to_legacy(modern) == """CREATE TABLE IF NOT EXISTS {db}.t
(
    at DateTime('UTC'),
    org_id String,
    tags Array(String),
    ok UInt8,
    n UInt64,
    text Nullable(String),
    ingested_at DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree(ingested_at)
ORDER BY (org_id, n);
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.w TO {db}.u AS SELECT org_id, n FROM {db}.t ORDER BY (n, toDate(at));
"""


def test_an_override_replaces_the_statement_creating_the_same_object():
    generated = ["CREATE TABLE IF NOT EXISTS {db}.a (x UInt8)", "CREATE VIEW IF NOT EXISTS {db}.v AS SELECT 1"]
    override = "CREATE VIEW IF NOT EXISTS {db}.v AS SELECT 2"
    assert with_overrides(generated, [override]) == [generated[0], override]
    with pytest.raises(ValueError, match="v2"):
        with_overrides(generated, ["CREATE VIEW {db}.v2 AS SELECT 2"])
