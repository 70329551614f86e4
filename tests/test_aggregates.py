"""Usage aggregates in embedded ClickHouse (chdb): exactly once under duplicates, retried
batches, replays and late events, and the views that read them."""

import contextlib
import random
import time
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Callable

import pytest

from ops.dev.loadgen import make_event
from ops.settings import PricingSettings
from tests.test_chdb_session import running_in_background
from schemas.pricing import with_cost
import sinks.clickhouse
from sinks.clickhouse import (AGGREGATE_KEYS, REFRESH_LOOK_BACK_S, ClickHouse, close_chdb, events_insert_pattern,
                              latest_rows, refresh_aggregates, refresh_label, refresh_running, refresh_watermark,
                              sql_string)

HOUR_MS = 3_600_000
FLAGS = (["jailbreak"], [], ["pii_leak", "jailbreak"], [])


def events(count, seed=5, now_ms=None, hours=48):
    rng = random.Random(seed)
    now_ms = now_ms or int(time.time() * 1000)
    out = []
    for n in range(count):
        event = make_event(rng, now_ms - rng.randrange(0, hours * HOUR_MS), 40, 0.0)[0]
        event.update(classification=rng.choice(["public", "internal"]), policy_flags=FLAGS[n % 4],
                     pii_entity_counts={}, source_partition=0, source_offset=n)
        out.append(with_cost(event, PricingSettings()))
    return out


@pytest.fixture
def clickhouse(tmp_path):
    client = ClickHouse(f"chdb://{tmp_path / 'chdb'}", f"agg_{uuid.uuid4().hex[:8]}")
    assert "050_usage_aggregates" in client.migrate(raw_ttl_days=30, aggregate_ttl_days=365)
    yield client
    close_chdb()


def totals(client, table="usage_daily"):
    return sorted(client.rows(
        f"SELECT org_id, user_id, model, sum(requests), sum(errors), sum(input_tokens), sum(output_tokens), "
        f"sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_usd) FROM {client.database}.{table} "
        f"FINAL GROUP BY org_id, user_id, model"))


def want(rows):
    out = {}
    for e in rows:
        key = (e["org_id"], e["user_id"], e["model"])
        n, err, i, o, cr, cw, usd = out.get(key, (0, 0, 0, 0, 0, 0, Decimal(0)))
        out[key] = (n + 1, err + (e["status_code"] >= 400), i + e["input_tokens"], o + e["output_tokens"],
                    cr + e["cache_read_tokens"], cw + e["cache_write_tokens"], usd + e["cost_usd"])
    return sorted((*key, *values) for key, values in out.items())


def test_duplicates_retries_and_replays_are_aggregated_once(clickhouse):
    rows = events(1500)
    clickhouse.insert_events(rows)
    clickhouse.insert_events(rows[:400])  # a retried batch
    assert refresh_aggregates(clickhouse) > 20
    expected = want(rows)
    assert totals(clickhouse) == expected
    assert totals(clickhouse, "usage_hourly") == expected
    # A replay of everything in other batches, refreshed twice: nothing changes.
    for at in range(0, 1500, 700):
        clickhouse.insert_events(rows[at:at + 700][::-1])
    refresh_aggregates(clickhouse)
    refresh_aggregates(clickhouse)
    assert totals(clickhouse) == expected


def test_a_late_event_lands_in_its_own_hour_and_day(clickhouse):
    now = int(time.time() * 1000)
    rows = events(300, now_ms=now, hours=2)
    clickhouse.insert_events(rows)
    refresh_aggregates(clickhouse)
    late = {**rows[0], "event_id": "late-1", "event_time": now - 26 * HOUR_MS, "input_tokens": 777}
    clickhouse.insert_events([late])
    refresh_aggregates(clickhouse)
    assert totals(clickhouse) == want([*rows, late])
    hour = late["event_time"] // HOUR_MS * HOUR_MS // 1000
    (requests, tokens), = clickhouse.rows(
        f"SELECT sum(requests), sum(input_tokens) FROM {clickhouse.database}.usage_hourly FINAL "
        f"WHERE hour = toDateTime({hour}, 'UTC') AND org_id = '{late['org_id']}'")
    assert (requests, tokens) == (1, 777)


def test_views_read_the_aggregates(clickhouse):
    rows = events(800)
    clickhouse.insert_events(rows)
    refresh_aggregates(clickhouse)
    db = clickhouse.database
    (requests, tokens, p50, p99), = clickhouse.rows(
        f"SELECT sum(requests), sum(total_tokens), min(latency_p50_ms), max(latency_p99_ms) FROM {db}.daily_metrics")
    assert requests == 800
    assert tokens == sum(e[f"{k}_tokens"] for e in rows for k in ("input", "output", "cache_read", "cache_write"))
    assert 0 < p50 <= p99 <= max(e["latency_ms"] for e in rows) * 1.01
    flags = Counter((e["classification"], f) for e in rows for f in e["policy_flags"])
    got = {(level, flag): int(n) for level, flag, n in clickhouse.rows(
        f"SELECT level, flag, sum(requests) FROM {db}.policy_metrics GROUP BY level, flag")}
    assert got == dict(flags)
    (hourly,), = clickhouse.rows(f"SELECT sum(requests) FROM {db}.hourly_metrics")
    (experiments,), = clickhouse.rows(f"SELECT sum(requests) FROM {db}.experiment_metrics")
    assert hourly == 800 and experiments == sum(1 for e in rows if e["experiment_id"])
    assert "FINAL" not in " ".join(sql for (sql,) in clickhouse.rows(
        f"SELECT create_table_query FROM system.tables WHERE database = '{db}' AND name LIKE '%metrics' "
        f"AND name != 'feedback_metrics'")).replace("usage_daily FINAL", "").replace("usage_hourly FINAL", "")


def earlier_migrations(tmp_path: Path, applied_before: Callable[[str], bool]) -> Path:
    """A copy of the migrations whose stem applied_before accepts: the migrations of a deployment
    made before the others, for the tests that it moves over when they come."""
    import sinks.clickhouse as module

    before = tmp_path / "migrations_before"
    before.mkdir()
    for path in sorted(module.MIGRATIONS_DIR.glob("*.sql")):
        if applied_before(path.stem):
            (before / path.name).write_text(path.read_text())
    return before


def test_an_existing_deployment_moves_over_on_migration_and_first_refresh(tmp_path, monkeypatch):
    import sinks.clickhouse as module
    before = earlier_migrations(tmp_path, lambda stem: stem < "050")
    client = ClickHouse(f"chdb://{tmp_path / 'chdb'}", "existing")
    try:
        monkeypatch.setattr(module, "MIGRATIONS_DIR", before)
        assert "050_usage_aggregates" not in client.migrate(raw_ttl_days=30, aggregate_ttl_days=365)
        rows = events(200, hours=24 * 20)
        client.insert_events(rows)
        monkeypatch.undo()
        assert client.migrate(raw_ttl_days=30, aggregate_ttl_days=365) == [
            path.stem for path in sorted(module.MIGRATIONS_DIR.glob("*.sql")) if path.stem >= "050"]
        assert refresh_aggregates(client) > 0
        assert totals(client) == want(rows)
        (create,), = client.rows("SELECT create_table_query FROM system.tables "
                                 "WHERE database = 'existing' AND name = 'events'")
        assert "toIntervalDay(30)" in create or "INTERVAL 30 DAY" in create
    finally:
        close_chdb()


def test_forgetting_a_user_removes_their_aggregates(clickhouse):
    from ops.privacy.gdpr import Subject, forget_clickhouse

    rows = events(300)
    clickhouse.insert_events(rows)
    refresh_aggregates(clickhouse)
    user = rows[0]["user_id"]
    removed = forget_clickhouse(clickhouse, Subject(user_id=user))
    assert removed[f"{clickhouse.database}.usage_daily"] > 0
    for table in ("usage_hourly", "usage_daily", "events"):
        assert clickhouse.rows(f"SELECT count() FROM {clickhouse.database}.{table} WHERE user_id = '{user}'") == [(0,)]
    # A later refresh does not bring them back: their raw rows are gone too.
    refresh_aggregates(clickhouse)
    assert clickhouse.rows(f"SELECT count() FROM {clickhouse.database}.usage_daily WHERE user_id = '{user}'") == [(0,)]


def test_latest_rows_answers_what_final_answers_while_versions_are_unmerged(clickhouse):
    rows = events(1200)
    clickhouse.insert_events(rows)
    refresh_aggregates(clickhouse)
    clickhouse.insert_events(events(300, seed=6))  # more events of the same hours and days
    refresh_aggregates(clickhouse, raw_days=30)
    db = clickhouse.database
    for table, key in AGGREGATE_KEYS.items():
        versions, keys = clickhouse.rows(f"SELECT count(), uniqExact({', '.join(key)}) FROM {db}.{table}")[0]
        assert versions > keys, table  # old versions are still there to be left out
        # usage_daily_by_user (the month bases' copy) holds no cost.
        columns = tuple(c for c in ("requests", "input_tokens", "output_tokens", "cost_usd")
                        if c in clickhouse.columns(table))
        group, sums = "org_id, model", ", ".join(f"sum({c})" for c in columns)
        final = clickhouse.rows(f"SELECT {group}, {sums} FROM {db}.{table} FINAL GROUP BY {group} ORDER BY {group}")
        latest = clickhouse.rows(f"SELECT {group}, {sums} FROM {latest_rows(db, table, columns, '1')} "
                                 f"GROUP BY {group} ORDER BY {group}")
        assert latest == final and len(final) > 3, table


def test_a_periodic_refresh_is_skipped_after_another_writers_recent_one_and_a_forced_one_is_not(clickhouse):
    first, second = events(400, seed=11), events(400, seed=12)
    clickhouse.insert_events(first)
    assert refresh_aggregates(clickhouse) > 0  # another writer of the database refreshed just now
    clickhouse.insert_events(second)
    assert refresh_aggregates(clickhouse, unless_within_s=3600) == 0
    assert totals(clickhouse) == want(first)
    assert refresh_aggregates(clickhouse, unless_within_s=0) > 0
    assert totals(clickhouse) == want(first + second)


@contextlib.contextmanager
def another_refresh_running(client: ClickHouse, database: str, around: str = "{}"):
    """A statement of another writer's refresh of database (on a client labelled as the writers'
    refresh clients are), running for 5 s; around as in running_in_background."""
    other = running_in_background(ClickHouse(client.url, database, label=refresh_label(database)), 5, [], around)
    try:
        yield
    finally:
        other.join()


A_WATERMARK_READ = "SELECT count() FROM system.processes WHERE 0 IN ({})"
ANOTHER_WRITERS_CHECK = "SELECT count() AS refreshes_running FROM system.processes WHERE 0 IN ({})"


def test_a_refresh_is_seen_running_by_its_statements_and_not_by_another_writers_check(clickhouse):
    db = clickhouse.database
    checking = ClickHouse(clickhouse.url, db, label=refresh_label(db))  # its own check does not count
    assert not refresh_running(checking)
    with another_refresh_running(clickhouse, db):
        assert refresh_running(checking)
    with another_refresh_running(clickhouse, db, A_WATERMARK_READ):
        assert refresh_running(checking)
    with another_refresh_running(clickhouse, db, ANOTHER_WRITERS_CHECK):
        assert not refresh_running(checking)  # else two writers checking together both step aside
    with another_refresh_running(clickhouse, f"other_{db}"):
        assert not refresh_running(checking)


class HeldInsert:
    """A chdb session whose inserts wait `seconds` before their data ends: the insert has its
    query time (ingested_at's DEFAULT) and is in the process list, its rows not visible yet."""

    def __init__(self, session, seconds: float):
        self.session, self.seconds = session, seconds

    def __getattr__(self, name):
        return getattr(self.session, name)

    @contextlib.contextmanager
    def send_insert(self, sql: str, fmt: str):
        with self.session.send_insert(sql, fmt) as stream:
            finish = stream.finish
            stream.finish = lambda: (time.sleep(self.seconds), finish())
            yield stream


def test_rows_of_an_insert_running_during_a_refresh_are_aggregated_by_the_next_one(clickhouse, monkeypatch):
    """The flow's own insert (ClickHouse.insert, an ArrowStream stamped by ingested_at's
    DEFAULT), held open 2 s while a refresh runs."""
    monkeypatch.setattr(sinks.clickhouse, "REFRESH_MARGIN_S", 0)
    rows = [dict(event, org_id="slow-org", user_id="slow-user", event_id=f"slow-{n}", input_tokens=7)
            for n, event in enumerate(events(2, seed=22, hours=1))]

    def held_insert():
        session = clickhouse._session
        monkeypatch.setattr(clickhouse, "_session", lambda: HeldInsert(session(), 2))
        clickhouse.insert_events(rows)

    check_a_running_insert_is_aggregated_by_the_next_refresh(clickhouse, held_insert, (2, 14))


def check_a_running_insert_is_aggregated_by_the_next_refresh(client: ClickHouse, slow_insert, want_slow_org) -> None:
    """A refresh's watermark stops at the oldest insert into events still running: its rows,
    stamped at its start and visible only once it ends, are the next refresh's (run it with
    REFRESH_MARGIN_S at 0: no margin catches them). slow_insert stores the org 'slow-org'
    (requests, input tokens: want_slow_org) and takes about 2 s."""
    import threading

    first = events(50, seed=21)
    client.insert_events(first)
    refresh_aggregates(client)
    db = client.database
    slow = threading.Thread(target=slow_insert)
    slow.start()
    deadline = time.monotonic() + 10
    while not client.rows("SELECT count() FROM system.processes WHERE query_kind = 'Insert'")[0][0]:
        assert time.monotonic() < deadline, "the slow insert never showed in system.processes"
        time.sleep(0.05)
    time.sleep(0.5)
    refresh_aggregates(client)  # while the insert runs: its rows are not visible yet
    slow.join()
    assert client.rows(f"SELECT count() FROM {db}.usage_daily FINAL WHERE org_id = 'slow-org'") == [(0,)]
    refresh_aggregates(client)
    assert client.rows(f"SELECT sum(requests), sum(input_tokens) FROM {db}.usage_daily FINAL "
                       f"WHERE org_id = 'slow-org'") == [want_slow_org]
    assert [row for row in totals(client) if row[0] != "slow-org"] == want(first)


def slow_insert_statement(client: ClickHouse):
    """An INSERT ... SELECT of two 'slow-org' events at one second a row, as check_a_running_insert_... wants."""
    return lambda: client.execute(
        f"INSERT INTO {client.database}.events "
        "(event_id, request_id, event_time, user_id, org_id, model, input_tokens) "
        "SELECT concat('slow-', toString(number)), 'r', now64(3), 'slow-user', 'slow-org', 'm', 7 "
        "FROM numbers(2) WHERE sleepEachRow(1) = 0")


def test_the_watermark_waits_for_inserts_into_events_only(clickhouse):
    db = clickhouse.database
    pattern = sql_string(events_insert_pattern(db))
    statements = {
        f"INSERT INTO {db}.events (event_id, org_id) SETTINGS optimize_on_insert = 0 FORMAT ArrowStream": 1,
        f"  insert into {db}.events (event_id) VALUES": 1,
        f"INSERT INTO {db}.events_archive (event_id) VALUES": 0,
        f"INSERT INTO {db}.usage_hourly (org_id) SELECT org_id FROM {db}.events FINAL": 0,
        f"INSERT INTO gw_{db}.events (event_id) VALUES": 0,
        f"SELECT count() FROM {db}.events": 0,
    }
    for statement, matches in statements.items():
        assert clickhouse.rows(f"SELECT match({sql_string(statement)}, {pattern})") == [(matches,)], statement


def test_without_the_process_list_the_watermark_looks_back_a_minute(clickhouse, monkeypatch, caplog):
    rows = clickhouse.rows

    def no_process_list(sql):
        if "system.processes" in sql:
            raise RuntimeError("Code: 497. DB::Exception: Not enough privileges")
        return rows(sql)

    monkeypatch.setattr(clickhouse, "rows", no_process_list)
    now, watermark = refresh_watermark(clickhouse)
    assert now - watermark == REFRESH_LOOK_BACK_S * 1000
    assert "running inserts not readable" in caplog.text
