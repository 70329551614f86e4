"""The ingest flow with the vault on: the original text is only in the vault (sealed), no
original PII string reaches Parquet, ClickHouse, the audit log, the DLQ or the logs; an
auditor reads it back; forget makes that user's vault records unreadable, others stay."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from collections import Counter

import pytest
from bytewax.testing import run_main

from ops.launch import build
from ops.dev.demo import produce, read_dlq
from ops.dev.loadgen import generate
from ops.settings import load_settings
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings
from sinks.clickhouse import ClickHouse, close_chdb
from sinks.quota import QuotaStore
from tests.processes import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_original_text_lives_only_in_the_vault_and_forget_shreds_it(kafka_bootstrap, flow_topics_env, redis_url,
                                                                     tmp_path, capfd):
    env = {**flow_topics_env(2), "GATEWATCH_SINKS": "parquet,clickhouse,audit,dlq",
           "GATEWATCH_PARQUET__ROOT": str(tmp_path / "raw"), "GATEWATCH_CLICKHOUSE__URL": f"chdb://{tmp_path / 'chdb'}",
           "GATEWATCH_REDIS__URL": redis_url.rsplit("/", 1)[0] + "/7",
           "GATEWATCH_AUDIT__URL": f"sqlite:///{tmp_path / 'audit.sqlite3'}",
           "GATEWATCH_AUDIT__HASH_KEY_FILE": str(tmp_path / "audit-hash.key"),
           "GATEWATCH_RECOVERY__DIR": str(tmp_path / "recovery"),
           "GATEWATCH_VAULT__ENABLED": "true", "GATEWATCH_VAULT__ROOT": str(tmp_path / "vault"),
           "GATEWATCH_VAULT__KEY_STORE": str(tmp_path / "vault-keys.sqlite3"),
           "GATEWATCH_VAULT__KEKS": json.dumps({"k1": base64.b64encode(os.urandom(32)).decode()}),
           "GATEWATCH_VAULT__KEK_ID": "k1", "GATEWATCH_VAULT__ROLES": json.dumps({"carol": "auditor"})}
    QuotaStore(env["GATEWATCH_REDIS__URL"]).redis.flushdb()
    settings = load_settings(environ=env, use_service_state=False)
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    expected = produce(kafka_bootstrap, settings.kafka.events_topic,
                       generate(codec, 400, dup_ratio=0.05, bad_ratio=0.05, users=12, pii_ratio=0.6, seed=21,
                                keep_events=True), 400)
    run_main(build("ingest", settings))  # with the JSON logs a flow process writes: they are checked for leaks
    flow_output = capfd.readouterr()
    originals = {value for value in expected.pii_values if len(value) >= 6}
    assert len(originals) > 20

    parquet = settings.parquet.store().read()
    client = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    columns = client.columns("events")
    clickhouse_rows = client.rows(f"SELECT {', '.join(columns)} FROM {client.database}.events FINAL")
    close_chdb()
    assert parquet.num_rows == len(clickhouse_rows) == len(expected.events)
    dlq = read_dlq(settings.kafka.bootstrap, settings.kafka.dlq_topic, tmp_path / "dlq.jsonl")
    audit_db = sqlite3.connect(tmp_path / "audit.sqlite3")
    audit_rows = audit_db.execute("SELECT * FROM audit_log").fetchall()
    assert len(audit_rows) == len(expected.events)
    elsewhere = {
        "parquet": json.dumps(parquet.to_pylist(), default=str),
        "clickhouse": json.dumps(clickhouse_rows, default=str),
        "dlq": (tmp_path / "dlq.jsonl").read_text() + json.dumps([r.get("original") for r in dlq], default=str),
        "audit": json.dumps(audit_rows) + (tmp_path / "audit.sqlite3").read_bytes().decode("latin-1"),
        "logs": flow_output.out + flow_output.err,
        "vault files": b"".join(p.read_bytes() for p in (tmp_path / "vault").rglob("*.parquet")).decode("latin-1"),
    }
    leaks = {name: sorted(v for v in originals if v in text)[:3] for name, text in elsewhere.items()}
    assert not any(leaks.values()), leaks

    # An auditor reads one request's original text back.
    with_pii = [e for e in expected.events.values() if any(v in (e["prompt"] or "") for v in originals)]
    per_user = Counter((e["org_id"], e["user_id"]) for e in with_pii)
    (org, user), _n = per_user.most_common(1)[0]
    mine = next(e for e in with_pii if (e["org_id"], e["user_id"]) == (org, user))
    other = next(e for e in with_pii if (e["org_id"], e["user_id"]) != (org, user))
    auditor = {**env, "GATEWATCH_ACTOR": "carol"}

    def read(event: dict):
        return run_cli("vault", "read", "--request-id", event["request_id"], "--reason", "case 7", env=auditor)

    opened = read(mine)
    assert opened.returncode == 0, opened.stderr[-2000:]
    assert json.loads(opened.stdout.splitlines()[0])["prompt"] == mine["prompt"]

    exported = run_cli("export", "--user", user, "--org", org, "--out", str(tmp_path / "export"), env=auditor)
    assert exported.returncode == 0, exported.stderr[-2000:]
    vault_export = [json.loads(line) for line in (tmp_path / "export" / "vault.jsonl").open()]
    assert mine["prompt"] in {r["prompt"] for r in vault_export}

    forgotten = run_cli("forget", "--user", user, "--org", org, "--yes", env=env)
    assert forgotten.returncode == 0, forgotten.stderr[-2000:]
    assert json.loads(forgotten.stdout.splitlines()[-1])["vault_keys"] == 1
    shredded = read(mine)
    assert shredded.returncode != 0 and "destroyed" in shredded.stderr and mine["prompt"] not in shredded.stdout
    still = read(other)
    assert still.returncode == 0 and json.loads(still.stdout.splitlines()[0])["prompt"] == other["prompt"]
