"""Raw text in Parquet: AES-GCM sealed per value with a key id per file, and sampled by a
deterministic per-event choice; every event still reaches the metrics."""

from __future__ import annotations

import base64
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from bytewax.testing import run_main

from dataflows.ingest import build_flow
from ops.dev.demo import produce
from ops.dev.loadgen import generate
from ops.settings import SettingsError, load_settings
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings
from sinks.clickhouse import ClickHouse
from sinks.parquet import ParquetStore, keeps_text, sample_text
from sinks.text_cipher import KEY_ID_METADATA, TextKeyError

OLD_KEY, NEW_KEY = os.urandom(32), os.urandom(16)


def event(n: int, prompt: str | None = "my card is <CREDIT_CARD>", region: str = "eu") -> dict:
    return {"event_id": f"e-{n}", "request_id": f"r-{n}", "schema_version": 1, "event_time": 1_767_225_600_000 + n,
            "user_id": f"u-{n % 3}", "org_id": "acme", "region": region, "provider": "openai", "endpoint": "chat",
            "model": "gpt-4o", "model_version": None, "status_code": 200, "error_code": None, "streaming": False,
            "latency_ms": 100 + n, "time_to_first_token_ms": None, "input_tokens": n, "output_tokens": 2 * n,
            "cache_read_tokens": 0, "cache_write_tokens": 0, "prompt": prompt, "response": f"answer number {n}",
            "conversation_id": None, "experiment_id": None, "variant": None, "safety_decisions": [],
            "policy_flags": [], "classification": "internal", "pii_entity_counts": {}, "cost_usd": None,
            "price_version": "", "source_partition": 0, "source_offset": n}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, s3_endpoint):
    if request.param == "local":
        return str(tmp_path / "raw"), None
    bucket = f"sealed-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir(bucket)
    return f"s3://{bucket}/raw", s3_endpoint


def test_sealed_text_is_unreadable_in_the_file_and_opens_with_its_key(root):
    url, endpoint = root
    events = [event(n) for n in range(20)] + [event(20, prompt=None)]
    writer = ParquetStore(url, endpoint, text_keys={"k1": OLD_KEY}, text_key_id="k1")
    path = writer.write("event_date=2026-01-01/region=eu", events)

    data = writer.fs.cat_file(path)
    assert b"answer number 7" not in data and b"<CREDIT_CARD>" not in data
    stored = pq.read_table(pa.BufferReader(data))
    assert stored.schema.metadata[KEY_ID_METADATA] == b"k1"
    assert stored.column("response")[7].as_py() != "answer number 7"
    assert stored.column("prompt")[20].as_py() is None

    back = ParquetStore(url, endpoint, text_keys={"k1": OLD_KEY}).read().sort_by("source_offset")
    assert back.column("response").to_pylist() == [e["response"] for e in events]
    assert back.column("prompt").to_pylist() == [e["prompt"] for e in events]
    assert back.column("input_tokens").to_pylist() == [e["input_tokens"] for e in events]


def test_rotated_keys_read_old_files_and_a_missing_key_is_named(tmp_path):
    old = ParquetStore(str(tmp_path), text_keys={"k1": OLD_KEY}, text_key_id="k1")
    old.write("event_date=2026-01-01/region=eu", [event(1)])
    rotated = ParquetStore(str(tmp_path), text_keys={"k1": OLD_KEY, "k2": NEW_KEY}, text_key_id="k2")
    rotated.write("event_date=2026-01-02/region=eu", [event(2)])
    assert sorted(rotated.read().column("response").to_pylist()) == ["answer number 1", "answer number 2"]

    with pytest.raises(TextKeyError, match="'k1'"):
        ParquetStore(str(tmp_path), text_keys={"k2": NEW_KEY}).read()


def test_a_value_moved_to_another_row_does_not_open(tmp_path):
    store = ParquetStore(str(tmp_path), text_keys={"k1": OLD_KEY}, text_key_id="k1")
    path = store.write("event_date=2026-01-01/region=eu", [event(1), event(2)])
    table = pq.read_table(path)
    swapped = table.column("response").to_pylist()[::-1]
    pq.write_table(table.set_column(table.schema.get_field_index("response"), "response", pa.array(swapped)), path)
    with pytest.raises(TextKeyError, match="does not open"):
        store.read()


def test_text_sampling_is_deterministic_and_near_the_rate():
    events = [event(n) for n in range(20_000)]
    kept = [e for e in events if keeps_text(e, 0.25)]
    assert 0.23 < len(kept) / len(events) < 0.27
    assert kept == [e for e in events if keeps_text(e, 0.25)]
    assert all(keeps_text(e, 1.0) for e in events[:100]) and not any(keeps_text(e, 0.0) for e in events[:100])
    dropped = sample_text(next(e for e in events if not keeps_text(e, 0.25)), 0.25)
    assert dropped["prompt"] is None and dropped["response"] is None and dropped["input_tokens"] >= 0


@pytest.mark.parametrize("parquet, complaint", [
    ({"text_keys": {"k1": "not base64!"}}, "text key 'k1': an encryption key must be base64"),
    ({"text_keys": {"k1": base64.b64encode(b"short").decode()}}, "decodes to 5"),
    ({"text_key_id": "k9"}, "text_key_id 'k9' is not one of text_keys"),
    ({"text_sample_rate": 1.5}, "text_sample_rate"),
])
def test_bad_text_settings_say_what_is_wrong(parquet, complaint):
    with pytest.raises(SettingsError, match=complaint):
        load_settings(environ={}, use_service_state=False, overrides={"parquet": parquet})


def test_key_from_the_environment_is_never_printed():
    key = base64.b64encode(OLD_KEY).decode()
    settings = load_settings(environ={"GATEWATCH_PARQUET__TEXT_KEYS": f'{{"k1": "{key}"}}',
                                      "GATEWATCH_PARQUET__TEXT_KEY_ID": "k1"}, use_service_state=False)
    assert settings.parquet.store().text_keys == {"k1": OLD_KEY}
    assert key not in settings.model_dump_json() and key not in repr(settings)


@pytest.mark.e2e
def test_flow_samples_and_seals_text_but_counts_every_event(kafka_bootstrap, topic_factory, redis_url, tmp_path):
    key = base64.b64encode(OLD_KEY).decode()
    settings = load_settings(environ={}, use_service_state=False, overrides={
        "kafka": {"bootstrap": kafka_bootstrap, "events_topic": topic_factory(partitions=2), "tail": False,
                  "dlq_topic": topic_factory(partitions=1), "billing_topic": topic_factory(partitions=1),
                  "quota_alerts_topic": topic_factory(partitions=1)},
        "parquet": {"root": str(tmp_path / "raw"), "text_sample_rate": 0.3, "text_keys": {"k1": key},
                    "text_key_id": "k1"},
        "clickhouse": {"url": f"chdb://{tmp_path / 'chdb'}", "database": "sampled"},
        "redis": {"url": redis_url},
    })
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    expected = produce(kafka_bootstrap, settings.kafka.events_topic,
                       generate(codec, 600, dup_ratio=0.0, bad_ratio=0.0, users=10, seed=5, keep_events=True), 600)
    run_main(build_flow(settings))

    table = settings.parquet.store().read()
    assert table.num_rows == expected.valid
    kept = {row["event_id"] for row in table.select(["event_id", "response"]).to_pylist() if row["response"]}
    assert kept == {e_id for e_id, sent in expected.events.items() if sent["response"] and keeps_text(sent, 0.3)}
    assert 0 < len(kept) < expected.valid

    clickhouse = ClickHouse(settings.clickhouse.url, settings.clickhouse.database)
    (rows, with_text, tokens), = clickhouse.rows(
        "SELECT count(), countIf(response IS NOT NULL AND response != ''), "
        "sum(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens) FROM sampled.events FINAL")
    assert (rows, with_text, tokens) == (expected.valid, len(kept), expected.tokens)


def test_an_s3_upload_that_never_answers_times_out_and_the_next_attempt_gets_a_new_session(monkeypatch):
    """A server that accepts the connection and never answers: the upload gives up after
    put_timeout_s (so the sink's retry can run) and the store builds a new S3 session."""
    import socket

    from fsspec.exceptions import FSTimeoutError

    silent = socket.create_server(("127.0.0.1", 0))
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "gatewatch")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "gatewatch-secret")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        store = ParquetStore("s3://silent/raw", f"http://127.0.0.1:{silent.getsockname()[1]}", put_timeout_s=2)
        first = store.fs
        with pytest.raises(FSTimeoutError):
            store.put("silent/raw/x.parquet", pa.table({"a": [1]}))
        assert store.fs is not first
    finally:
        silent.close()
