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
from ops import gdpr
from ops.demo import produce, read_dlq
from ops.loadgen import generate
from ops.settings import load_settings
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings
from sinks.clickhouse import ClickHouse, close_chdb
from sinks.quota import QuotaStore
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
                             if f"/{user}:".encode() not in k and not k.endswith(f"/{user}".encode())}
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

    from ops.loadgen import make_event
    from ops.settings import PricingSettings
    from sinks.billing import with_cost

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
