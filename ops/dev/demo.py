"""`gatewatch demo`: the whole pipeline on this machine, no servers started by hand.

It starts a Kafka-protocol broker and Redis from pip wheels, produces synthetic traffic,
runs the ingest dataflow until the topic is drained (Parquet in a local directory,
ClickHouse embedded through chdb) and reconciles what every sink holds against what was
produced.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from pathlib import Path

import pyarrow.compute as pc
from confluent_kafka import Producer

from ops.chdb_host import start_host
from ops.cluster import addresses_for, refuses_chdb
from ops.dev import api_feed, services
from ops.dev.loadgen import Expected, FleetWire, collect, generate
from ops.launch import Snapshots, flow_command, process_env
from ops.migrate import migrate_kafka
from ops.recovery import init_recovery
from ops.settings import SINK_NAMES, Settings
from schemas.records import decode_billing_event
from schemas.dlq import decode_dlq
from schemas.registry import registry_from_settings
from sinks.audit_log import open_store
from sinks.billing import billing_event, latest_versions
from sinks.clickhouse import ClickHouse, close_chdb
from sinks.kafka import produce_when_room, read_topic
from sinks.parquet import ParquetStore
from sinks.quota import QuotaStore

# A flow whose counters stand still this long (before or after draining) is stuck, not slow.
STALL_S = 300


@dataclass
class DemoOptions:
    events: int = 5000
    dup_ratio: float = 0.05
    bad_ratio: float = 0.02
    late_ratio: float = 0.01
    users: int = 200
    seed: int = 7
    data_dir: str | None = None
    metrics_port: int | None = None
    workers: int = 1
    partitions: int = 3
    keep_events: bool = False
    """Keep every generated event in the returned Expected (for tests)."""
    chaos: int = 0
    """Kill the flow (SIGKILL) this many times at random points while events are produced."""
    processes: int = 1
    """Run the flow as a Bytewax cluster of this many processes on loopback (-i/-a); a
    chaos kill then SIGKILLs one of them, and the whole cluster restarts from recovery.
    A cluster writes a ClickHouse server instead of chdb (see ops/cluster.py)."""
    restart_processes: int | None = None
    """With chaos: the process count of the final, draining run (rescaling from the same
    recovery store); default `processes`."""
    via_api: bool = False
    """Send the events through `gatewatch serve` (JSON batches and OTLP spans) instead of
    producing them to Kafka; see ops/dev/api_feed.py."""
    otlp_share: float = 0.3
    """With via_api: the share of events sent as OpenTelemetry GenAI spans."""
    v2_ratio: float = 0.5
    """Share of events of schema version 2 (reasoning tokens, trace ids); the rest are v1."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress_line(label: str, done: float, total: float, started: float) -> str:
    width = 30
    filled = int(width * min(1.0, done / total)) if total else width
    rate = done / max(1e-9, time.monotonic() - started)
    return f"\r{label:<10} [{'#' * filled}{'.' * (width - filled)}] {int(done):>7}/{int(total)}  {rate:8.0f}/s"


def produce(bootstrap: str, topic: str, messages, total: int, rate: float | None = None) -> Expected:
    """Produce every generated message (at `rate` messages/s if given) and return Expected."""
    # The partitioner of connectors.producer.EventProducer, so a user's events share a partition.
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "linger.ms": 20, "compression.type": "zstd", "partitioner": "murmur2_random"})
    failures: list[str] = []
    started = time.monotonic()
    sent = 0
    try:
        while True:
            key, value = next(messages)
            produce_when_room(producer, topic, value, key, lambda err, _m: err and failures.append(str(err)))
            sent += 1
            if rate:
                time.sleep(max(0.0, started + sent / rate - time.monotonic()))
            if sent % 500 == 0:
                producer.poll(0)
                print(progress_line("produce", sent, total, started), end="", file=sys.stderr, flush=True)
    except StopIteration as done:
        expected = done.value
    if producer.flush(60) or failures:
        raise RuntimeError(f"producing demo events failed: {failures[:3]}")
    print(progress_line("produce", sent, total, started), file=sys.stderr, flush=True)
    return expected


def scrape(port: int) -> dict[str, float]:
    """Counter totals from a flow's /metrics endpoint (labels summed)."""
    return scrape_url(f"http://127.0.0.1:{port}/metrics")


def scrape_url(url: str) -> dict[str, float]:
    """Counter totals of gatewatch_* counters at a Prometheus endpoint: by name (labels
    summed) and by name with its labels. A process that exits while it answers (a drained
    flow) raises ConnectionError, like one that no longer listens."""
    try:
        text = urllib.request.urlopen(url, timeout=2).read().decode()
    except http.client.HTTPException as exc:
        raise ConnectionError(f"{url} broke off its answer: {exc!r}") from exc
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gatewatch_") and "_total" in line:
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{", 1)[0]
            totals[name] = totals.get(name, 0) + float(value)
            if "{" in name_labels:
                totals[name_labels] = float(value)
    return totals


@dataclass
class Cluster:
    """The flow's processes: one alone, or a Bytewax cluster on loopback."""
    procs: list[subprocess.Popen]
    metrics_port: int

    def done(self) -> float:
        """Events decoded plus DLQ records, summed over the processes that answer."""
        total = 0.0
        for index in range(len(self.procs)):
            counts = scrape(self.metrics_port + index)
            total += (counts.get('gatewatch_events_total{stage="decoded"}', 0)
                      + counts.get("gatewatch_dlq_records_total", 0))
        return total

    def running(self) -> bool:
        return any(proc.poll() is None for proc in self.procs)

    def kill(self, victim: int) -> None:
        """SIGKILL one process; its peers lose their connection to it and are stopped too,
        as a supervisor restarting the cluster would."""
        self.procs[victim].send_signal(signal.SIGKILL)
        self.procs[victim].wait()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def failed(self) -> bool:
        return any(proc.returncode != 0 for proc in self.procs)


def start_cluster(env: dict[str, str], log_path: Path, metrics_port: int, workers: int, processes: int,
                  recovery_dir: Path | None) -> Cluster:
    command = flow_command("ingest", workers, None if recovery_dir is None else Snapshots(recovery_dir))
    envs = [env]
    if processes > 1:
        addresses = addresses_for(processes, [services.free_port() for _ in range(processes)])
        envs = [process_env({**env, "GATEWATCH_METRICS__DUMP_PATH": counters_path_of(env["GATEWATCH_METRICS__DUMP_PATH"],
                                                                                     index)}, index, addresses)
                for index in range(processes)]
    with open(log_path, "ab") as log:
        procs = [subprocess.Popen(command, env=proc_env, stdout=log, stderr=subprocess.STDOUT) for proc_env in envs]
    return Cluster(procs, metrics_port)


def counters_path_of(path: str, index: int) -> str:
    return path if index == 0 else f"{path}.{index}"


def read_counters(path: Path, processes: int) -> dict[str, float]:
    """The counters the flow's processes dumped at exit: totals summed, quantiles the worst."""
    merged: dict[str, float] = {}
    for index in range(processes):
        for name, value in json.loads(Path(counters_path_of(str(path), index)).read_text()).items():
            merged[name] = max(merged.get(name, value), value) if name.startswith("freshness_") \
                else merged.get(name, 0) + value
    return merged


def run_flow(env: dict[str, str], log_path: Path, metrics_port: int, total: int, workers: int,
             recovery_dir: Path | None = None, kill_after_s: float | None = None,
             feed: Callable[[], object] | None = None, processes: int = 1, victim: int = 0,
             consuming: threading.Event | None = None) -> float:
    """Run the ingest flow (`processes` of them as a cluster) until it drains the topic, or
    SIGKILL process `victim` kill_after_s after it started consuming; return the seconds it
    ran. `feed`, if given, runs in a thread from the moment the flow's metrics answer, and is
    waited for; `consuming` is set once the flow has consumed something."""
    started = time.monotonic()
    consuming_since = None
    feeder = threading.Thread(target=feed) if feed else None
    last_done, progressed_at = -1.0, started
    cluster = start_cluster(env, log_path, metrics_port, workers, processes, recovery_dir)
    try:
        while cluster.running():
            time.sleep(0.25)
            if time.monotonic() - progressed_at > STALL_S:
                cluster.kill(0)
                tail = log_path.read_text(errors="replace").splitlines()[-30:]
                raise RuntimeError(f"the ingest flow made no progress for {STALL_S} s and was stopped:\n"
                                   + "\n".join(tail))
            try:
                done = cluster.done()
            except OSError:
                continue
            if feeder and feeder.ident is None:
                feeder.start()
            if done != last_done:
                last_done, progressed_at = done, time.monotonic()
            if done and consuming_since is None:
                consuming_since = time.monotonic()
                if consuming is not None:
                    consuming.set()
            if kill_after_s is not None and consuming_since and time.monotonic() - consuming_since >= kill_after_s:
                cluster.kill(victim)
                print(f"\nchaos: killed flow process {victim} of {processes} (pid {cluster.procs[victim].pid}) "
                      f"{kill_after_s:.1f} s into consuming", file=sys.stderr, flush=True)
                return time.monotonic() - started
            print(progress_line("ingest", min(done, total), total, started), end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        if cluster.failed():
            tail = log_path.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError("the ingest flow failed:\n" + "\n".join(tail))
        return time.monotonic() - started
    finally:
        for proc in cluster.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if consuming is not None:
            consuming.set()  # a flow that failed before consuming must not keep the feeder waiting
        if feeder and feeder.ident is not None:
            feeder.join()


def run_with_chaos(options: DemoOptions, env: dict[str, str], log_path: Path, bootstrap: str, topic: str,
                   messages, metrics_port: int, recovery_dir: Path) -> tuple[Expected, float]:
    """Kill the flow options.chaos times, each time while it consumes its own share of the
    events, produced as it runs, and resume it from recovery; then a last run drains the topic."""
    init_recovery(recovery_dir)
    rng = random.Random(options.seed)
    messages, expected = collect(messages)
    shares = [messages[len(messages) * run // options.chaos:len(messages) * (run + 1) // options.chaos]
              for run in range(options.chaos)]
    # A tenth of each share is there when the flow starts; the rest takes about 3 s to produce
    # from the moment it consumes, so a kill 0.2-3 s into consuming lands mid-stream (a flow
    # still loading its redactor would otherwise find the whole share waiting).
    rate = len(shares[0]) / 3.0
    started = time.monotonic()
    tail_env = {**env, "GATEWATCH_KAFKA__TAIL": "true"}
    failures: list[Exception] = []

    def feed(chunk: list, consuming: threading.Event) -> None:
        head = max(1, len(chunk) // 10)
        try:
            produce(bootstrap, topic, iter(chunk[:head]), head)
            consuming.wait(STALL_S)
            produce(bootstrap, topic, iter(chunk[head:]), len(chunk) - head, rate=rate)
        except Exception as exc:  # noqa: BLE001 - raised below, in the caller's thread
            failures.append(exc)

    for share in shares:
        consuming = threading.Event()
        run_flow(tail_env, log_path, metrics_port, options.events, options.workers, recovery_dir,
                 kill_after_s=rng.uniform(0.2, 3.0), feed=partial(feed, share, consuming), consuming=consuming,
                 processes=options.processes, victim=rng.randrange(options.processes))
        if failures:
            raise RuntimeError("producing the demo events failed") from failures[0]
    run_flow(env, log_path, metrics_port, options.events, options.workers, recovery_dir,
             processes=options.restart_processes or options.processes)
    return expected, time.monotonic() - started


def send_via_api(options: DemoOptions, bootstrap: str, root: Path, messages) -> tuple[Expected, dict]:
    """Start `gatewatch serve` with a key per org, send every generated message through it,
    and stop it (which flushes what it accepted to Kafka); return Expected and the counts."""
    messages, expected = collect(messages)
    server = api_feed.ServeProcess(root / "api", bootstrap, services.free_port())
    try:
        say(f"ingestion API {server.url}, log: {server.log_path}")
        json_keys, otlp_keys = api_feed.create_keys(server.keys_path, sorted({key.decode().split("/", 1)[0]
                                                                               for key, _value in messages}))
        started = time.monotonic()
        counts = api_feed.feed(server.url, messages, json_keys, otlp_keys, options.otlp_share, progress=lambda sent:
                               print(progress_line("api", sent, len(messages), started), end="", file=sys.stderr,
                                     flush=True))
        print(progress_line("api", len(messages), len(messages), started), file=sys.stderr, flush=True)
        server_counts = scrape_url(f"{server.url}/metrics")
    finally:
        server.stop()
    if server.proc.returncode not in (0, -signal.SIGTERM):
        raise RuntimeError(f"gatewatch serve exited with {server.proc.returncode}:\n{server.log_tail()}")
    server_accepted = sum(value for name, value in server_counts.items()
                          if name.startswith("gatewatch_api_events_total{") and 'outcome="accepted"' in name)
    return expected, {**counts.as_dict(), "server_accepted": int(server_accepted)}


def read_dlq(bootstrap: str, topic: str, dump_path: Path) -> list[dict]:
    """Every DLQ record on the topic, also written to dump_path as JSON lines."""
    records = [record for _p, _o, record in read_topic(bootstrap, topic, decode_dlq)]
    with open(dump_path, "w") as out:
        for record in records:
            original = record.get("original")
            out.write(json.dumps({**record, "original": original.hex() if original else None}, default=str) + "\n")
    return records


def billing_totals(bootstrap: str, topic: str, expected: Expected, settings: Settings) -> tuple[Decimal, Decimal]:
    """(billed, expected) USD: what a billing consumer keeping the highest version of every
    billing_id holds, and the same computed from the generated events alone."""
    events = [record for _p, _o, record in read_topic(bootstrap, topic, decode_billing_event)]
    billed = sum((Decimal(e["cost_usd"]) for e in latest_versions(events).values()), Decimal(0))
    window_ms = int(settings.windows.length_s * 1000)
    # Late events are billed too, each as an adjustment of its own event-time window.
    late_billed = settings.windows.late_policy != "dlq"
    owed = [*expected.window_totals(window_ms), *(expected.late_totals if late_billed else [])]
    want = sum((Decimal(billing_event(t, settings.pricing)["cost_usd"]) for t in owed), Decimal(0))
    return billed, want


def distinct_sources(records: list[dict]) -> int:
    """DLQ records are delivered at least once; one source message counts once. The API's
    records have no Kafka offset: their dlq_id (request id and item index) tells them apart."""
    return len({(r.get("topic"), r.get("partition"), r.get("offset"), r.get("stage"),
                 r.get("dlq_id") if r.get("offset") is None else None) for r in records})


def reconcile(expected: Expected, found: dict, chaos: bool) -> list[str]:
    """Every sink against the generated events. Late events are usage like any other: quota
    counters hold every valid token (unless late_policy=dlq sends late events to the DLQ)."""
    checks = [
        ("valid events in ClickHouse", expected.valid, found["clickhouse_rows"]),
        ("distinct events in Parquet", expected.valid, found["parquet_rows"]),
        ("DLQ records", found["expected_dlq"], found["dlq"]),
        ("tokens in Redis quota, users' months", found["expected_total_tokens"], found["quota_total_tokens"]),
        ("tokens in Redis quota, orgs' months", found["expected_total_tokens"], found["quota_org_tokens"]),
        ("tokens in ClickHouse", expected.tokens, found["clickhouse_tokens"]),
        ("reasoning tokens in ClickHouse (within output)", expected.reasoning_tokens,
         found["clickhouse_reasoning_tokens"]),
        ("billed USD", found["expected_total_usd"], found["billing_total_usd"]),
        # Events are priced one by one, windows as a whole: equal to the nano-dollar while
        # prices per million tokens have at most three decimals (all of the demo's).
        ("USD in ClickHouse aggregates", found["expected_total_usd"], found["clickhouse_usd"]),
        ("ClickHouse events without an audit row", 0, found["events_without_audit"]),
        ("audit log rows (one per unique event)", expected.valid, found["audit_log_rows"]),
    ]
    if not chaos:
        # Counters of a killed flow process die with it; only an uninterrupted run has them all.
        checks += [("duplicates dropped", expected.duplicates, found["duplicates_dropped"]),
                   ("unique events counted by the flow", expected.valid, found["valid"])]
    if found.get("api"):
        api = found["api"]
        checks += [("inputs the API rejected (400, rejected_count, OTLP partial_success)", expected.bad,
                    api["rejected"]),
                   ("events the API accepted", expected.produced - expected.bad, api["accepted"]),
                   ("events the API counted as accepted (its /metrics)", expected.produced - expected.bad,
                    api["server_accepted"])]
    return [f"{name}: expected {want}, found {got}" for name, want, got in checks if want != got]


def run(options: DemoOptions) -> tuple[dict, list[str], Expected]:
    """Run the demo; return what was found, what did not reconcile, and what was expected."""
    if options.via_api and options.chaos:
        raise ValueError("via_api and chaos cannot be combined: chaos produces to Kafka while the flow runs")
    root = Path(options.data_dir or tempfile.mkdtemp(prefix="gatewatch-demo-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    settings = Settings()
    started_services = []
    try:
        say(f"data directory: {root}")
        kafka = services.start_kafka(root / "kafka")
        started_services.append(kafka)
        redis_server = services.start_redis(root / "redis")
        started_services.append(redis_server)
        say(f"broker {kafka.address}, redis {redis_server.address}")
        k = settings.kafka
        topic = k.events_topic
        migrate_kafka(k.model_copy(update={"bootstrap": kafka.address, "partitions": options.partitions}))

        # Through the API, events travel as the JSON a gateway posts; to Kafka, as Avro of
        # their own schema version.
        codec = api_feed.JsonWire() if options.via_api else FleetWire(registry_from_settings(settings.schemas),
                                                                       settings.validation)
        messages = generate(codec, options.events, options.dup_ratio, options.bad_ratio, users=options.users,
                            seed=options.seed, late_ratio=options.late_ratio, keep_events=options.keep_events,
                            lateness_ms=int(settings.windows.allowed_lateness_s * 1000),
                            window_ms=int(settings.windows.length_s * 1000), v2_ratio=options.v2_ratio)
        metrics_port = options.metrics_port or services.free_port()
        counters_path = root / "flow-counters.json"
        clickhouse_url = f"chdb://{root / 'chdb'}"
        if refuses_chdb(max(options.processes, options.restart_processes or 1)):
            # The cluster's processes write one chdb through a host (the flows migrate it),
            # which outlives every process the chaos kills.
            chdb_host = start_host(clickhouse_url, root / "chdb-host.sock", root / "chdb-host.log")
            started_services.append(chdb_host)
            clickhouse_url = chdb_host.url
            say(f"clickhouse {clickhouse_url}: one chdb host for every process (a cluster cannot embed chdb, "
                "see ops/cluster.py)")
        env = {
            **os.environ,
            "GATEWATCH_KAFKA__BOOTSTRAP": kafka.address,
            "GATEWATCH_KAFKA__TAIL": "false",
            "GATEWATCH_PARQUET__ROOT": str(root / "raw"),
            "GATEWATCH_CLICKHOUSE__URL": clickhouse_url,
            "GATEWATCH_REDIS__URL": redis_server.address,
            "GATEWATCH_METRICS__PORT": str(metrics_port),
            "GATEWATCH_METRICS__DUMP_PATH": str(counters_path),
            "GATEWATCH_SINKS": ",".join(SINK_NAMES),
            "GATEWATCH_AUDIT__URL": f"sqlite:///{root / 'audit.sqlite3'}",
            "GATEWATCH_AUDIT__HASH_KEY_FILE": str(root / "audit-hash.key"),
        }
        say(f"ingest flow metrics: http://127.0.0.1:{metrics_port}/metrics, log: {root / 'flow.log'}")
        api_counts = None
        if options.chaos:
            expected, seconds = run_with_chaos(options, env, root / "flow.log", kafka.address, topic, messages,
                                               metrics_port, root / "recovery")
        else:
            if options.via_api:
                expected, api_counts = send_via_api(options, kafka.address, root, messages)
            else:
                expected, api_counts = produce(kafka.address, topic, messages, options.events), None
            seconds = run_flow(env, root / "flow.log", metrics_port, options.events, options.workers,
                               processes=options.processes)
        final_processes = (options.restart_processes or options.processes) if options.chaos else options.processes
        counters = read_counters(counters_path, final_processes)

        late_billed = settings.windows.late_policy != "dlq"
        dlq_records = read_dlq(kafka.address, k.dlq_topic, root / "dlq.jsonl")
        billed_usd, expected_usd = billing_totals(kafka.address, k.billing_topic, expected, settings)
        parquet = ParquetStore(str(root / "raw")).read()
        clickhouse = ClickHouse(clickhouse_url)
        # The aggregates, not the raw rows: they are what dashboards, status and invoices read.
        # A pre-21 server (Debian's 18.16) has no aggregates: read its raw rows.
        table, requests = ("events", "count()") if clickhouse.legacy else ("usage_daily", "sum(requests)")
        (ch_rows, ch_tokens, ch_usd, ch_reasoning), = clickhouse.rows(
            f"SELECT {requests}, sum(input_tokens + output_tokens + cache_read_tokens + cache_write_tokens), "
            f"toString(sum(cost_usd)), sum(reasoning_tokens) FROM {settings.clickhouse.database}.{table} FINAL")
        without_audit = clickhouse.events_without_audit()
        close_chdb()
        audit_log = open_store(f"sqlite:///{root / 'audit.sqlite3'}")
        audit_rows = audit_log.event_count()
        audit_log.close()
        quota = QuotaStore(redis_server.address)
        found = {
            "produced": expected.produced,
            "valid": int(counters.get("gatewatch_events_total{stage=unique}", 0)),
            "duplicates_dropped": int(counters.get("gatewatch_dedupe_drops_total", 0)),
            "dlq": distinct_sources(dlq_records),
            "late": expected.late,
            "parquet_files": len(ParquetStore(str(root / "raw")).files()),
            "parquet_rows": len(pc.unique(parquet.column("event_id"))) if parquet.num_rows else 0,
            "clickhouse_rows": int(ch_rows),
            "clickhouse_tokens": int(ch_tokens or 0),
            "clickhouse_reasoning_tokens": int(ch_reasoning or 0),
            "expected_reasoning_tokens": expected.reasoning_tokens,
            "clickhouse_usd": str(Decimal(ch_usd or 0).quantize(Decimal("0.000000001"))),
            "events_without_audit": without_audit,
            "audit_log_rows": audit_rows,
            # Every user's and org's month as enforcement reads it (base + day counters with month bases).
            "quota_total_tokens": quota.total_tokens("user"),
            "quota_org_tokens": quota.total_tokens("org"),
            "expected_total_tokens": expected.tokens if late_billed else expected.quota_tokens,
            "billing_total_usd": str(billed_usd),
            "expected_total_usd": str(expected_usd),
            "expected_valid": expected.valid,
            "expected_duplicates": expected.duplicates,
            "expected_bad": expected.bad,
            "expected_dlq": expected.bad + (0 if late_billed else expected.late),
            "dlq_reasons": _count_by(dlq_records, "code"),
            "freshness_p50_s": max((v for k, v in counters.items() if k.startswith("freshness_p50_s")), default=None),
            "freshness_p99_s": max((v for k, v in counters.items() if k.startswith("freshness_p99_s")), default=None),
            "chaos_kills": options.chaos,
            "processes": options.processes,
            "clickhouse_url": clickhouse_url,
            "flow_seconds": round(seconds, 2),
            "events_per_s": round(expected.produced / seconds, 1),
            "data_dir": str(root),
            "api": api_counts,
        }
        problems = reconcile(expected, found, chaos=bool(options.chaos))
        found["reconciled"] = not problems
        return found, problems, expected
    finally:
        for service in reversed(started_services):
            service.stop()


def _count_by(records: list[dict], key: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        counts[record[key]] = counts.get(record[key], 0) + 1
    return dict(sorted(counts.items()))


def api_summary(api: dict, expected_rejected: int) -> str:
    return (f"  via the API         {api['json_events']:>8} JSON events, {api['otlp_spans']} OTLP spans in "
            f"{api['requests']} requests; {api['rejected']} rejected (expected {expected_rejected}), "
            f"HTTP {api['statuses']}")


def human_summary(found: dict, problems: list[str]) -> str:
    lines = [
        "",
        "gatewatch demo summary",
        f"  produced            {found['produced']:>8}",
        f"  valid (unique)      {found['valid']:>8}   expected {found['expected_valid']}",
        f"  duplicates dropped  {found['duplicates_dropped']:>8}   expected {found['expected_duplicates']}",
        f"  DLQ records         {found['dlq']:>8}   expected {found['expected_dlq']}  {found['dlq_reasons']}",
        f"  Parquet rows        {found['parquet_rows']:>8}   in {found['parquet_files']} files",
        f"  ClickHouse requests {found['clickhouse_rows']:>8}   {found['clickhouse_tokens']} tokens,"
        f" {found['clickhouse_usd']} USD (usage aggregates)",
        f"  audit log rows      {found['audit_log_rows']:>8}   one per unique event",
        f"  quota tokens        {found['quota_total_tokens']:>8}   expected {found['expected_total_tokens']}"
        f" (of which late: {found['late']}); orgs' months {found['quota_org_tokens']}",
        f"  billed USD          {found['billing_total_usd']:>8}   expected {found['expected_total_usd']}",
        f"  freshness p50/p99   {found['freshness_p50_s']} s / {found['freshness_p99_s']} s"
        " (event time to queryable in ClickHouse and Redis)",
        f"  throughput          {found['events_per_s']:>8} events/s over {found['flow_seconds']} s (flow start to drained)",
        *([api_summary(found["api"], found["expected_bad"])] if found.get("api") else []),
        f"  reasoning tokens    {found['clickhouse_reasoning_tokens']:>8}   "
        f"expected {found['expected_reasoning_tokens']} (part of output tokens)",
        f"  data                {found['data_dir']}",
        "  RECONCILED" if not problems else "  NOT RECONCILED:\n    " + "\n    ".join(problems),
    ]
    return "\n".join(lines)
