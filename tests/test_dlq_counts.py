"""The DLQ sink on a real broker: every record delivered and logged, and counted per stage and
code once per batch with the batch's number of them (the same series values as one per record)."""

import logging

import pytest

from schemas.dlq import decode_dlq, event_dlq_record
from sinks import metrics
from sinks.dlq import DeadLetters
from sinks.kafka import read_topic
from sinks.retry import retry_policy

pytestmark = pytest.mark.integration


class Counted(metrics.NoOpMetrics):
    def __init__(self):
        self.records: dict[tuple[str, str], float] = {}

    def increment(self, name, value=1, tags=None):
        if name == "gatewatch_dlq_records":
            key = (tags["stage"], tags["code"])
            self.records[key] = self.records.get(key, 0) + value


def test_a_batch_of_dlq_records_is_delivered_logged_and_counted_per_stage_and_code(
        kafka_bootstrap, topic_factory, tmp_path, monkeypatch, caplog):
    counted = Counted()
    monkeypatch.setattr(metrics, "_backend", counted)
    topic = topic_factory()
    dead_letters = DeadLetters.to_topic(kafka_bootstrap, topic, None, retry_policy(0.05, 0.5), 4096,
                                        str(tmp_path / "spool.jsonl"))
    stages_codes = [("validate", "wrong_schema"), ("redact", "redaction_failed"), ("validate", "wrong_schema")] * 5
    records = [event_dlq_record({"event_id": f"e{i}", "request_id": f"r{i}", "source_partition": 0, "source_offset": i},
                                stage=stage, code=code, reason="test") for i, (stage, code) in enumerate(stages_codes)]
    with caplog.at_level(logging.WARNING, logger="sinks.dlq"):
        dead_letters.send(records[:9])
        dead_letters.send(records[9:])
    assert counted.records == {("validate", "wrong_schema"): 10, ("redact", "redaction_failed"): 5}
    assert [line.request_id for line in caplog.records if line.message == "event sent to the DLQ"] == \
        [f"r{i}" for i in range(15)]
    assert sorted(record["event_id"] for _p, _o, record in read_topic(kafka_bootstrap, topic, decode_dlq)) == \
        sorted(f"e{i}" for i in range(15))
    assert not (tmp_path / "spool.jsonl").exists()
