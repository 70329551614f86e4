"""The ingest flow as a Bytewax cluster: what a cluster refuses (embedded chdb in more than
one process, whose files live on one process's disk), how recovery partitions
are shared out per process, and a two-process cluster in tail mode with recovery that
loses a process mid-stream, restarts, rescales to one process and still reconciles
every store."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ops.cli import cli
from ops.cluster import ClusterError, addresses_for, check_cluster, check_environment, cluster_addresses
from ops.dev import demo
from ops.dev.loadgen import generate
from ops.dev.services import free_port
from ops.recovery import init_recovery, recovery_files, share_of
from ops.settings import Settings, load_settings
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings
from sinks.parquet import ParquetStore


def chdb_settings() -> Settings:
    return Settings(clickhouse={"url": "chdb:///tmp/gatewatch-cluster-test"})


@pytest.mark.parametrize("processes, workers", [(2, 1), (8, 4)])
def test_a_cluster_refuses_embedded_clickhouse(processes, workers):
    with pytest.raises(ClusterError, match="cannot be written by a Bytewax cluster.*clickhouse://host:9000"):
        check_cluster(chdb_settings(), processes, workers)


def test_one_process_may_use_chdb_with_any_workers_and_a_cluster_may_use_a_server():
    check_cluster(chdb_settings(), 1, 1)
    check_cluster(chdb_settings(), 1, 4)  # workers of one process share its chdb session (sinks.clickhouse)
    check_cluster(Settings(clickhouse={"url": "clickhouse://127.0.0.1:9000"}), 4, 2)
    check_cluster(Settings(sinks=["parquet", "quota", "dlq"], clickhouse={"url": "chdb:///tmp/x"}), 4, 1)


def test_a_flow_process_reads_its_cluster_from_the_environment():
    env = {"BYTEWAX_ADDRESSES": addresses_for(3, [2101, 2102, 2103])}
    assert cluster_addresses(env) == ["127.0.0.1:2101", "127.0.0.1:2102", "127.0.0.1:2103"]
    assert cluster_addresses({}) == []
    with pytest.raises(ClusterError):
        check_environment(chdb_settings(), env)
    check_environment(chdb_settings(), {"BYTEWAX_WORKERS_PER_PROCESS": "2"})
    check_environment(chdb_settings(), {})


def test_gatewatch_run_refuses_chdb_in_a_cluster_before_starting_anything(tmp_path):
    result = CliRunner().invoke(cli, ["run", "ingest", "-i", "0", "-a", "127.0.0.1:1;127.0.0.1:2",
                                      "--recovery-dir", str(tmp_path / "recovery")],
                                env={"GATEWATCH_CLICKHOUSE__URL": f"chdb://{tmp_path / 'chdb'}"})
    assert result.exit_code == 1
    assert "files live on one process's disk" in result.output
    assert not (tmp_path / "recovery").exists()


def test_each_process_keeps_its_share_of_the_recovery_partitions(tmp_path):
    for index in range(3):
        init_recovery(tmp_path / f"pod-{index}", 5, share=(index, 3))
    shares = [recovery_files(tmp_path / f"pod-{index}") for index in range(3)]
    assert shares == [["part-0.sqlite3", "part-3.sqlite3"], ["part-1.sqlite3", "part-4.sqlite3"], ["part-2.sqlite3"]]
    assert [share_of(5, index, 3) for index in range(3)] == [[0, 3], [1, 4], [2]]
    # A second start leaves an initialised directory alone.
    init_recovery(tmp_path / "pod-0", 5, share=(0, 3))
    assert recovery_files(tmp_path / "pod-0") == shares[0]
    assert not [name for name in os.listdir(tmp_path / "pod-0") if name.startswith(".init-")]


def test_too_few_recovery_partitions_for_the_processes_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="2 recovery partition"):
        init_recovery(tmp_path / "recovery", 2, share=(0, 3))
    with pytest.raises(ValueError, match="outside a cluster of 3"):
        share_of(3, 3, 3)


@pytest.mark.e2e
@pytest.mark.integration
def test_a_two_process_cluster_loses_a_process_mid_stream_rescales_and_reconciles(tmp_path, capsys):
    # Two kills of a 2-process cluster in tail mode with recovery, each restart from the same
    # recovery store; the final, draining run has one process (rescaling). Every process
    # writes one chdb through a chdb host (a cluster refuses chdb in its processes).
    found, problems, expected = demo.run(demo.DemoOptions(
        events=800, chaos=2, processes=2, restart_processes=1, seed=31, users=40, late_ratio=0.02,
        data_dir=str(tmp_path)))
    assert problems == []
    assert found["chaos_kills"] == 2 and found["processes"] == 2
    assert found["clickhouse_url"].startswith("chdb+unix://")
    assert found["clickhouse_rows"] == expected.valid
    assert found["quota_total_tokens"] == expected.tokens  # late events included
    assert found["billing_total_usd"] == found["expected_total_usd"]
    assert found["events_without_audit"] == 0
    assert expected.duplicates > 0 and expected.bad > 0 and expected.late > 0
    kills = [line for line in capsys.readouterr().err.splitlines() if line.startswith("chaos: killed flow process")]
    assert len(kills) == 2 and all(" of 2 " in line for line in kills)


@pytest.mark.e2e
@pytest.mark.integration
def test_processes_with_recovery_on_disks_of_their_own_resume_where_they_stopped(
        tmp_path, kafka_bootstrap, flow_topics_env):
    # The Kubernetes layout: `gatewatch run --recovery-share`, each process keeping its share
    # of the partitions on its own disk. A second run of the cluster resumes from the shares
    # together and reads nothing twice. Parquet and the DLQ only, to keep it short.
    env = {**os.environ, **flow_topics_env(partitions=4), "GATEWATCH_SINKS": "parquet,dlq",
           "GATEWATCH_PARQUET__ROOT": str(tmp_path / "raw"), "GATEWATCH_RECOVERY__PARTITIONS": "2",
           "GATEWATCH_RECOVERY__SNAPSHOT_INTERVAL_S": "1", "GATEWATCH_LOG_LEVEL": "WARNING"}
    settings = load_settings(environ=env, use_service_state=False)
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    expected = demo.produce(kafka_bootstrap, settings.kafka.events_topic,
                            generate(codec, 400, 0.05, 0.05, users=30, seed=5), 400)
    addresses = addresses_for(2, [free_port(), free_port()])

    def run_cluster(run: int) -> list[dict]:
        procs = [subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "run", "ingest", "-i", str(index), "-a", addresses,
             "--recovery-dir", str(tmp_path / f"pod-{index}"), "--recovery-share"],
            env={**env, "GATEWATCH_METRICS__DUMP_PATH": str(tmp_path / f"counters-{run}-{index}.json")},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for index in range(2)]
        for proc in procs:
            _out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        return [json.loads((tmp_path / f"counters-{run}-{index}.json").read_text()) for index in range(2)]

    def consumed(counters: list[dict]) -> int:
        """Messages read: decoded events plus those that could not be decoded."""
        return int(sum(value for c in counters for name, value in c.items()
                       if name == "gatewatch_events_total{stage=decoded}"
                       or name.startswith("gatewatch_dlq_records_total{") and name.endswith("stage=decode}")))

    first = run_cluster(0)
    assert [recovery_files(tmp_path / f"pod-{index}") for index in range(2)] == [["part-0.sqlite3"], ["part-1.sqlite3"]]
    assert consumed(first) == expected.produced
    assert all(consumed([c]) > 0 for c in first)  # both processes read partitions
    assert consumed(run_cluster(1)) == 0
    assert ParquetStore(str(tmp_path / "raw")).read().num_rows == expected.valid
