"""One chdb host per machine (ops/chdb_host.py, sinks/chdb_host.py): flow processes write one
embedded database through a host process over a Unix socket (chdb+unix://). Real chdb in a
real host process; clients in this process and in child processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.request import urlopen

import pytest

from ops.allocators import HOST_ALLOCATOR_ENV, HOST_JEMALLOC
from ops.chdb_host import RunningHost, error_summary, start_host, wait_until_serving
from ops.cluster import ClusterError, check_cluster, check_environment
from ops.dev.services import free_port
from ops.settings import Settings
from sinks.chdb_host import OP_PING, HostGone, HostSession, HostStatementError, host_socket, host_url
from sinks.clickhouse import ClickHouse, MIGRATIONS_DIR, arrow_stream_bytes, to_table
from sinks.retry import write_with_retries
from tests.processes import REPO, run_cli
from tests.test_chdb_session import finishing_order_beside_a_slow_insert, running_in_background
from tests.test_clickhouse_insert import events

DATABASE = "hosted"


def batch(first_id: int, count: int, seed: int) -> list[dict]:
    """count events with ids host-<first_id>.. (unique across batches)."""
    return [{**event, "event_id": f"host-{first_id + n}"} for n, event in enumerate(events(count, seed))]


@pytest.fixture
def host(tmp_path) -> RunningHost:
    running = start_host(f"chdb://{tmp_path / 'db'}", tmp_path / "host.sock", tmp_path / "host.log",
                         metrics_port=free_port())
    yield running
    running.stop()


def stored_ids(client: ClickHouse) -> set[str]:
    return {event_id for (event_id,) in client.rows(f"SELECT event_id FROM {DATABASE}.events FINAL")}


CLIENT_PROCESS = """
import sys
from sinks.clickhouse import ClickHouse, to_table
from tests.test_chdb_host import DATABASE, batch
client = ClickHouse(sys.argv[1], DATABASE)
client.migrate()
first = int(sys.argv[2])
for at in range(first, first + 600, 200):
    client.insert("events", to_table(batch(at, 200, at)))
print(client.rows(f"SELECT count() FROM {DATABASE}.events FINAL")[0][0])
"""


def test_two_processes_migrate_insert_and_read_back_one_database_through_the_host(host):
    """Both processes migrate at once (the host's lock makes it one migration) and insert
    Arrow batches; this process reads every row back through the same host."""
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT_PROCESS, host.url, str(first)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for first in (0, 10_000)]
    outputs = [client.communicate(timeout=120) for client in clients]
    assert [client.returncode for client in clients] == [0, 0], [err[-3000:] for _out, err in outputs]

    reader = ClickHouse(host.url, DATABASE)
    assert stored_ids(reader) == {f"host-{n}" for first in (0, 10_000) for n in range(first, first + 600)}
    applied = reader.rows(f"SELECT name, count() FROM {DATABASE}.schema_migrations GROUP BY name ORDER BY name")
    assert applied == [(path.stem, 1) for path in sorted(MIGRATIONS_DIR.glob("*.sql"))]
    assert reader.migrate() == []  # recorded: nothing applied twice
    # Columns come back as written, through Arrow IPC both ways.
    (prompt, cost), = reader.rows(f"SELECT prompt, cost_usd FROM {DATABASE}.events FINAL WHERE event_id = 'host-1'")
    written = batch(0, 200, 0)[1]
    assert (prompt, cost) == (written["prompt"], written["cost_usd"])


def test_threads_of_one_process_insert_and_read_while_another_runs_a_long_statement(host):
    client = ClickHouse(host.url, DATABASE)
    client.migrate()
    answer: list = []
    long_running = running_in_background(client, 5, answer)  # on that thread's own connection
    errors: list[BaseException] = []

    def insert(first: int) -> None:
        try:
            for at in range(first, first + 400, 100):
                client.insert("events", to_table(batch(at, 100, at)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=insert, args=(first,)) for first in (0, 1000, 2000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert len(stored_ids(client)) == 1200
    assert long_running.is_alive()  # every insert and the read finished while it ran
    long_running.join()
    assert answer == [(0,)] * 5


def test_inserts_take_turns_on_the_host(host):
    """A second insert waits for the one running (queries run beside an insert, as the test
    above shows)."""
    client = ClickHouse(host.url, DATABASE)
    client.migrate()
    assert finishing_order_beside_a_slow_insert(client, to_table(batch(0, 10, 1))) == ["slow", "events"]


def test_a_refused_statement_is_chdbs_error_and_the_connection_goes_on(host):
    client = ClickHouse(host.url, DATABASE)
    with pytest.raises(HostStatementError, match="UNKNOWN_TABLE|Unknown table"):
        client.rows("SELECT x FROM system.no_such_table")
    assert client.rows("SELECT 41 + 1") == [(42,)]
    log = [json.loads(line) for line in (host.socket_path.parent / "host.log").read_text().splitlines()
           if line.startswith("{")]
    failed = [line for line in log if line["msg"] == "statement failed"]
    assert failed and failed[-1]["error_code"] == "60" and failed[-1]["request_id"]
    assert "no_such_table" not in json.dumps(failed)  # the statement's text stays out of the log


def test_a_request_interrupted_before_its_reply_leaves_no_reply_for_the_next(host):
    """A flow stopped by SIGINT while waiting for a reply: the refresh its close runs next got
    that reply (a watermark read a row of one column, and the refresh failed until the end)."""

    class Stopped(BaseException):
        pass

    def stop(*_):
        raise Stopped

    session = HostSession(str(host.socket_path))
    previous = signal.signal(signal.SIGALRM, stop)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Stopped):
            session.query("SELECT 'late reply' FROM numbers(1) WHERE sleepEachRow(2) = 0", "CSV")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert session.query("SELECT 'next reply'", "CSV").bytes() == b'"next reply"\n'


def test_a_host_killed_mid_run_fails_the_client_clearly_and_a_restart_keeps_every_acknowledged_row(tmp_path):
    url, sock, log = f"chdb://{tmp_path / 'db'}", tmp_path / "host.sock", tmp_path / "host.log"
    host = start_host(url, sock, log)
    client = ClickHouse(host.url, DATABASE)
    client.migrate()
    acknowledged: list[int] = []
    failure: list[BaseException] = []
    two_written = threading.Event()

    def write_until_it_fails() -> None:
        at = 0
        while True:
            try:
                client.insert("events", to_table(batch(at, 300, at)))
            except Exception as exc:  # noqa: BLE001 - the test checks what it is
                failure.append(exc)
                return
            acknowledged.extend(range(at, at + 300))
            at += 300
            if at >= 600:
                two_written.set()

    writer = threading.Thread(target=write_until_it_fails)
    writer.start()
    assert two_written.wait(60)
    os.kill(host.pid, signal.SIGKILL)
    writer.join(timeout=60)
    host.proc.wait()
    assert len(failure) == 1 and isinstance(failure[0], HostGone), failure
    assert str(sock) in str(failure[0])
    with pytest.raises(HostGone):  # this thread's own connection (the migration's) broke too
        client.rows("SELECT 1")
    with pytest.raises(HostGone, match="not reachable"):  # still down: refused at once, not hung
        client.rows("SELECT 1")

    # A write retried as every sink's is (sinks.retry) goes through once a host is back.
    retried = threading.Thread(target=write_with_retries, args=(
        "clickhouse", lambda: client.insert("events", to_table(batch(100_000, 50, 9)))),
        kwargs={"initial_backoff_s": 0.05, "max_backoff_s": 0.2})
    retried.start()
    restarted = start_host(url, sock, log)  # the dead host's socket file is replaced
    try:
        retried.join(timeout=60)
        assert not retried.is_alive()
        ids = stored_ids(client)  # the same client connects again
        assert {f"host-{n}" for n in acknowledged} <= ids
        assert {f"host-{n}" for n in range(100_000, 100_050)} <= ids
    finally:
        restarted.stop()


def test_a_block_that_loses_the_connection_holding_the_hosts_lock_does_not_go_on_without_it(host):
    session = HostSession(str(host.socket_path))
    other = HostSession(str(host.socket_path), reply_timeout_s=20)
    with pytest.raises(HostGone, match="holding its lock was lost"):
        with session.exclusive():
            session.request(OP_PING)
            session._drop()  # as when the socket breaks mid-block
            session.request(OP_PING)
    assert other.query("SELECT 1", "CSV").bytes().strip() == b"1"  # the host let the lock go with the connection
    session.ping()  # the session connects again after the block
    session.close()
    other.close()


def test_an_exclusive_block_holds_up_the_next_exclusive_block_and_no_other_statement(host):
    first, second = HostSession(str(host.socket_path)), HostSession(str(host.socket_path))
    outside = HostSession(str(host.socket_path), reply_timeout_s=20)
    order: list[str] = []

    def begin_second_block() -> None:
        with second.exclusive():
            order.append("second began")

    with first.exclusive():
        order.append("first began")
        waiting = threading.Thread(target=begin_second_block)
        waiting.start()
        assert outside.query("SELECT 1", "CSV").bytes().strip() == b"1"
        first.query("SELECT sleep(1)")  # the second block's OP_LOCK arrives meanwhile
        order.append("first ended")
    waiting.join()
    assert order == ["first began", "first ended", "second began"]
    for session in (first, second, outside):
        session.close()


def test_sigterm_lets_the_running_statement_answer_then_the_host_stops(host):
    client = ClickHouse(host.url, DATABASE)
    answer: list = []
    long_running = running_in_background(client, 3, answer)
    idle = HostSession(str(host.socket_path))  # a connection open before the stop
    idle.ping()
    host.proc.send_signal(signal.SIGTERM)
    with pytest.raises(HostGone):  # refused, not answered by an engine opened again
        while True:
            idle.ping()
    assert long_running.is_alive()
    long_running.join()
    assert answer == [(0,)] * 3
    assert host.proc.wait(timeout=60) == 0
    assert not host.socket_path.exists()


def test_a_malformed_request_closes_only_its_own_connection(host):
    import socket

    from sinks.chdb_host import recv_frame, send_frame

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(30)
        raw.connect(str(host.socket_path))
        send_frame(raw, b"\x01")  # an op byte without the SQL length
        assert recv_frame(raw) is None  # closed, no reply
    assert ClickHouse(host.url, DATABASE).rows("SELECT 1") == [(1,)]


def test_an_insert_refused_halfway_through_its_payload_leaves_the_connection_in_step(host):
    # The host passes an insert's payload on to chdb in pieces as it arrives; chdb refuses
    # this one at its first bytes, and the host reads the other megabytes before replying.
    client = ClickHouse(host.url, DATABASE)
    client.migrate()
    session = HostSession(str(host.socket_path))
    good = arrow_stream_bytes(to_table(batch(0, 50, 1)))
    bad = b"not arrow" * 400_000 + good
    with pytest.raises(HostStatementError):
        session.insert(f"INSERT INTO {DATABASE}.events FORMAT ArrowStream", len(bad), lambda send: send(bad))
    assert session.query("SELECT 41 + 1", "CSV").bytes() == b"42\n"
    session.insert(f"INSERT INTO {DATABASE}.events", len(good), lambda send: send(good))
    assert client.rows(f"SELECT count() FROM {DATABASE}.events") == [(50,)]


def test_an_insert_cut_short_by_its_writer_stores_nothing_and_the_session_goes_on(host):
    # A flow's insert goes to the socket while Arrow writes it (HostSession.insert): a writer
    # that fails after some pieces leaves a frame unfinished. The client drops the connection,
    # the host cancels the insert, and the next insert reconnects.
    client = ClickHouse(host.url, DATABASE)
    client.migrate()
    session = HostSession(str(host.socket_path))
    payload = arrow_stream_bytes(to_table(batch(0, 2000, 1)))
    sql = f"INSERT INTO {DATABASE}.events"

    def fails_halfway(send) -> None:
        send(payload[:len(payload) // 2])
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError, match="the writer failed"):
        session.insert(sql, len(payload), fails_halfway)
    with pytest.raises(ValueError, match="announced"):
        session.insert(sql, len(payload) + 1, lambda send: send(payload))
    with pytest.raises(ValueError, match="past its announced"):
        session.insert(sql, len(payload) - 1, lambda send: send(payload))
    assert client.rows(f"SELECT count() FROM {DATABASE}.events") == [(0,)]
    session.insert(sql, len(payload), lambda send: send(payload))
    assert client.rows(f"SELECT count() FROM {DATABASE}.events") == [(2000,)]


def test_the_host_serves_metrics(host):
    client = ClickHouse(host.url, DATABASE)
    client.migrate()
    client.insert("events", to_table(batch(0, 100, 1)))
    port = int(host.proc.args[host.proc.args.index("--metrics-port") + 1])
    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line.startswith("gatewatch_chdb_host") and not line.startswith("#")}
    assert values['gatewatch_chdb_host_statements_total{op="insert"}'] == 1
    assert values['gatewatch_chdb_host_statements_total{op="execute"}'] > 10  # the migration's statements
    assert values['gatewatch_chdb_host_bytes_total{direction="in"}'] > 10_000  # the Arrow batch
    assert values['gatewatch_chdb_host_statement_seconds_count{op="insert"}'] == 1
    assert values["gatewatch_chdb_host_connections"] >= 1


def test_the_cli_host_is_a_lean_process_that_maps_chdb_and_not_pyarrow(tmp_path):
    """`gatewatch chdb-host` replaces the CLI's interpreter (which imports pyarrow) with the host's."""
    sock = tmp_path / "cli.sock"
    # The operator's own MALLOC_ARENA_MAX wins; the host's other allocator settings fill in.
    env = {**{name: value for name, value in os.environ.items() if name not in HOST_ALLOCATOR_ENV},
           "MALLOC_ARENA_MAX": "4"}
    with open(tmp_path / "cli.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "chdb-host", "--url", f"chdb://{tmp_path / 'db'}",
                                 "--socket", str(sock)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_until_serving(proc, str(sock), tmp_path / "cli.log", 60)
        ClickHouse(host_url(sock), DATABASE).migrate()
        libraries = {line.rsplit("/", 1)[-1].strip() for line in Path(f"/proc/{proc.pid}/maps").read_text()
                     .splitlines() if "/" in line}
        assert any("chdb" in name for name in libraries)
        assert not any("arrow" in name for name in libraries), sorted(n for n in libraries if "arrow" in n)
        ready = next(json.loads(line) for line in (tmp_path / "cli.log").read_text().splitlines()
                     if '"chdb host ready"' in line)  # read inside the host, not our variables read back
        assert (ready["malloc_arena_max"], ready["malloc_mmap_threshold"], ready["je_malloc_conf"]) == (
            "4", "131072", HOST_JEMALLOC)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert not sock.exists()  # a clean stop removes its socket



def test_a_refresh_through_the_host_waits_for_an_insert_of_another_connection(host, monkeypatch):
    """The host's process list shows every connection's inserts: a refresh's watermark
    stops at another connection's running insert (sinks.clickhouse.refresh_watermark)."""
    import sinks.clickhouse
    from tests.test_aggregates import check_a_running_insert_is_aggregated_by_the_next_refresh, slow_insert_statement

    monkeypatch.setattr(sinks.clickhouse, "REFRESH_MARGIN_S", 0)
    client = ClickHouse(host.url, DATABASE)
    client.migrate()
    # (a host's insert reaches it whole, at the stream's finish: the slow statement runs in it)
    check_a_running_insert_is_aggregated_by_the_next_refresh(client, slow_insert_statement(client), (2, 14))

def test_a_second_host_on_a_live_socket_refuses_to_start(host):
    second = subprocess.run([sys.executable, "-m", "ops.chdb_host", "--url", f"chdb://{host.socket_path.parent}/x",
                             "--socket", str(host.socket_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert second.returncode != 0 and "already serves" in second.stderr
    HostSession(str(host.socket_path)).ping()  # the first one still serves


def test_urls_and_error_summaries():
    assert host_socket("chdb+unix:///run/gatewatch/host.sock") == "/run/gatewatch/host.sock"
    with pytest.raises(ValueError, match="chdb\\+unix:///absolute"):
        host_socket("chdb+unix://relative/host.sock")
    assert Settings(clickhouse={"url": "chdb+unix:///run/host.sock"}).clickhouse.url == "chdb+unix:///run/host.sock"
    assert error_summary("Code: 60. DB::Exception: Unknown table 'secret_value'. (UNKNOWN_TABLE) "
                         "(version 25.8.2.1)") == {"error_code": "60", "error_name": "UNKNOWN_TABLE"}


def test_a_cluster_on_one_machine_may_write_through_a_host_and_chdb_is_refused_pointing_at_it():
    hosted = Settings(clickhouse={"url": "chdb+unix:///run/host.sock"})
    check_cluster(hosted, 4, 2)
    check_environment(hosted, {"BYTEWAX_ADDRESSES": "127.0.0.1:2101;localhost:2102;127.0.0.1:2103"})
    with pytest.raises(ClusterError, match="spans 2 machines"):
        check_environment(hosted, {"BYTEWAX_ADDRESSES": "pod-0.flow:2101;pod-1.flow:2101"})
    with pytest.raises(ClusterError, match="gatewatch chdb-host --url chdb:///tmp/x"):
        check_cluster(Settings(clickhouse={"url": "chdb:///tmp/x"}), 2, 1)


@pytest.mark.integration
def test_bench_e2e_through_a_host_stores_every_event_and_reports_the_hosts_share():
    """Two flow processes write one database through one host: the default for several."""
    result = run_cli("bench", "e2e", "--backlog", "1500", "--processes", "2", "--partitions", "4",
                     "--stages-sample", "200")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["clickhouse"] == "chdb-host" and report["chdb_mapped_per_process"] == [False, False]
    assert report["clickhouse_events"] == report["valid_events"] > 0  # read back from the host's one database
    assert 0 < report["host_cpu_us_per_event"] < report["cpu_us_per_event"]  # counted in the flow's
    assert report["host_peak_rss_mb"] > 100  # chdb's code alone is ~224 MB
    assert "one chdb host for every flow process" in result.stderr and "chdb host RSS" in result.stderr
    # The host's own threads, apart from the flows': its connections' Python and chdb's.
    assert "python" in report["host_thread_us_per_event"] and "host thread python" in result.stderr
