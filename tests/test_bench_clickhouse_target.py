"""Where the flow's ClickHouse lives: server settings of an embedded chdb session (from its
URL) and `bench e2e --clickhouse server`, whose flow processes must never map chdb."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ops.dev import services
from sinks.chdb_session import CHDB_SESSION_SETTINGS, chdb_location
from tests.processes import REPO, run_cli


def test_a_chdb_url_splits_into_its_directory_and_server_settings(tmp_path):
    path, settings = chdb_location(f"chdb://{tmp_path}/db?mark_cache_size=1048576&background_pool_size=4")
    assert path == str(tmp_path / "db")
    assert settings == {**CHDB_SESSION_SETTINGS, "mark_cache_size": "1048576", "background_pool_size": "4"}
    assert chdb_location("chdb://relative/dir")[0] == str(Path("relative/dir").resolve())
    with pytest.raises(ValueError, match="not a chdb:// URL"):
        chdb_location("clickhouse://127.0.0.1:9000")


SESSION_PROBE = """
import json, sys
from sinks.clickhouse import ClickHouse
client = ClickHouse(sys.argv[1], "probe")
client.execute("CREATE DATABASE IF NOT EXISTS probe")
client.execute("CREATE TABLE probe.t (x UInt8) ENGINE = MergeTree ORDER BY x")
client.execute("INSERT INTO probe.t VALUES (1)")
print(json.dumps({name: [value, changed] for name, value, changed in client.rows(
    "SELECT name, value, changed FROM system.server_settings "
    "WHERE name IN ('mark_cache_size', 'background_pool_size', 'uncompressed_cache_size')")}))
"""


def test_server_settings_in_a_chdb_url_take_effect_in_the_session(tmp_path):
    """In a fresh process whose first chdb session this is, as in a flow process: ClickHouse's
    own system.server_settings says what it runs with."""
    directory = tmp_path / "chdb"
    url = f"chdb://{directory}?mark_cache_size=33554432&background_pool_size=4"
    probe = subprocess.run([sys.executable, "-c", SESSION_PROBE, url], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    settings = json.loads(probe.stdout.splitlines()[-1])
    assert settings["mark_cache_size"] == ["33554432", 1]
    assert settings["background_pool_size"] == ["4", 1]
    assert settings["uncompressed_cache_size"][1] == 0  # not named: chdb's default
    assert (directory / "metadata" / "probe").is_dir()  # the data went where the path says
    assert [p.name for p in tmp_path.iterdir()] == ["chdb"]  # no directory named after the query


@pytest.mark.integration
def test_bench_e2e_with_a_clickhouse_server_stores_every_event_and_never_maps_chdb(tmp_path):
    if not services.clickhouse_binary():
        pytest.skip("no clickhouse-server binary (apt-get install clickhouse-server)")
    result = run_cli("bench", "e2e", "--backlog", "600", "--processes", "1", "--partitions", "2",
                     "--stages-sample", "100", "--clickhouse", "server", "--keep", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["clickhouse"] == "server" and report["events"] == 600
    assert report["chdb_mapped_per_process"] == [False]  # /proc/PID/maps of the running flow
    assert report["clickhouse_events"] == report["valid_events"] > 0  # read back from the server
    assert report["server_cpu_us_per_event"] > 0 and report["server_peak_rss_mb"] > 0
    assert report["total_cpu_us_per_event"] == pytest.approx(
        report["cpu_us_per_event"] + report["server_cpu_us_per_event"], abs=0.2)
    assert "clickhouse server CPU" in result.stderr


@pytest.mark.integration
def test_bench_e2e_that_cannot_drain_in_time_prints_its_figures_and_fails():
    """--drain-timeout: 40,000 events offered in 2 s cannot be drained by one flow process in
    the second after, so the bench reports what it has, the lag left, and exits non-zero."""
    result = run_cli("bench", "e2e", "--rate", "20000", "--duration", "2", "--processes", "1", "--partitions", "1",
                     "--drain-timeout", "1")
    assert result.returncode != 0
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["drained"] is False and report["lag_left"] > 0
    assert report["events"] < 40_000 and report["sustained_events_per_s"] > 0
    assert "did not drain the topic within 1 s" in result.stderr
