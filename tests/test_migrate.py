"""`gatewatch migrate` through the one migration runner (ops.migrate), against the real
broker and ClickHouse server of the fixtures; and the one flow launcher's command line."""

from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner
from confluent_kafka.admin import AdminClient

from ops.cli import cli
from ops.launch import FLOW_ALLOCATOR_ENV, Snapshots, flow_command, process_env
from schemas.vocabulary import topic_partitions
from ops.settings import KafkaSettings


@pytest.mark.integration
def test_migrate_creates_every_pipeline_topic_and_database_once(kafka_bootstrap, clickhouse_url, tmp_path):
    suffix = uuid.uuid4().hex[:10]
    kafka = KafkaSettings(bootstrap=kafka_bootstrap, partitions=2,
                          **{f"{name}_topic": f"mig-{name}-{suffix}"
                             for name in ("events", "dlq", "billing", "quota_alerts", "feedback")})
    env = {"GATEWATCH_STATE_DIR": str(tmp_path / "state"), "GATEWATCH_KAFKA__BOOTSTRAP": kafka_bootstrap,
           "GATEWATCH_KAFKA__PARTITIONS": "2",
           **{f"GATEWATCH_KAFKA__{name.upper()}_TOPIC": f"mig-{name}-{suffix}"
              for name in ("events", "dlq", "billing", "quota_alerts", "feedback")},
           "GATEWATCH_CLICKHOUSE__URL": clickhouse_url, "GATEWATCH_CLICKHOUSE__DATABASE": f"mig_{suffix}",
           "GATEWATCH_AUDIT__URL": f"sqlite:///{tmp_path / 'audit.sqlite3'}",
           "GATEWATCH_AUDIT__HASH_KEY_FILE": str(tmp_path / "audit-hash.key")}

    first = CliRunner().invoke(cli, ["migrate"], env=env)
    assert first.exit_code == 0, first.output
    assert f"mig_{suffix}: applied ['001_events'" in first.output
    assert "audit log ready" in first.output

    metadata = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    expected = topic_partitions(kafka, kafka.partitions)
    assert {name: len(metadata[name].partitions) for name in expected} == expected
    assert expected[kafka.dlq_topic] == 1

    again = CliRunner().invoke(cli, ["migrate"], env=env)
    assert again.exit_code == 0, again.output
    assert "applied nothing (up to date)" in again.output


def test_flow_command_gives_bytewax_whole_seconds_and_the_cluster_through_the_environment():
    command = flow_command("feedback", 2, Snapshots("/recovery", interval_s=0.4, backup_s=1.6))
    assert command[1:] == ["-m", "bytewax.run", "ops.launch:feedback", "-w", "2", "-r", "/recovery", "-s", "1",
                           "-b", "2"]
    assert "-i" not in flow_command("ingest") and "-r" not in flow_command("ingest")
    env = process_env({"KEEP": "1"}, 1, "127.0.0.1:1;127.0.0.1:2")
    assert env == {**FLOW_ALLOCATOR_ENV, "KEEP": "1", "BYTEWAX_PROCESS_ID": "1",
                   "BYTEWAX_ADDRESSES": "127.0.0.1:1;127.0.0.1:2"}
    assert process_env({"KEEP": "1"}) == {**FLOW_ALLOCATOR_ENV, "KEEP": "1"}
    # The operator's own allocator settings win over ours.
    assert process_env({"MALLOC_ARENA_MAX": "8"})["MALLOC_ARENA_MAX"] == "8"
