"""Replay from raw Parquet into an empty ClickHouse and Redis gives the live run's numbers,
and replaying again changes nothing; retention deletes only expired raw partitions."""

from __future__ import annotations

import json
import os
import random
import subprocess
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from functools import partial

import pytest
import s3fs
from bytewax.testing import run_main

from connectors.parquet_source import ALL_REGIONS, FINISHED, ParquetSource, select_files
from dataflows.ingest import build_flow
from dataflows.state import RETIRED_FOR, ReplayWindowFloor, UserWindows, WindowLogic
from dataflows.outputs import aggregate_clients, summed_totals
from ops.dev.demo import billing_totals, produce
from ops.dev.loadgen import Expected, generate, make_event
from ops.privacy import retention
from ops.settings import Settings, load_settings
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings
from sinks.clickhouse import ClickHouse, close_chdb, month_usage_before, org_month_usage_before
from sinks.parquet import ParquetStore
from sinks.quota import QuotaStore, restate_month_bases
from tests.processes import run_cli



def live_run(flow_topics_env, kafka_bootstrap, root, redis_db: int, redis_url: str, now_ms: int | None = None,
             clock=None, validation_env: dict | None = None, shared_env: dict | None = None):
    """A live ingest run with duplicates and late events (dated at now_ms, default the wall
    clock, or clock(i) for message i); validation_env applies to this run only, shared_env to
    the returned env (the replays') too."""
    env = {
        **flow_topics_env(3),
        "GATEWATCH_PARQUET__ROOT": str(root / "raw"), "GATEWATCH_PARQUET__MAX_ROWS": "300",
        "GATEWATCH_CLICKHOUSE__URL": f"chdb://{root / 'chdb'}", "GATEWATCH_CLICKHOUSE__DATABASE": "live",
        "GATEWATCH_REDIS__URL": redis_url.rsplit("/", 1)[0] + f"/{redis_db}",
        **(shared_env or {}),
    }
    settings = load_settings(environ={**env, **(validation_env or {})}, use_service_state=False)
    QuotaStore(settings.redis.url).redis.flushdb()
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    messages = generate(codec, 2500, dup_ratio=0.08, bad_ratio=0.02, users=60, seed=21, late_ratio=0.03,
                        lateness_ms=int(settings.windows.allowed_lateness_s * 1000), keep_events=True, now_ms=now_ms,
                        clock=clock)
    expected = produce(kafka_bootstrap, settings.kafka.events_topic, messages, 2500)
    run_main(build_flow(settings))
    close_chdb()
    return env, settings, expected


@pytest.fixture(scope="module")
def live(kafka_bootstrap, flow_topics_env, redis_url, tmp_path_factory):
    return live_run(flow_topics_env, kafka_bootstrap, tmp_path_factory.mktemp("replay"), 3, redis_url)


def numbers(settings, expected) -> dict:
    clickhouse = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    db = settings.clickhouse.database
    daily = sorted(clickhouse.rows(
        f"SELECT day, org_id, user_id, model, region, requests, errors, total_tokens, toString(cost_usd) "
        f"FROM {db}.daily_metrics"))
    monthly = sorted(clickhouse.rows(
        f"SELECT month, org_id, model, requests, errors, input_tokens, output_tokens, cache_read_tokens, "
        f"cache_write_tokens, toString(cost_usd) FROM {db}.usage_model_monthly FINAL"))
    close_chdb()
    store = QuotaStore(settings.redis.url)
    quota = sorted((key, tuple(sorted(store.redis.hgetall(key).items())))
                   for key in store.redis.scan_iter(match="gw:usage:*", count=1000))
    billed, _want = billing_totals(settings.kafka.bootstrap, settings.kafka.billing_topic, expected, settings)
    return {"daily": daily, "monthly": monthly, "quota": quota, "billed": billed}


def replay(env: dict, *args: str) -> subprocess.CompletedProcess:
    return run_cli("replay", *args, env=env)


def empty_stores(env: dict, database: str, redis_db: int) -> tuple[dict, Settings]:
    """(env, settings) of a replay into a ClickHouse database of its own and a flushed Redis
    database."""
    rebuilt_env = {**env, "GATEWATCH_CLICKHOUSE__DATABASE": database,
                   "GATEWATCH_REDIS__URL": env["GATEWATCH_REDIS__URL"].rsplit("/", 1)[0] + f"/{redis_db}"}
    rebuilt = load_settings(environ=rebuilt_env, use_service_state=False)
    QuotaStore(rebuilt.redis.url).redis.flushdb()
    return rebuilt_env, rebuilt


def replay_through_today(env: dict, first: date) -> subprocess.CompletedProcess:
    result = replay(env, "--from", str(first), "--to", str(datetime.now(timezone.utc).date()))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_replay_into_empty_stores_gives_the_live_numbers_and_a_second_replay_changes_nothing(live):
    env, settings, expected = live
    live_numbers = numbers(settings, expected)
    assert expected.late and len(live_numbers["daily"]) > 20 and len(live_numbers["quota"]) > 20
    assert live_numbers["billed"] > 0

    rebuilt_env, rebuilt = empty_stores(env, "rebuilt", 4)
    today = datetime.now(timezone.utc).date()
    span = ["--from", str(today - timedelta(days=1)), "--to", str(today)]

    dry = replay(rebuilt_env, *span, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    listed = json.loads(dry.stdout.splitlines()[-1])
    assert listed["dry_run"] and listed["rows"] == expected.valid and listed["files"] > 3

    first = replay(rebuilt_env, *span)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout.splitlines()[-1])
    assert summary["rows"] == expected.valid and summary["files"] == listed["files"]
    assert "rows/s" in first.stderr
    assert numbers(rebuilt, expected) == live_numbers

    again = replay(rebuilt_env, *span)
    assert again.returncode == 0, again.stderr[-3000:]
    assert numbers(rebuilt, expected) == live_numbers

    audit = ClickHouse(rebuilt.clickhouse.url, "rebuilt").rows(
        "SELECT command, outcome FROM rebuilt.access_audit ORDER BY at")
    close_chdb()
    assert audit.count(("replay", "started")) == 3 and audit.count(("replay", "succeeded")) == 3


@pytest.mark.parametrize("span_days", [None, 33], ids=["two-months", "33-days"])
def test_a_month_replayed_into_two_empty_store_sets_gives_the_live_aggregates_and_bills(
        span_days, kafka_bootstrap, flow_topics_env, redis_url, tmp_path):
    """Events spread over a month before the last hour (two calendar months, late events
    among them; or 33 days, which on some dates leaves a user only days of the earlier
    month): each replay of the raw Parquet into empty stores rebuilds the live run's daily
    and monthly aggregates, quota counters and bills exactly."""
    day_ms = 86_400_000
    end_ms = int(datetime.now(timezone.utc).timestamp() * 1000) - 3_600_000
    # At least 29 days, and at least 12 hours into the month before end's: two calendar months
    # on any date (29 days back from the 30th of a month stay inside it). That is up to 31.5
    # days, so raw retention (whose hours alone the aggregates recompute) and the live run's
    # limit on past timestamps are widened to hold them.
    end_month_ms = int(datetime.fromtimestamp(end_ms / 1000, timezone.utc).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)
    span_ms = span_days * day_ms if span_days else end_ms - min(end_ms - 29 * day_ms, end_month_ms - day_ms // 2)
    # Events arrive at any time of day, the first minutes after midnight included: a late one
    # dated before a midnight is stored in the earlier day's file, read before the events it
    # came after, and replays to the live bill through its stored decision.

    def arrival(i: int) -> int:
        return end_ms - span_ms + i * span_ms // 2500

    # Produced now, as if each had arrived on its day; the replays keep the default 7-day
    # limit on past timestamps, which must not apply to what raw storage already holds.
    env, settings, expected = live_run(flow_topics_env, kafka_bootstrap, tmp_path, 11, redis_url, clock=arrival,
                                       validation_env={"GATEWATCH_VALIDATION__MAX_PAST_S": str(40 * 86_400)},
                                       shared_env={"GATEWATCH_RETENTION__RAW_DAYS": "40"})
    # Events dated before yesterday are left to the aggregates and their users' month bases
    # restated RESTATE_DELAY_S later by the running flow's quota sink: do that pass now.
    clients = aggregate_clients(settings)
    restate_month_bases(QuotaStore(settings.redis.url), partial(summed_totals, clients, month_usage_before),
                        delay_s=0, org_totals=partial(summed_totals, clients, org_month_usage_before))
    close_chdb()
    live_numbers = numbers(settings, expected)
    days = {row[0] for row in live_numbers["daily"]}
    assert expected.late and len(days) >= 28 and len({row[0] for row in live_numbers["monthly"]}) >= 2
    billed, owed = billing_totals(settings.kafka.bootstrap, settings.kafka.billing_topic, expected, settings)
    assert billed == owed  # every unique event, late ones included, billed once
    # (A late event is dated up to the lateness and 10 minutes before its arrival: maybe the day before the first.)
    first_day = datetime.fromtimestamp((end_ms - span_ms) / 1000, timezone.utc).date() - timedelta(days=1)
    for database, redis_db in (("month_a", 12), ("month_b", 13)):
        rebuilt_env, rebuilt = empty_stores(env, database, redis_db)
        result = replay_through_today(rebuilt_env, first_day)
        assert json.loads(result.stdout.splitlines()[-1])["rows"] == expected.valid
        assert numbers(rebuilt, expected) == live_numbers, database



def test_a_late_event_dated_before_midnight_replays_to_the_live_bills(kafka_bootstrap, flow_topics_env, redis_url,
                                                                      tmp_path):
    day_ms = 86_400_000
    midnight = (int(datetime.now(timezone.utc).timestamp() * 1000) // day_ms - 2) * day_ms
    newest = midnight + int(Settings().windows.allowed_lateness_s * 1000) + 10 * 60_000
    # One user: an event before midnight, its newest after, then one dated before midnight
    # (so more than the lateness before the newest): late in the live run.
    times = [midnight - 30 * 60_000, newest, midnight - 5 * 60_000]
    env = {**flow_topics_env(1), "GATEWATCH_PARQUET__ROOT": str(tmp_path / "raw"),
           "GATEWATCH_CLICKHOUSE__URL": f"chdb://{tmp_path / 'chdb'}", "GATEWATCH_CLICKHOUSE__DATABASE": "live",
           "GATEWATCH_REDIS__URL": redis_url.rsplit("/", 1)[0] + "/9"}
    settings = load_settings(environ=env, use_service_state=False)
    QuotaStore(settings.redis.url).redis.flushdb()
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    rng = random.Random(4)

    def messages():
        for at in times:
            event = {**make_event(rng, at, 1, 0.0)[0], "region": "us"}
            yield f"{event['org_id']}/{event['user_id']}".encode(), codec.encode(event)
        return Expected()

    produce(kafka_bootstrap, settings.kafka.events_topic, messages(), len(times))
    run_main(build_flow(settings))
    close_chdb()
    live_billed = billing_totals(settings.kafka.bootstrap, settings.kafka.billing_topic, Expected(), settings)[0]
    rebuilt_env, _rebuilt = empty_stores(env, "rebuilt", 10)
    replay_through_today(rebuilt_env, datetime.fromtimestamp((midnight - day_ms) / 1000, timezone.utc).date())
    replayed_billed = billing_totals(settings.kafka.bootstrap, settings.kafka.billing_topic, Expected(), settings)[0]
    assert replayed_billed == live_billed


def run_live_flow(kafka_bootstrap: str, settings, produced: list[dict]) -> None:
    """The gateway events, keyed by user, drained through the live ingest flow."""
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)

    def messages():
        for event in produced:
            yield f"{event['org_id']}/{event['user_id']}".encode(), codec.encode(event)
        return Expected()

    produce(kafka_bootstrap, settings.kafka.events_topic, messages(), len(produced))
    run_main(build_flow(settings))
    close_chdb()


def test_a_user_seen_only_in_an_earlier_month_replays_to_the_live_quota_keys(kafka_bootstrap, flow_topics_env,
                                                                             redis_url, tmp_path):
    """One user's only events are 33 days old (always an earlier month), another's are of the
    last minutes. The live quota sink gets both users' totals now; the replay restates the old
    days from the aggregates. The user of the month under way gets its month base both ways;
    the other none either way (the live sink once gave it an empty base of this month, which
    the replay had no reason to write: the counters differed after a 33-day replay)."""
    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    month_start_ms = int(datetime.now(timezone.utc).replace(day=1, hour=0, minute=0, second=0,
                                                             microsecond=0).timestamp() * 1000)
    past_ms, recent_ms = now_ms - 33 * 86_400_000, max(now_ms - 5 * 60_000, month_start_ms)
    produced = [gateway_event("user-old", past_ms, 120, 30), gateway_event("user-old", past_ms + 60_000, 80, 20),
                gateway_event("user-new", recent_ms, 200, 50)]
    env = {**flow_topics_env(1), "GATEWATCH_PARQUET__ROOT": str(tmp_path / "raw"),
           "GATEWATCH_CLICKHOUSE__URL": f"chdb://{tmp_path / 'chdb'}", "GATEWATCH_CLICKHOUSE__DATABASE": "live",
           "GATEWATCH_REDIS__URL": redis_url.rsplit("/", 1)[0] + "/5", "GATEWATCH_RETENTION__RAW_DAYS": "40"}
    settings = load_settings(environ={**env, "GATEWATCH_VALIDATION__MAX_PAST_S": str(40 * 86_400)},
                             use_service_state=False)
    QuotaStore(settings.redis.url).redis.flushdb()
    run_live_flow(kafka_bootstrap, settings, produced)
    live_numbers = numbers(settings, Expected())

    rebuilt_env, rebuilt = empty_stores(env, "rebuilt", 6)
    result = replay_through_today(rebuilt_env, datetime.fromtimestamp(past_ms / 1000, timezone.utc).date())
    assert json.loads(result.stdout.splitlines()[-1])["rows"] == len(produced)
    assert numbers(rebuilt, Expected()) == live_numbers
    month = f"{datetime.now(timezone.utc):%Y%m}"
    bases = [key for key, _values in live_numbers["quota"] if key.startswith(b"gw:usage:user:") and b":m:" in key]
    assert bases == [f"gw:usage:user:org-midnight/user-new:m:{month}".encode()]


def counted_row(user: str, at_ms: int, input_tokens: int, offset: int, region: str = "us") -> dict:
    """A raw row as the live flow stores it: counted in its own one-minute window."""
    return {**gateway_event(user, at_ms, input_tokens, input_tokens // 10), "region": region,
            "classification": "internal",
            "pii_entity_counts": {}, "source_partition": 0, "source_offset": offset,
            "window_outcome": "counted", "window_start_ms": at_ms - at_ms % 60_000}


def replay_windows_into_quota(store: ParquetStore, first: date, last: date, quota: QuotaStore,
                              wall_s_per_file: float, after_flush=lambda logic: None) -> WindowLogic:
    """The replay's source (with its horizons, as dataflows.replay builds it), windows and quota
    sink, with a flush after every file read (the flush interval, 2 s of wall clock, may end
    between any two) and wall_s_per_file of the replay's wall clock passing per file; the
    source's partitions one after the other. after_flush sees the windows after each flush."""
    windows = Settings().windows
    now = [0.0]
    length_ms = int(windows.length_s * 1000)
    logic = WindowLogic(UserWindows(length_ms, int(windows.allowed_lateness_s * 1000), windows.late_policy),
                        windows.flush_interval_s, windows.allowed_lateness_s + windows.length_s + windows.flush_interval_s,
                        clock=lambda: now[0])
    source = ParquetSource([store], first, last, batch_size=1000, floor=ReplayWindowFloor(length_ms))
    for part in source.list_parts():
        reader = source.build_part("parquet_in", part, None)
        while True:
            try:
                outputs = logic.on_batch(reader.next_batch())[0]
            except StopIteration:
                break
            now[0] += wall_s_per_file
            outputs += logic.on_notify()[0]
            after_flush(logic)
            quota.apply([total for kind, totals in outputs if kind == "totals" for total in totals])
    quota.apply([total for _kind, totals in logic.on_eof()[0] for total in totals])
    return logic


@pytest.mark.parametrize("wall_s_per_file", [0, RETIRED_FOR * 662 + 1], ids=["fast", "slower-than-idle"])
def test_a_replay_reading_a_newer_file_before_an_older_one_counts_every_token(wall_s_per_file, redis_url, tmp_path):
    """A user's window split over two files, one read after a file of later events: a newer
    date's file (of another region: the user has API keys of two) written before its older
    date's second file (each date is batched apart), and within a date a newer file listed
    first (S3 keeps modification times to the second; a copied file is newer than its rows).
    A flush in between must not forget the window, nor may a replay slower than the user's
    idle time: its later events would restart the window at a lower count, which the quota
    ignores. The replayed day counters hold every token."""
    day = date(2031, 3, 8)  # counters' expiry times never fall in the real past
    midnight = int(datetime(2031, 3, 9, tzinfo=timezone.utc).timestamp() * 1000)
    minute = 60_000
    first_of_window, second_of_window = counted_row("u1", midnight - 20 * minute + 10_000, 100, 1), \
        counted_row("u1", midnight - 20 * minute + 20_000, 200, 2)
    after_midnight = counted_row("u1", midnight + 30 * minute, 300, 3, region="eu")
    older, newer = (counted_row("u1", midnight + 600 * minute + 10_000, 400, 4),
                    [counted_row("u1", midnight + 600 * minute + 20_000, 500, 5),
                     counted_row("u1", midnight + 660 * minute, 600, 6)])
    raw = ParquetStore(str(tmp_path / "raw"))
    # (date's partition, rows, modification time): in the order they were written but the last two.
    for partition, rows, written in ((day, [first_of_window], 1000), (day + timedelta(days=1), [after_midnight], 1001),
                                     (day, [second_of_window], 1002), (day + timedelta(days=1), [older], 1004),
                                     (day + timedelta(days=1), newer, 1003)):
        os.utime(raw.write(f"event_date={partition}/region={rows[0]['region']}", rows), (written, written))
    quota = QuotaStore(redis_url.rsplit("/", 1)[0] + "/2", month_bases=False,
                       clock=lambda: midnight / 1000 + 12 * 3600)
    quota.redis.flushdb()

    replay_windows_into_quota(raw, day, day + timedelta(days=1), quota, wall_s_per_file)

    for at_ms, rows in ((midnight - 1, [first_of_window, second_of_window]),
                        (midnight, [after_midnight, older, *newer])):
        counted = quota.usage("user", "org-midnight/u1", at_ms)["day"]
        assert (counted["requests"], counted["input"], counted["output"]) == (
            len(rows), sum(r["input_tokens"] for r in rows), sum(r["output_tokens"] for r in rows))


def test_replay_refuses_to_write_parquet_and_names_unknown_sinks(live):
    env, _settings, _expected = live
    result = replay(env, "--from", "2026-01-01", "--to", "2026-01-02", "--to-sinks", "parquet")
    assert result.returncode == 2 and "a replay writes to clickhouse, quota, billing, dlq" in result.stderr


def test_files_are_chosen_by_date_and_region_by_date_then_in_write_order():
    listing = {
        "r/event_date=2026-03-02/region=eu/part-b.parquet": {"mtime": 30.0},
        "r/event_date=2026-03-01/region=eu/part-a.parquet": {"mtime": 40.0},
        "r/event_date=2026-03-01/region=us/part-c.parquet": {"mtime": 10.0},
        "r/event_date=2026-02-28/region=eu/part-d.parquet": {"mtime": 5.0},
        "r/event_date=2026-03-01/region=eu/part-a.parquet.tmp": {"mtime": 1.0},
    }
    chosen = select_files(listing, date(2026, 3, 1), date(2026, 3, 2))
    # Every file of a date before any of a later one (part-b was written before part-a).
    assert [f.path.rsplit("/", 1)[-1] for f in chosen] == ["part-c.parquet", "part-a.parquet", "part-b.parquet"]
    assert [f.region for f in select_files(listing, date(2026, 3, 1), date(2026, 3, 2), "eu")] == ["eu", "eu"]


def test_expired_dates_keep_exactly_the_retention_period():
    today = date(2026, 11, 23)
    dates = [today - timedelta(days=n) for n in range(40)]
    expired = retention.expired_dates(dates, today, 30)
    assert expired == sorted(dates[30:]) and today - timedelta(days=29) not in expired


@pytest.mark.parametrize("where", ["local", "s3"])
def test_retention_apply_deletes_only_expired_partitions(where, tmp_path, s3_endpoint):
    if where == "local":
        root, endpoint = str(tmp_path / "raw"), None
    else:
        bucket = f"ret-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir(bucket)
        root, endpoint = f"s3://{bucket}/raw", s3_endpoint
    store = ParquetStore(root, endpoint)
    today = date(2026, 11, 23)
    rng = random.Random(1)
    for age in (0, 29, 30, 45):
        day = today - timedelta(days=age)
        at_ms = int(datetime(day.year, day.month, day.day, 12, tzinfo=timezone.utc).timestamp() * 1000)
        event = {**make_event(rng, at_ms, 5, 0.0)[0], "classification": "internal", "pii_entity_counts": {},
                 "source_partition": 0, "source_offset": age}
        store.write(f"event_date={day}/region=eu", [event])
    dry = retention.apply(store, today, 30, dry_run=True)
    assert [d for d, _p, _f in dry] == [today - timedelta(days=45), today - timedelta(days=30)]
    assert len(store.files()) == 4
    deleted = retention.apply(store, today, 30)
    assert [(d, files) for d, _p, files in deleted] == [(today - timedelta(days=45), 1), (today - timedelta(days=30), 1)]
    kept = sorted(p.split("event_date=")[1][:10] for p in store.files())
    assert kept == [str(today - timedelta(days=29)), str(today)]


def test_a_replay_source_resumes_at_the_row_it_snapshotted(live):
    _env, settings, expected = live
    store = settings.parquet.store()
    today = datetime.now(timezone.utc).date()
    source = ParquetSource([store], today - timedelta(days=1), today, batch_size=100)
    assert source.list_parts() == [ALL_REGIONS]
    first = source.build_part("in", ALL_REGIONS, None)
    seen = [e["event_id"] for _ in range(3) for e in first.next_batch()]
    state = first.snapshot()
    assert state != FINISHED and state[1] > 0

    resumed = source.build_part("in", ALL_REGIONS, state)
    while True:
        try:
            seen += [e["event_id"] for e in resumed.next_batch()]
        except StopIteration:
            break
    assert len({e["region"] for e in expected.events.values()}) > 1  # every region's files in the one partition
    assert len(seen) == len(set(seen)) == len(expected.events) and set(seen) == set(expected.events)
    assert resumed.snapshot() == FINISHED
    with pytest.raises(StopIteration):
        source.build_part("in", ALL_REGIONS, FINISHED).next_batch()
    with pytest.raises(ValueError, match="one source partition"):  # a region's part, from an older recovery store
        source.build_part("in", "eu", state)


def test_a_finished_replay_run_again_with_its_recovery_dir_reads_nothing(live, tmp_path):
    env, _settings, expected = live
    today = datetime.now(timezone.utc).date()
    span = ["--from", str(today - timedelta(days=1)), "--to", str(today), "--recovery-dir", str(tmp_path / "rec")]
    resumed_env = {**env, "GATEWATCH_CLICKHOUSE__DATABASE": "resumed", "GATEWATCH_RECOVERY__SNAPSHOT_INTERVAL_S": "0.5"}
    first = replay(resumed_env, *span)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout.splitlines()[-1])["rows"] == expected.valid
    again = replay(resumed_env, *span)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.splitlines()[-1])["rows"] == 0


def expire_window_records_then_replay_twice(env, settings, expected, day) -> None:
    """Drop the quota's window records (as Redis does after their life), replay the day twice:
    each replay restates counters and leaves the quota totals as they were."""
    before = numbers(settings, expected)["quota"]
    assert before
    redis_client = QuotaStore(settings.redis.url).redis
    expired = list(redis_client.scan_iter(match="gw:win:*", count=1000))
    assert expired
    redis_client.delete(*expired)
    for _ in range(2):
        result = replay(env, "--from", str(day), "--to", str(day))
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout.splitlines()[-1])["quota_restated"] > 0
        assert numbers(settings, expected)["quota"] == before


def test_a_replay_after_the_window_records_expired_counts_nothing_twice(kafka_bootstrap, flow_topics_env, redis_url,
                                                                       tmp_path):
    """Yesterday's window records are gone (they live twice the flow's horizon): a replay of
    yesterday restates its day and month counters from the aggregates instead of counting
    its windows again."""
    yesterday = datetime.now(timezone.utc).date() - timedelta(days=1)
    noon_ms = int(datetime(yesterday.year, yesterday.month, yesterday.day, 12, tzinfo=timezone.utc).timestamp() * 1000)
    env, settings, expected = live_run(flow_topics_env, kafka_bootstrap, tmp_path, 8, redis_url, now_ms=noon_ms)
    expire_window_records_then_replay_twice(env, settings, expected, yesterday)


def test_a_replay_of_today_after_its_window_records_expired_counts_nothing_twice(kafka_bootstrap, flow_topics_env,
                                                                                redis_url, tmp_path):
    """Today's windows older than their records' life (~22 minutes) are restated from the raw
    events, like closed days are from the aggregates, instead of counted again; the windows
    the flow may still re-emit go through the quota sink, whose records of them still live."""
    now = datetime.now(timezone.utc)
    if now - now.replace(hour=0, minute=0, second=0, microsecond=0) < timedelta(hours=2):
        pytest.skip("within 2 hours after midnight UTC an hour-old day would not be today")
    hour_ago_ms = int((now - timedelta(hours=1)).timestamp() * 1000)
    env, settings, expected = live_run(flow_topics_env, kafka_bootstrap, tmp_path, 9, redis_url, now_ms=hour_ago_ms)
    expire_window_records_then_replay_twice(env, settings, expected, now.date())


GPT_4O_PER_MILLION = (Decimal("2.50"), Decimal("10.00"))
"""gpt-4o's input and output prices in the default price table (checked below)."""


def gateway_event(user: str, at_ms: int, input_tokens: int, output_tokens: int) -> dict:
    """A valid gateway event of gpt-4o written out field by field, without cached tokens."""
    return {"event_id": str(uuid.uuid4()), "request_id": f"req-{uuid.uuid4().hex[:16]}", "schema_version": 1,
            "event_time": at_ms, "user_id": user, "org_id": "org-midnight", "region": "us", "provider": "openai",
            "endpoint": "chat.completions", "model": "gpt-4o", "model_version": None, "status_code": 200,
            "error_code": None, "streaming": False, "latency_ms": 900, "time_to_first_token_ms": 120,
            "input_tokens": input_tokens, "output_tokens": output_tokens, "cache_read_tokens": 0,
            "cache_write_tokens": 0, "prompt": "summarise the quarterly report", "response": "revenue grew",
            "conversation_id": None, "experiment_id": None, "variant": None, "safety_decisions": [],
            "policy_flags": []}


def test_late_events_across_midnight_of_several_users_and_partitions_replay_to_the_live_bills(
        kafka_bootstrap, flow_topics_env, redis_url, tmp_path):
    """Four users on a three-partition topic, their messages interleaved. Each has an event
    before a UTC midnight and one after it; then arrive, dated before midnight, a late one
    (more than the lateness before the user's newest: a late adjustment) for three of them
    and, for the fourth, one within the lateness (counted in its window). Every window holds
    one event, so the bill is the sum of the events' own costs, computed here from the price
    table; the live run and a replay into the same billing topic bill exactly that."""
    day_ms, minute = 86_400_000, 60_000
    lateness_ms = int(Settings().windows.allowed_lateness_s * 1000)
    midnight = (int(datetime.now(timezone.utc).timestamp() * 1000) // day_ms - 2) * day_ms
    users = [f"user-midnight-{n}" for n in range(4)]
    arrivals = [[gateway_event(user, midnight - (30 + n) * minute, 100 + n, 40),
                 gateway_event(user, midnight + lateness_ms + (10 + n) * minute, 200 + n, 50)] for n, user in
                enumerate(users[:3])]
    arrivals.append([gateway_event(users[3], midnight - 30 * minute, 110, 41),
                     gateway_event(users[3], midnight + 2 * minute, 210, 51)])
    late = [gateway_event(user, midnight - (5 + n) * minute, 300 + n, 60) for n, user in enumerate(users[:3])]
    within = gateway_event(users[3], midnight - 3 * minute, 310, 61)
    produced = [*(pair[0] for pair in arrivals), *(pair[1] for pair in arrivals), *late, within]

    env = {**flow_topics_env(3), "GATEWATCH_PARQUET__ROOT": str(tmp_path / "raw"),
           "GATEWATCH_CLICKHOUSE__URL": f"chdb://{tmp_path / 'chdb'}", "GATEWATCH_CLICKHOUSE__DATABASE": "live",
           "GATEWATCH_REDIS__URL": redis_url.rsplit("/", 1)[0] + "/14"}
    settings = load_settings(environ=env, use_service_state=False)
    price = settings.pricing.models["gpt-4o"]
    assert (price.input, price.output) == GPT_4O_PER_MILLION
    QuotaStore(settings.redis.url).redis.flushdb()
    run_live_flow(kafka_bootstrap, settings, produced)

    stored = {row["event_id"]: row for row in ParquetStore(str(tmp_path / "raw")).read().to_pylist()}
    assert len({row["source_partition"] for row in stored.values()}) > 1
    late_ids = {event["event_id"] for event in late}
    assert {(event_id, row["window_outcome"], row["window_start_ms"]) for event_id, row in stored.items()} == {
        (e["event_id"], *(("adjusted", None) if e["event_id"] in late_ids else
                          ("counted", e["event_time"] - e["event_time"] % minute))) for e in produced}
    owed = sum((e["input_tokens"] * GPT_4O_PER_MILLION[0] + e["output_tokens"] * GPT_4O_PER_MILLION[1])
               / 1_000_000 for e in produced)
    live_billed = billing_totals(settings.kafka.bootstrap, settings.kafka.billing_topic, Expected(), settings)[0]
    assert live_billed == owed

    rebuilt_env, _rebuilt = empty_stores(env, "rebuilt", 15)
    result = replay_through_today(rebuilt_env, datetime.fromtimestamp((midnight - day_ms) / 1000, timezone.utc).date())
    assert json.loads(result.stdout.splitlines()[-1])["rows"] == len(produced)
    assert billing_totals(settings.kafka.bootstrap, settings.kafka.billing_topic, Expected(), settings)[0] == owed
