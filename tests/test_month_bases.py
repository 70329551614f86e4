"""The month bases' look-up (sinks.clickhouse.month_usage_before) in chdb, from
usage_daily_by_user (migration 120): the sums usage_daily FINAL gives, for any users, month and
cutoff, while refreshes leave several versions of the same rows; reading the granules of the
users asked, not their orgs' month; filled for an existing deployment; nothing left of a
forgotten user."""

import random
import uuid
from datetime import timedelta

import pytest

from ops.bench.history import planned_reads
from ops.privacy import gdpr
from sinks.clickhouse import ClickHouse, close_chdb, month_usage_before, month_usage_sql, refresh_aggregates, sql_string
from tests.test_aggregates import earlier_migrations
from tests.test_aggregates_model_monthly import across_two_months

KINDS = ("requests", "input", "output", "cache_read", "cache_write")


@pytest.fixture
def clickhouse(tmp_path):
    client = ClickHouse(f"chdb://{tmp_path / 'chdb'}", f"mb_{uuid.uuid4().hex[:8]}")
    assert "120_usage_daily_by_user" in client.migrate()
    yield client
    close_chdb()


def final_sums(client, users: list[tuple[str, str]], month: str, cutoff: str) -> dict:
    """What a month base is: the users' sums over usage_daily FINAL (the look-up before 120)."""
    rows = client.rows(
        f"SELECT org_id, user_id, sum(requests), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), "
        f"sum(cache_write_tokens) FROM {client.database}.usage_daily FINAL "
        f"WHERE day >= toDate('{month[:4]}-{month[4:]}-01') "
        f"AND day < toDate('{cutoff[:4]}-{cutoff[4:6]}-{cutoff[6:]}') "
        f"AND (org_id, user_id) IN ({', '.join(f'({sql_string(o)}, {sql_string(u)})' for o, u in users)}) "
        "GROUP BY org_id, user_id")
    return {(org, user): dict(zip(KINDS, map(int, values))) for org, user, *values in rows}


def stored_users(client) -> list[tuple[str, str]]:
    return sorted(client.rows(f"SELECT DISTINCT org_id, user_id FROM {client.database}.usage_daily"))


def month_cutoffs(client) -> list[tuple[str, str]]:
    """(month, cutoff) of every stored month with cutoffs from its first day through the
    first day of the next month (what the quota asks on the 1st: the whole month before)."""
    (first, last), = client.rows(f"SELECT min(day), max(day) FROM {client.database}.usage_daily")
    asked = []
    for day in (first + timedelta(days=n) for n in range((last - first).days + 2)):
        asked.append((f"{day:%Y%m}", f"{day:%Y%m%d}"))
        if day.day == 1 and day > first:  # the next month's first day also closes the month before
            asked.append((f"{day - timedelta(days=1):%Y%m}", f"{day:%Y%m%d}"))
    return asked


def test_the_bases_are_usage_daily_final_sums_while_refreshes_rewrite_the_same_rows(clickhouse):
    # Unmerged versions stay side by side: the look-up must pick the latest of each row itself.
    clickhouse.execute(f"SYSTEM STOP MERGES {clickhouse.database}.usage_daily_by_user")
    rows = across_two_months(600)
    clickhouse.insert_events(rows)
    refresh_aggregates(clickhouse)
    for seed in (6, 7):  # more events of the same users, hours and days: new versions of their rows
        more = [{**e, "event_id": f"{seed}-{e['event_id']}"} for e in across_two_months(300, seed=seed)]
        clickhouse.insert_events([*more, *rows[:100]])  # with duplicates, which change nothing
        refresh_aggregates(clickhouse)
    (versions, keys), = clickhouse.rows(
        f"SELECT count(), uniqExact(org_id, user_id, day, model, region, experiment_id, variant) "
        f"FROM {clickhouse.database}.usage_daily_by_user")
    assert versions > keys
    users = stored_users(clickhouse)
    asked = month_cutoffs(clickhouse)
    assert len({month for month, _cutoff in asked}) == 2
    rng = random.Random(8)
    for month, cutoff in asked:
        some = [*rng.sample(users, 12), ("no-such-org", users[0][1]), (users[0][0], "no-such-user")]
        assert month_usage_before(clickhouse, some, month, cutoff) == final_sums(clickhouse, some, month, cutoff)
    month, cutoff = asked[-1]
    assert month_usage_before(clickhouse, users, month, cutoff) == final_sums(clickhouse, users, month, cutoff) != {}


def test_a_lookup_reads_the_granules_of_the_users_asked_not_their_orgs_month(clickhouse):
    db = clickhouse.database
    # 40,000 users in 3 orgs, 2 models each, over the month's first 8 days: 640,000 daily rows.
    clickhouse.execute(
        f"INSERT INTO {db}.usage_daily (day, org_id, user_id, model, region, experiment_id, variant, requests, "
        "input_tokens, output_tokens, computed_at) "
        "SELECT toDate('2026-11-01') + intDiv(number, 80000), concat('org-', toString(user % 3)), "
        "concat('user-', toString(user)), if(number % 2 = 0, 'gpt-4o', 'o3'), 'us', '', '', 1, 10, 20, now64(3) "
        "FROM (SELECT number, intDiv(number % 80000, 2) AS user FROM numbers(640000))")
    asked = [(f"org-{n % 3}", f"user-{n}") for n in random.Random(9).sample(range(40000), 25)]
    lookup = month_usage_sql(db, asked, "202611", "20261109")
    (parts, rows, granules), = planned_reads(clickhouse, {"lookup": lookup}).values()
    assert granules <= 2 * len(asked) * parts  # a user's 16 rows lie in one or two granules of each part
    assert rows * 10 < 640_000
    assert month_usage_before(clickhouse, asked, "202611", "20261109") == {
        user: {"requests": 16, "input": 160, "output": 320, "cache_read": 0, "cache_write": 0} for user in asked}


def test_an_existing_deployment_gets_its_bases_copy_on_migration(tmp_path, monkeypatch):
    import sinks.clickhouse as module
    before = earlier_migrations(tmp_path, lambda stem: stem < "120")
    client = ClickHouse(f"chdb://{tmp_path / 'chdb'}", "existing_mb")
    try:
        monkeypatch.setattr(module, "MIGRATIONS_DIR", before)
        client.migrate()
        client.insert_events(across_two_months(400))
        refresh_aggregates(client)
        monkeypatch.undo()
        assert client.migrate() == ["120_usage_daily_by_user"]
        users = stored_users(client)
        for month, cutoff in month_cutoffs(client):
            assert month_usage_before(client, users, month, cutoff) == final_sums(client, users, month, cutoff)
        # Rows written after the migration reach the copy through its materialized view.
        client.insert_events([{**e, "event_id": f"after-{e['event_id']}"} for e in across_two_months(200, seed=12)])
        refresh_aggregates(client)
        month, cutoff = month_cutoffs(client)[-1]
        users = stored_users(client)
        assert month_usage_before(client, users, month, cutoff) == final_sums(client, users, month, cutoff) != {}
    finally:
        close_chdb()


def test_a_forgotten_user_is_gone_from_the_bases_copy(clickhouse):
    clickhouse.insert_events(across_two_months(400, seed=13))
    refresh_aggregates(clickhouse)
    users = stored_users(clickhouse)
    org, user = users[0]
    held = f"SELECT count() FROM {clickhouse.database}.usage_daily_by_user WHERE {gdpr.Subject(user, org).sql()}"
    assert clickhouse.rows(held)[0][0] > 0
    removed = gdpr.forget_clickhouse(clickhouse, gdpr.Subject(user, org))
    assert removed[f"{clickhouse.database}.usage_daily_by_user"] > 0
    assert clickhouse.rows(held) == [(0,)]
    for month, cutoff in month_cutoffs(clickhouse):
        assert (org, user) not in month_usage_before(clickhouse, users, month, cutoff)
        assert month_usage_before(clickhouse, users, month, cutoff) == final_sums(clickhouse, users, month, cutoff)
