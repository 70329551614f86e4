"""The ingest flow's audit sink against a real PostgreSQL server: exactly one row per unique
event after duplicates, a server outage in the middle of the run, and a replay."""

from __future__ import annotations

import threading

from bytewax.testing import run_main

from dataflows.ingest import build_flow
from ops import metrics
from ops.dev.demo import produce
from ops.dev.loadgen import generate
from ops.settings import load_settings
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings
from sinks.audit_log import PostgresAudit


def audit_errors() -> float:
    return metrics.SINK_ERRORS.labels(sink="audit")._value.get()


def test_one_row_per_unique_event_through_an_outage_and_a_replay(postgres_server, kafka_bootstrap, flow_topics_env,
                                                                 tmp_path, monkeypatch):
    owner_url, _app_url = postgres_server.database()
    env = {**flow_topics_env(2), "GATEWATCH_SINKS": "audit,dlq", "GATEWATCH_AUDIT__URL": owner_url,
           "GATEWATCH_AUDIT__HASH_KEY_FILE": str(tmp_path / "audit-hash.key"), "GATEWATCH_AUDIT__MAX_ROWS": "100",
           "GATEWATCH_RETRY__INITIAL_BACKOFF_S": "0.05", "GATEWATCH_RETRY__MAX_BACKOFF_S": "0.5"}
    settings = load_settings(environ=env, use_service_state=False)
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    expected = produce(kafka_bootstrap, settings.kafka.events_topic,
                       generate(codec, 1200, dup_ratio=0.1, bad_ratio=0.0, users=30, seed=12, keep_events=True), 1200)
    assert expected.duplicates > 50

    # The server goes down right after the first batch is in, and comes back 3 s later.
    real_insert = PostgresAudit.insert_events
    outage = {"batches": 0, "errors_before": audit_errors()}
    restarting = threading.Event()

    def restart() -> None:
        restarting.set()
        postgres_server.start()

    comeback = threading.Timer(3, restart)

    def insert_then_fail_over(self, rows):
        inserted = real_insert(self, rows)
        outage["batches"] += 1
        if outage["batches"] == 1:
            postgres_server.stop()
            comeback.start()
        return inserted

    monkeypatch.setattr(PostgresAudit, "insert_events", insert_then_fail_over)
    run_main(build_flow(settings))
    assert restarting.is_set(), "the flow finished while the audit store was down"
    comeback.join()
    assert audit_errors() > outage["errors_before"]

    store = PostgresAudit(owner_url)
    try:
        ids = [event_id for (event_id,) in store._run("SELECT event_id FROM audit_log")]
        assert len(ids) == len(set(ids)) == len(expected.events)
        assert set(ids) == set(expected.events)

        monkeypatch.setattr(PostgresAudit, "insert_events", real_insert)
        run_main(build_flow(settings))  # a replay: a fresh flow reads the whole topic again
        assert store.event_count() == len(expected.events)
        (users,), = store._run("SELECT count(DISTINCT user_hash) FROM audit_log")
        assert users == len({(e["org_id"], e["user_id"]) for e in expected.events.values()})
    finally:
        store.close()


def test_one_row_per_unique_event_after_sigkill_chaos(postgres_server, kafka_bootstrap, flow_topics_env, tmp_path,
                                                      capfd):
    """The flow runs as its own process, is SIGKILLed twice while consuming and resumes
    from its recovery snapshots each time: batches written before a kill come again."""
    import os

    from ops.dev.demo import DemoOptions, run_with_chaos
    from ops.dev.services import free_port

    owner_url, _app_url = postgres_server.database()
    port = free_port()
    env = {**os.environ, **flow_topics_env(2), "GATEWATCH_SINKS": "audit,dlq", "GATEWATCH_AUDIT__URL": owner_url,
           "GATEWATCH_AUDIT__HASH_KEY_FILE": str(tmp_path / "audit-hash.key"), "GATEWATCH_AUDIT__MAX_ROWS": "50",
           "GATEWATCH_METRICS__PORT": str(port)}
    settings = load_settings(environ=env, use_service_state=False)
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    messages = generate(codec, 900, dup_ratio=0.1, bad_ratio=0.02, users=25, seed=8, keep_events=True)
    expected, _seconds = run_with_chaos(DemoOptions(events=900, chaos=2, seed=8), env, tmp_path / "flow.log",
                                        kafka_bootstrap, settings.kafka.events_topic, messages, port,
                                        tmp_path / "recovery")
    assert capfd.readouterr().err.count("chaos: killed flow process") == 2
    store = PostgresAudit(owner_url)
    try:
        ids = [event_id for (event_id,) in store._run("SELECT event_id FROM audit_log")]
    finally:
        store.close()
    assert len(ids) == len(set(ids)) == len(expected.events) == expected.valid
