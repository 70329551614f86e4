"""Several Bytewax workers in one process on embedded ClickHouse (issue 17): the workers share
the process's one chdb engine, each on its own handle (sinks.chdb_session), so their inserts,
quota month bases and aggregate refreshes run side by side and their migrations take turns."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import bytewax.run
import pytest

from ops.dev import demo
from ops.dev.services import free_port
from ops.launch import bytewax_scaling
from sinks.clickhouse import ClickHouse, close_chdb, month_usage_before, refresh_aggregates
from tests.test_clickhouse_insert import events


def run_on_threads(work, count: int) -> list[str]:
    """Run work(index) on `count` threads started together; return the errors they raised."""
    errors: list[str] = []
    start = threading.Barrier(count)

    def worker(index: int) -> None:
        start.wait()
        try:
            work(index)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck on the chdb session"
    return errors


def test_workers_of_one_process_migrate_the_same_database_once(tmp_path):
    url = f"chdb://{tmp_path / 'chdb'}"
    applied: list[list[str]] = [[], [], []]

    def migrate(index: int) -> None:
        applied[index] = ClickHouse(url, "shared").migrate()

    try:
        errors = run_on_threads(migrate, 3)
        recorded = ClickHouse(url, "shared").rows("SELECT name, count() FROM shared.schema_migrations GROUP BY name")
    finally:
        close_chdb()
    assert errors == []
    migrations = sorted(path.stem for path in Path("ops/migrations").glob("*.sql"))
    assert sorted(name for names in applied for name in names) == migrations  # each applied by one thread
    assert sorted(recorded) == [(name, 1) for name in migrations]


def test_inserts_queries_and_refreshes_of_several_workers_run_side_by_side(tmp_path):
    # One worker writes events while another reads month bases and a third refreshes the
    # aggregates: chdb refuses a statement while a streaming insert is active on a handle, so
    # each worker must use its own.
    url = f"chdb://{tmp_path / 'chdb'}"
    batch = events(600, seed=3)
    users = sorted({(event["org_id"], event["user_id"]) for event in batch})
    ClickHouse(url, "turns").migrate()

    def work(index: int) -> None:
        client = ClickHouse(url, "turns")
        for round_ in range(12):
            if index == 0:
                client.insert_events(batch[round_ * 50:(round_ + 1) * 50])
            elif index == 1:
                month_usage_before(client, users, "202611", "20261130")
            else:
                refresh_aggregates(client)

    try:
        errors = run_on_threads(work, 3)
        client = ClickHouse(url, "turns")
        refresh_aggregates(client)
        (stored, tokens), = client.rows("SELECT count(), sum(input_tokens) FROM turns.events FINAL")
        (requests,), = client.rows("SELECT sum(requests) FROM turns.usage_daily FINAL")
    finally:
        close_chdb()
    assert errors == []
    assert (stored, tokens) == (len(batch), sum(event["input_tokens"] for event in batch))
    assert requests == len(batch)


@pytest.mark.e2e
@pytest.mark.integration
def test_two_workers_in_one_process_on_chdb_reconcile_every_store(tmp_path):
    # The flow process of `gatewatch run ingest -w 2` (bytewax.run, ops.launch) on its default
    # embedded ClickHouse; before the workers' migrations took turns and their statements were
    # kept off each other's session, it died at start-up (TABLE_ALREADY_EXISTS) after quota
    # month bases failed on the shared session.
    found, problems, expected = demo.run(demo.DemoOptions(
        events=400, workers=2, partitions=4, users=30, seed=17, late_ratio=0.02, data_dir=str(tmp_path)))
    assert found["clickhouse_url"].startswith("chdb://")
    assert problems == []
    assert found["clickhouse_rows"] == expected.valid and found["audit_log_rows"] == expected.valid
    assert found["billing_total_usd"] == found["expected_total_usd"]
    assert expected.duplicates > 0 and expected.bad > 0
    log = [json.loads(line) for line in (tmp_path / "flow.log").read_text().splitlines() if line.startswith("{")]
    assert log, "the flow wrote no JSON log"
    troubles = [entry for entry in log if entry.get("level") in ("WARNING", "ERROR", "CRITICAL")
                and ("chdb" in json.dumps(entry).lower() or entry.get("sink", "").startswith(("quota", "clickhouse")))]
    assert troubles == []


def test_a_flow_process_reads_its_cluster_from_bytewax_run_arguments_too(tmp_path):
    run = bytewax.run.__file__
    assert bytewax_scaling([run, "ops.launch:ingest", "-w", "2", "-s", "1", "-b", "0"], {}) == {
        "BYTEWAX_WORKERS_PER_PROCESS": "2"}
    assert bytewax_scaling([run, "ops.launch:ingest", "-i", "1", "--addresses=h0:2101;h1:2101"], {}) == {
        "BYTEWAX_ADDRESSES": "h0:2101;h1:2101"}
    hostfile = tmp_path / "hosts"
    hostfile.write_text("h0:2101\n\nh1:2101\n")
    assert bytewax_scaling([run, "ops.launch:ingest", "-i", "0"], {"BYTEWAX_HOSTFILE_PATH": str(hostfile)}) == {
        "BYTEWAX_ADDRESSES": "h0:2101;h1:2101"}
    assert bytewax_scaling(["-c", "-w", "2"], {}) == {}  # not bytewax.run's arguments


def test_bytewax_run_refuses_a_cluster_of_processes_on_chdb_before_touching_it(tmp_path):
    # Addresses given as bytewax.run arguments, not through the environment `gatewatch run` sets.
    env = {**os.environ, "GATEWATCH_CLICKHOUSE__URL": f"chdb://{tmp_path / 'chdb'}"}
    env.pop("BYTEWAX_ADDRESSES", None)
    addresses = f"127.0.0.1:{free_port()};127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "bytewax.run", "ops.launch:ingest", "-i", "0", "-a", addresses],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "ClusterError" in done.stderr and "files live on one process's disk" in done.stderr
    assert not (tmp_path / "chdb").exists()
