"""The real-world PII formats through the ingest flow: events whose prompts and responses are
held-out corpus texts (faker/mimesis values in tickets, logs, CSV, k8s env blocks, ...) go
through Kafka and the flow; no labeled pattern value (phones, IPs, IBANs, cards, SSNs,
e-mails, wallets, secrets) reaches Parquet, ClickHouse, Redis or the DLQ, and at least 95%
of the names are gone from the stored texts (name recall is below 1 by design; the bench
measures it)."""

from __future__ import annotations

import ipaddress
import random
import time
import uuid

import pytest
import s3fs
from bytewax.testing import run_main

from dataflows.ingest import build_flow
from ops.bench.redaction_corpus import generate_corpus
from ops.dev.demo import produce
from ops.dev.loadgen import Expected, make_event
from ops.settings import load_settings
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings
from sinks.parquet import ParquetStore
from tests.test_e2e_ingest import test_no_original_pii_is_stored_anywhere as assert_no_pii_stored

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

EVENTS = 120


def _checkable(label: str, value: str) -> bool:
    """Values whose presence anywhere would be a leak: long enough not to occur by chance,
    and not addresses the policy keeps on purpose (ip_ignore_private: ULA, loopback)."""
    if len(value) < 6:
        return False
    if label == "IP_ADDRESS":
        try:
            address = ipaddress.ip_address(value.split("%")[0])
        except ValueError:
            return True
        return not (address.version == 6 and address in ipaddress.ip_network("fc00::/7"))
    return True


def test_no_real_world_pii_format_reaches_any_store(kafka_bootstrap, topic_factory, redis_url, s3_endpoint,
                                                    tmp_path):
    bucket = f"rw-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir(bucket)
    settings = load_settings(environ={}, use_service_state=False, overrides={
        "kafka": {"bootstrap": kafka_bootstrap, "events_topic": topic_factory(partitions=2),
                  "dlq_topic": topic_factory(partitions=1), "tail": False,
                  "billing_topic": topic_factory(partitions=1), "quota_alerts_topic": topic_factory(partitions=1)},
        "parquet": {"root": f"s3://{bucket}/raw", "s3_endpoint_url": s3_endpoint},
        "clickhouse": {"url": f"chdb://{tmp_path / 'chdb'}", "database": "realworld"},
        "redis": {"url": redis_url},
    })
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    samples = generate_corpus(EVENTS * 2, seed=29, pii_ratio=1.0, kind="realworld")
    rng = random.Random(29)
    expected = Expected()
    names: list[str] = []
    messages = []
    for prompt, response in zip(samples[::2], samples[1::2]):
        event, _ = make_event(rng, int(time.time() * 1000), 20, 0.0)
        event["prompt"], event["response"] = prompt.text, response.text
        messages.append((event["user_id"].encode(), codec.encode(event)))
        for sample in (prompt, response):
            for label, start, end in sample.spans:
                value = sample.text[start:end]
                if _checkable(label, value):
                    (names if label == "PERSON" else expected.pii_values).append(value)
    assert len({label for s in samples for label, _, _ in s.spans}) == 9  # every entity type is in play
    produce(kafka_bootstrap, settings.kafka.events_topic, iter(messages), len(messages))
    run_main(build_flow(settings))
    rows = ParquetStore(settings.parquet.root, settings.parquet.s3_endpoint_url).read().to_pylist()
    assert len({row["event_id"] for row in rows}) == EVENTS  # every event went through, none to the DLQ
    flags = {flag for row in rows for flag in row["policy_flags"]}
    assert {"pii:PHONE_NUMBER", "pii:IP_ADDRESS", "pii:SECRET", "pii:PERSON", "pii:IBAN_CODE"} <= flags
    texts = "\n".join(row[field] or "" for row in rows for field in ("prompt", "response"))
    assert len(names) > 50 and sum(name in texts for name in names) <= 0.05 * len(names)
    assert_no_pii_stored((settings, expected, tmp_path))
