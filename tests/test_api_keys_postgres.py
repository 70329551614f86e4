"""API keys in PostgreSQL for `serve` replicas behind an autoscaler (issue 16): the same
store semantics as SQLite, `gatewatch api-keys` against either, a key revoked once refused
by two running servers on one database within seconds, and a key store outage that does
not stop keys already checked."""

from __future__ import annotations

import json
import time

import httpx
import psycopg
import pytest

from connectors.ingest_api.keys import (ApiKeyStore, KeyRevoked, KeyStoreUnavailable, PostgresKeyStore,
                                        open_key_store)
from tests.processes import run_cli
from tests.test_ingest_api import Server

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.sqlite'}"
    owner_url, _app_url = request.getfixturevalue("postgres_server").database()
    return owner_url


def test_create_authenticate_list_revoke_on_either_store(store_url):
    store = open_key_store(store_url, cache_ttl_s=0)
    assert isinstance(store, PostgresKeyStore if store_url.startswith("postgresql") else ApiKeyStore)
    key, record = store.create("acme", "eu")
    other, _ = store.create("beta")
    assert store.authenticate(key) == record
    assert store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # wrong secret
    assert store.authenticate("gwk_000000000000_nope") is None and store.authenticate("junk") is None
    assert [k.key_id for k in store.list("acme")] == [record.key_id]
    assert len(store.list()) == 2
    assert store.revoke(key) and not store.revoke(record.key_id)
    with pytest.raises(KeyRevoked):
        store.authenticate(key)
    assert store.authenticate(other).org_id == "beta"
    # A second process opening the same store (schema already there) sees the same keys.
    again = open_key_store(store_url, cache_ttl_s=0)
    assert {k.key_id: k.revoked_at is not None for k in again.list()} == {record.key_id: True,
                                                                         other.split("_")[1]: False}


def test_only_the_hash_of_a_key_is_stored_in_postgresql(postgres_server):
    url, _app = postgres_server.database()
    key, _record = PostgresKeyStore(url).create("acme")
    with psycopg.connect(url) as db:
        dump = repr(db.execute("SELECT * FROM api_keys").fetchall())
    assert key.split("_", 2)[2] not in dump and key not in dump


def test_two_servers_on_one_database_refuse_a_revoked_key_within_seconds(postgres_server, kafka_bootstrap,
                                                                         topic_factory, tmp_path_factory):
    url, _app = postgres_server.database()
    topic = topic_factory(prefix="keys-pg")
    env = {"GATEWATCH_KAFKA__BOOTSTRAP": kafka_bootstrap, "GATEWATCH_KAFKA__EVENTS_TOPIC": topic,
           "GATEWATCH_KAFKA__DLQ_TOPIC": topic_factory(prefix="keys-pg-dlq"), "GATEWATCH_API__KEYS_URL": url,
           "GATEWATCH_API__KEY_CACHE_S": "1"}
    # Each replica has its own disk (keys path, spool); only the database is shared.
    replicas = [Server(tmp_path_factory.mktemp(f"replica{n}"), env) for n in range(2)]
    try:
        key = replicas[0].create_key("acme")  # `gatewatch api-keys create` against PostgreSQL
        headers = {"Authorization": f"Bearer {key}"}
        event = {"event_id": "pg-1", "request_id": "r", "event_time": int(time.time() * 1000), "user_id": "u",
                 "region": "eu", "provider": "openai", "model": "gpt-4o-mini", "latency_ms": 5,
                 "input_tokens": 1, "output_tokens": 1}
        for replica in replicas:
            assert httpx.post(f"{replica.url}/v1/events", json=event, headers=headers).status_code == 200
        listed = [json.loads(line) for line in run_cli("api-keys", "list", env=replicas[1].env).stdout.splitlines()]
        assert [(k["org_id"], k["revoked"]) for k in listed] == [("acme", False)]
        revoked = run_cli("api-keys", "revoke", key.split("_")[1], env=replicas[1].env, timeout=60)
        assert revoked.returncode == 0, revoked.stderr
        started = time.monotonic()
        for replica in replicas:
            while httpx.post(f"{replica.url}/v1/events", json=[], headers=headers).status_code != 403:
                assert time.monotonic() - started < 5, f"replica {replica.url} still takes a revoked key after 5 s"
                time.sleep(0.1)
    finally:
        for replica in replicas:
            replica.stop()


def test_a_key_store_outage_keeps_checked_keys_working(postgres_server):
    url, _app = postgres_server.database()
    store = PostgresKeyStore(url, cache_ttl_s=0, connect_timeout_s=1)
    known, record = store.create("acme")
    unknown, _ = store.create("beta")
    assert store.authenticate(known) == record
    postgres_server.stop()
    try:
        assert store.authenticate(known) == record  # its last known state
        with pytest.raises(KeyStoreUnavailable):
            store.authenticate(unknown)
    finally:
        postgres_server.start()
    assert store.authenticate(unknown).org_id == "beta"  # reconnected
    store.revoke(known)
    with pytest.raises(KeyRevoked):
        store.authenticate(known)


def test_serve_answers_503_with_retry_after_while_the_key_store_is_down(postgres_server, kafka_bootstrap,
                                                                       topic_factory, tmp_path):
    """An OTLP exporter retries 503 (with Retry-After) but drops a batch on 500."""
    url, _app = postgres_server.database()
    env = {"GATEWATCH_KAFKA__BOOTSTRAP": kafka_bootstrap, "GATEWATCH_KAFKA__EVENTS_TOPIC": topic_factory(prefix="pg503"),
           "GATEWATCH_KAFKA__DLQ_TOPIC": topic_factory(prefix="pg503-dlq"), "GATEWATCH_API__KEYS_URL": url,
           "GATEWATCH_API__KEY_CACHE_S": "0"}
    server = Server(tmp_path, env)
    try:
        checked, never_checked = server.create_key("acme"), server.create_key("beta")
        assert httpx.post(f"{server.url}/v1/events", json=[], headers={"Authorization": f"Bearer {checked}"}
                          ).status_code == 200
        postgres_server.stop()
        try:
            refused = httpx.post(f"{server.url}/v1/events", json=[],
                                 headers={"Authorization": f"Bearer {never_checked}"}, timeout=30)
            assert refused.status_code == 503 and refused.headers.get("retry-after"), refused.text
            assert httpx.post(f"{server.url}/v1/events", json=[], headers={"Authorization": f"Bearer {checked}"},
                              timeout=30).status_code == 200
        finally:
            postgres_server.start()
    finally:
        server.stop()
