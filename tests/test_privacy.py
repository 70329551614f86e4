"""Data residency (each region's events only in its own bucket and ClickHouse database,
unconfigured regions to the DLQ) and GDPR export/forget of one user, with the access audit."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections import Counter

import pytest
import s3fs
from bytewax.testing import run_main

from dataflows.ingest import build_flow
from ops.dev.demo import produce, read_dlq
from ops.dev.loadgen import generate
from ops.privacy import gdpr
from ops.settings import load_settings
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings
from sinks.clickhouse import ClickHouse, close_chdb
from sinks.quota import QuotaStore, recent_member_subject
from tests.processes import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture(scope="module")
def regional(kafka_bootstrap, flow_topics_env, redis_url, s3_endpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("privacy")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    buckets = {region: f"{region}-{uuid.uuid4().hex[:8]}" for region in ("eu", "us")}
    for bucket in buckets.values():
        fs.mkdir(bucket)
    residency = {region: {"parquet_root": f"s3://{bucket}/raw", "clickhouse_database": f"gw_{region}"}
                 for region, bucket in buckets.items()}
    env = {
        **flow_topics_env(2),
        "GATEWATCH_PARQUET__S3_ENDPOINT_URL": s3_endpoint, "GATEWATCH_PARQUET__MAX_ROWS": "200",
        "GATEWATCH_CLICKHOUSE__URL": f"chdb://{root / 'chdb'}", "GATEWATCH_CLICKHOUSE__DATABASE": "gw_ops",
        "GATEWATCH_REDIS__URL": redis_url.rsplit("/", 1)[0] + "/5",
        "GATEWATCH_RESIDENCY": json.dumps(residency),
        "GATEWATCH_AUDIT__HASH_KEY_FILE": str(root / "audit-hash.key"),
        "GATEWATCH_AUDIT__URL": f"sqlite:///{root / 'audit.sqlite3'}",
        "GATEWATCH_RECOVERY__DIR": str(root / "no-recovery"),
    }
    settings = load_settings(environ=env, use_service_state=False)
    QuotaStore(settings.redis.url).redis.flushdb()
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    expected = produce(kafka_bootstrap, settings.kafka.events_topic,
                       generate(codec, 1500, dup_ratio=0.05, bad_ratio=0.0, users=40, seed=9, keep_events=True), 1500)
    run_main(build_flow(settings))
    close_chdb()
    return env, settings, expected, root


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, env=env)


def stored_rows(settings) -> dict[str, dict]:
    """{"parquet:<region>" / "clickhouse:<region>": {event_id: (user, region)}} for each region's storage."""
    out = {}
    for region, storage in settings.residency.items():
        table = settings.parquet.store(storage.parquet_root).read()
        out[f"parquet:{region}"] = {row["event_id"]: (row["user_id"], row["region"])
                                    for row in table.select(["event_id", "user_id", "region"]).to_pylist()}
        client = ClickHouse(settings.clickhouse.url, storage.clickhouse_database)
        out[f"clickhouse:{region}"] = {e: (u, r) for e, u, r in client.rows(
            f"SELECT event_id, user_id, region FROM {storage.clickhouse_database}.events FINAL")}
    close_chdb()
    return out


def test_each_region_is_stored_only_in_its_own_storage(regional):
    env, settings, expected, root = regional
    by_region = Counter(event["region"] for event in expected.events.values())
    assert by_region["eu"] and by_region["us"] and by_region["apac"]
    stored = stored_rows(settings)
    for region in ("eu", "us"):
        want = {e_id for e_id, event in expected.events.items() if event["region"] == region}
        for sink in ("parquet", "clickhouse"):
            rows = stored[f"{sink}:{region}"]
            assert set(rows) == want, (sink, region)
            assert {r for _u, r in rows.values()} == {region}
    for path in s3fs.S3FileSystem(client_kwargs={"endpoint_url": settings.parquet.s3_endpoint_url}).find(
            settings.residency["us"].parquet_root.removeprefix("s3://")):
        assert "region=us/" in path

    dlq = read_dlq(settings.kafka.bootstrap, settings.kafka.dlq_topic, root / "dlq.jsonl")
    unstored = {r["event_id"] for r in dlq if r["code"] == "no_region_storage"}
    assert unstored == {e_id for e_id, event in expected.events.items() if event["region"] == "apac"}
    assert all(json.loads(r["original"])["region"] == "apac" for r in dlq if r["code"] == "no_region_storage")


def test_export_then_forget_removes_one_user_and_nothing_else(regional, tmp_path):
    env, settings, expected, _root = regional
    per_user = Counter((e["org_id"], e["user_id"], e["region"]) for e in expected.events.values()
                       if e["region"] in ("eu", "us"))
    (org, user, region), count = per_user.most_common(1)[0]
    subject = gdpr.Subject(user, org)

    def others() -> dict:
        rows = stored_rows(settings)
        snapshot = {name: {e: v for e, v in held.items() if v[0] != user} for name, held in rows.items()}
        redis_client = QuotaStore(settings.redis.url).redis
        snapshot["redis"] = {k: redis_client.dump(k) for k in redis_client.scan_iter(count=1000)
                             if f"/{user}:".encode() not in k and not k.endswith(f"/{user}".encode())
                             and not k.startswith(b"gw:recent:")}
        for key in redis_client.scan_iter(match="gw:recent:*", count=1000):  # an org's index names its users
            snapshot["redis"][key] = {member for member in redis_client.zrange(key, 0, -1)
                                      if not subject.is_subject(recent_member_subject(member.decode()))}
        return snapshot

    before = others()
    found = gdpr.find(settings, subject)
    close_chdb()
    assert found.clickhouse[f"gw_{region}.events"] == count and sum(found.parquet.values()) == count
    assert found.clickhouse[f"gw_{region}.audit_log"] == count and found.redis_keys

    exported = cli(env, "export", "--user", user, "--org", org, "--out", str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "export" / f"clickhouse.gw_{region}.events.jsonl").open()]
    parquet_rows = [json.loads(line) for line in (tmp_path / "export" / f"parquet.gw_{region}.jsonl").open()]
    assert len(rows) == len(parquet_rows) == count
    assert {(r["org_id"], r["user_id"]) for r in rows + parquet_rows} == {(org, user)}
    redis_state = json.loads((tmp_path / "export" / "redis.json").read_text())
    assert any(key.startswith(f"gw:usage:user:{org}/{user}:") for key in redis_state)

    dry = cli(env, "forget", "--user", user, "--org", org, "--dry-run")
    assert dry.returncode == 0 and json.loads(dry.stdout.splitlines()[-1])["parquet_rows"] == count
    forgotten = cli(env, "forget", "--user", user, "--org", org, "--yes")
    assert forgotten.returncode == 0, forgotten.stderr[-3000:]

    left = gdpr.find(settings, subject)
    close_chdb()
    assert not any(left.clickhouse.values()) and not left.parquet and not left.redis_keys
    everything = json.dumps({name: list(held.values()) for name, held in stored_rows(settings).items()})
    assert f'"{user}"' not in everything
    assert others() == before

    audit = cli(env, "audit")
    assert audit.returncode == 0, audit.stderr[-2000:]
    records = [json.loads(line) for line in audit.stdout.splitlines()]
    outcomes = Counter((r["command"], r["outcome"]) for r in records)
    assert outcomes[("export", "succeeded")] == 1 and outcomes[("forget", "succeeded")] == 2
    assert user not in audit.stdout and all(r["actor"] for r in records)


def test_a_forgotten_user_leaves_the_legacy_server_too(clickhouse_url):
    """ALTER TABLE ... DELETE and the wait for its mutation on Debian's 18.16 server."""
    import random

    from ops.dev.loadgen import make_event
    from ops.settings import PricingSettings
    from schemas.pricing import with_cost

    client = ClickHouse(clickhouse_url, f"gdpr_{uuid.uuid4().hex[:8]}")
    client.migrate()
    rng = random.Random(3)
    rows = [with_cost({**make_event(rng, 1_795_000_000_000, 6, 0.0)[0], "classification": "internal",
                       "pii_entity_counts": {}, "source_partition": 0, "source_offset": n}, PricingSettings())
            for n in range(300)]
    client.insert_events(rows)
    target = Counter((r["org_id"], r["user_id"]) for r in rows).most_common(1)[0][0]
    removed = gdpr.forget_clickhouse(client, gdpr.Subject(target[1], target[0]))
    assert removed[f"{client.database}.events"] == sum(1 for r in rows if (r["org_id"], r["user_id"]) == target)
    left = Counter(client.rows(f"SELECT org_id, user_id FROM {client.database}.events"))
    assert target not in left and sum(left.values()) == 300 - removed[f"{client.database}.events"]
    assert not client.rows(f"SELECT 1 FROM {client.database}.audit_log WHERE user_id = '{target[1]}' "
                           f"AND org_id = '{target[0]}'")


# -- the privacy check's findings ---------------------------------------------------------

@pytest.fixture
def empty_stores(redis_url, tmp_path) -> dict:
    """Environment of a CLI with empty stores: embedded ClickHouse, a fresh Redis db, a key file."""
    env = {"GATEWATCH_CLICKHOUSE__URL": f"chdb://{tmp_path / 'chdb'}", "GATEWATCH_CLICKHOUSE__DATABASE": "gw_empty",
           "GATEWATCH_PARQUET__ROOT": str(tmp_path / "raw"), "GATEWATCH_REDIS__URL": redis_url.rsplit("/", 1)[0] + "/6",
           "GATEWATCH_AUDIT__HASH_KEY_FILE": str(tmp_path / "audit-hash.key"),
           "GATEWATCH_AUDIT__URL": f"sqlite:///{tmp_path / 'audit.sqlite3'}",
           "GATEWATCH_RECOVERY__DIR": str(tmp_path / "recovery")}
    QuotaStore(env["GATEWATCH_REDIS__URL"]).redis.flushdb()
    return env


def audit_records(env: dict) -> list[dict]:
    audit = cli(env, "audit")
    assert audit.returncode == 0, audit.stderr[-2000:]
    return [json.loads(line) for line in audit.stdout.splitlines()]


def test_the_actor_variable_is_who_the_audit_records_not_a_setting(empty_stores, tmp_path):
    env = {**empty_stores, "GATEWATCH_ACTOR": "alice"}
    settings = load_settings(environ=env, use_service_state=False)
    assert settings.audit.hash_key_file == env["GATEWATCH_AUDIT__HASH_KEY_FILE"]
    exported = cli(env, "export", "--user", "u-1", "--out", str(tmp_path / "out"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert {r["actor"] for r in audit_records(env)} == {"alice"}


def test_forgetting_an_unknown_user_says_not_found_and_fails(empty_stores):
    forgotten = cli(empty_stores, "forget", "--user", "no-such-user", "--yes")
    assert forgotten.returncode != 0
    assert "not found" in forgotten.stderr and '"forgotten": true' not in forgotten.stdout
    assert [(r["command"], r["outcome"]) for r in audit_records(empty_stores)] == [
        ("forget", "started"), ("forget", "failed: ClickException")]


def test_export_to_an_unusable_path_is_a_clear_error(empty_stores, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    exported = cli(empty_stores, "export", "--user", "u-1", "--out", str(blocker / "out"))
    assert exported.returncode != 0
    assert "cannot write the export to" in exported.stderr and "Traceback" not in exported.stderr


def test_the_audit_keeps_keyed_hashes_not_the_user_or_the_export_path(empty_stores, tmp_path):
    import base64
    import hashlib

    out = tmp_path / "exports" / "jane.doe"
    exported = cli(empty_stores, "export", "--user", "jane.doe", "--org", "acme", "--out", str(out))
    assert exported.returncode == 0, exported.stderr[-2000:]
    records = audit_records(empty_stores)
    assert records and all("jane.doe" not in json.dumps(r) and "exports" not in json.dumps(r) for r in records)
    scope = json.loads(records[0]["scope"])
    unsalted = hashlib.sha256(b"acme/jane.doe").hexdigest()
    assert not unsalted.startswith(scope["subject"][:16])
    key_file = tmp_path / "audit-hash.key"
    assert key_file.stat().st_mode & 0o077 == 0
    key = base64.b64decode(key_file.read_text())
    assert scope["subject"] == gdpr.Subject("jane.doe", "acme").pseudonym(key)
    assert scope["subject"] != gdpr.Subject("jane.doe", "acme").pseudonym(b"another key of 32 bytes........")


def test_reads_after_a_replay_count_each_event_once(tmp_path):
    import random

    from ops.dev.loadgen import make_event
    from ops.settings import PricingSettings
    from schemas.pricing import with_cost

    client = ClickHouse(f"chdb://{tmp_path / 'chdb'}", "gw_replayed")
    client.migrate()
    rng = random.Random(5)
    rows = [with_cost({**make_event(rng, 1_795_000_000_000, 4, 0.0)[0], "classification": "internal",
                       "pii_entity_counts": {}, "source_partition": 0, "source_offset": n}, PricingSettings())
            for n in range(120)]
    client.insert_events(rows)
    client.insert_events(rows)  # the replay: the same events again, not merged yet
    target = Counter((r["org_id"], r["user_id"]) for r in rows).most_common(1)[0]
    subject = gdpr.Subject(target[0][1], target[0][0])
    try:
        for table in ("events", "audit_log"):
            assert gdpr.clickhouse_count(client, table, subject) == target[1]
            assert len({r["event_id"] for r in gdpr.clickhouse_rows(client, table, subject)}) == target[1]
            assert len(gdpr.clickhouse_rows(client, table, subject)) == target[1]
        assert gdpr.forget_clickhouse(client, subject)[f"{client.database}.events"] == target[1]
    finally:
        close_chdb()


def test_forget_erases_the_user_from_recovery_snapshots(tmp_path):
    """Window totals and pending sink batches are snapshotted with the user id in them."""
    import sqlite3
    from datetime import timedelta
    from functools import partial

    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.recovery import RecoveryConfig
    from bytewax.testing import TestingSink, TestingSource

    from dataflows.state import UserWindows, WindowLogic
    from ops import recovery
    from sinks.base import Batcher

    events = [{"org_id": "acme", "user_id": user, "event_id": f"{user}-{n}", "event_time": 1_795_000_000_000 + n,
               "model": "gpt-4o", **{f"{kind}_tokens": 1 for kind in ("input", "output", "cache_read", "cache_write")}}
              for n in range(3) for user in ("forget-me-42", "keep-me-7")]
    flow = Dataflow("snapshots")
    stream = op.key_on("by_user", op.input("in", flow, TestingSource(events)), lambda e: "0")
    windows = op.stateful_batch("windows", stream, partial(
        WindowLogic.build, lambda: UserWindows(60_000, 600_000, "dlq"), 3600, 7200))
    op.output("totals", windows, TestingSink([]))
    batches = op.stateful("parquet_batches", stream, lambda resume: Batcher(1000, 3600, resume))
    op.output("batches", batches, TestingSink([]))
    directory = tmp_path / "recovery"
    recovery.init_recovery(directory)
    from bytewax.testing import run_main as run_with_recovery
    run_with_recovery(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(directory)))

    def raw_bytes() -> bytes:
        return b"".join(path.read_bytes() for path in directory.iterdir())

    def snapshot_users() -> set[str]:
        users = set()
        for path in recovery.partition_files(directory):
            for (blob,) in sqlite3.connect(path).execute("SELECT ser_change FROM snaps WHERE ser_change IS NOT NULL"):
                users |= {user for user in ("forget-me-42", "keep-me-7") if user.encode() in blob}
        return users

    assert snapshot_users() == {"forget-me-42", "keep-me-7"}
    subject = gdpr.Subject("forget-me-42", "acme")
    assert recovery.snapshots_holding(directory, subject.holds)
    assert recovery.scrub(directory, subject.holds) >= 1
    assert snapshot_users() == {"keep-me-7"} and b"forget-me-42" not in raw_bytes()
    assert not recovery.snapshots_holding(directory, subject.holds)
    assert recovery.snapshots_holding(directory, gdpr.Subject("keep-me-7").holds)
    # A batch still pending at the snapshot (this flow's batches were flushed at its end).
    pending, removed = recovery.without_user(list(events), subject.holds)
    assert removed and {e["user_id"] for e in pending} == {"keep-me-7"} and len(pending) == 3


def test_forget_leaves_no_late_ids_restate_marks_or_model_rollup_counts(redis_url, tmp_path):
    """The keys and rows derived from a user's usage go with the user: its late-event id sets,
    its month-base restate marks, and its share of the per-model daily rollup (which has no
    user_id column, so it is rolled up again from the remaining users)."""
    import time

    from sinks.clickhouse import refresh_aggregates
    from sinks.quota import RESTATE_KEY, periods
    from tests.test_aggregates import events
    from tests.test_aggregates_model_daily import from_events

    client = ClickHouse(f"chdb://{tmp_path / 'chdb'}", f"gdpr_{uuid.uuid4().hex[:8]}")
    client.migrate()
    rows = events(400, seed=11, hours=30)
    client.insert_events(rows)
    refresh_aggregates(client)
    org, user = Counter((r["org_id"], r["user_id"]) for r in rows).most_common(1)[0][0]
    others = [r for r in rows if (r["org_id"], r["user_id"]) != (org, user)]
    gdpr.forget_clickhouse(client, gdpr.Subject(user, org))
    rollup = Counter({(day, o, model): requests for day, o, model, requests in client.rows(
        f"SELECT day, org_id, model, sum(requests) FROM {client.database}.usage_model_daily FINAL "
        "GROUP BY day, org_id, model")})
    assert +rollup == +from_events(others)
    close_chdb()

    quota = QuotaStore(redis_url.rsplit("/", 1)[0] + "/7", month_bases=True)
    quota.redis.flushdb()
    now_ms = int(time.time() * 1000)
    late = {"org_id": org, "user_id": user, "model": "m", "window_start_ms": now_ms, "window_length_ms": 60_000,
            "n": 1, "input": 5, "output": 0, "cache_read": 0, "cache_write": 0, "event_id": "late-1"}
    other = {**late, "user_id": "someone-else", "event_id": "late-2"}
    window = {key: value for key, value in late.items() if key != "event_id"}
    assert quota.apply([late, other, window, {**window, "user_id": "someone-else"}]) == 4
    month = periods(now_ms)[1]
    quota.mark_due([(f"{org}/{user}", month), (f"{org}/someone-else", month)])  # as an event older than yesterday does
    assert quota.redis.zscore(RESTATE_KEY, f"{org}/{user}|{month}") is not None
    subject = gdpr.Subject(user, org)
    held = gdpr.redis_keys(quota.redis, subject)
    assert gdpr.restate_marks_of(quota.redis, subject) == [f"{org}/{user}|{month}"]
    assert any(key.startswith(f"gw:late:{org}/{user}:") for key in held)
    recent = f"gw:recent:{org}"  # the org's index of recent windows and late events names its users
    assert [len(members) for members in gdpr.recent_windows_of(quota.redis, subject).values()] == [2]
    gdpr.forget_redis(quota.redis, subject, held)
    remaining = [member.decode() for member in quota.redis.zrange(recent, 0, -1)]
    assert len(remaining) == 2 and not any(f"/{user}" in member for member in remaining)
    assert gdpr.recent_windows_of(quota.redis, subject) == {}
    assert gdpr.redis_keys(quota.redis, subject) == []
    assert quota.redis.zscore(RESTATE_KEY, f"{org}/{user}|{month}") is None
    assert quota.redis.zscore(RESTATE_KEY, f"{org}/someone-else|{month}") is not None
    assert quota.redis.keys(f"gw:late:{org}/someone-else:*")
