"""`gatewatch bench api`: accepted events/s of `gatewatch serve`, per server core, for
batched JSON events and OTLP/protobuf GenAI spans, with a real HTTP load client (aiohttp in
a separate process) and the request latency percentiles. The last line is one JSON object.

"Per core" divides accepted events by the CPU seconds the server processes used during the
measured phase (from /proc), so the figure does not depend on how busy the machine is with
other work. The server's producer really delivers to a broker started for the bench (or
``--bootstrap``): when Kafka falls behind, the API answers 429 and the accepted rate shows it.
``server_thread_cpu_s`` splits that CPU by thread (the worker's event loop ``main``, its
Python producer thread, librdkafka's ``rdk:*`` and granian's Rust ``tokio-*`` threads), so
a cost that only shows under HTTP load can be placed.

``--in-process`` calls the ASGI app directly instead (no HTTP server, no load client): the
CPU seconds of this one process (request path, producer thread, librdkafka) per accepted
event, until the broker acknowledged every event. On a shared machine the load client and
the other tenants move the HTTP figures by ±30%; this one moves much less, so it is the
one to compare two versions of the code with.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from ops.bench.e2e import TICK, proc_usage
from ops.dev.loadgen import make_event

FORMATS = ("json", "otlp")
BODIES_PER_FORMAT = 16


def json_bodies(events_per_request: int, seed: int = 3) -> list[bytes]:
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    return [json.dumps([make_event(rng, now, 10_000, 0.1)[0] for _ in range(events_per_request)]).encode()
            for _ in range(BODIES_PER_FORMAT)]


def otlp_bodies(events_per_request: int, seed: int = 3) -> list[bytes]:
    """ExportTraceServiceRequests of GenAI chat spans as an instrumented OpenAI client makes them."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    rng = random.Random(seed)
    now_ns = time.time_ns()

    def kv(key, value):
        kind = "int_value" if isinstance(value, int) else "string_value"
        return KeyValue(key=key, value=AnyValue(**{kind: value}))

    bodies = []
    for _ in range(BODIES_PER_FORMAT):
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        resource_spans.resource.attributes.append(kv("service.name", "gateway"))
        spans = resource_spans.scope_spans.add().spans
        for _ in range(events_per_request):
            event, _pii = make_event(rng, now_ns // 1_000_000, 10_000, 0.1)
            span = spans.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8), name=f"chat {event['model']}",
                             start_time_unix_nano=now_ns - event["latency_ms"] * 1_000_000,
                             end_time_unix_nano=now_ns, kind=3)
            span.attributes.extend([
                kv("gen_ai.operation.name", "chat"), kv("gen_ai.provider.name", event["provider"]),
                kv("gen_ai.request.model", event["model"]), kv("gen_ai.response.model", event["model"]),
                kv("gen_ai.response.id", event["request_id"]), kv("user.id", event["user_id"]),
                kv("gen_ai.usage.input_tokens", event["input_tokens"] + event["cache_read_tokens"]),
                kv("gen_ai.usage.cache_read.input_tokens", event["cache_read_tokens"]),
                kv("gen_ai.usage.output_tokens", event["output_tokens"]),
                kv("gen_ai.input.messages", json.dumps([{"role": "user", "parts": [
                    {"type": "text", "content": event["prompt"] or ""}]}])),
                kv("gen_ai.output.messages", json.dumps([{"role": "assistant", "parts": [
                    {"type": "text", "content": event["response"] or ""}]}]))])
        bodies.append(request.SerializeToString())
    return bodies


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _load(url: str, key: str, content_type: str, bodies: list[bytes], events_per_request: int,
                concurrency: int, warmup_s: float, duration_s: float) -> dict:
    import aiohttp

    headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type}
    latencies: list[float] = []
    counts = {"requests": 0, "accepted": 0, "throttled": 0, "errors": 0}
    start = time.monotonic()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

    async def worker(session, offset: int) -> None:
        n = offset
        while (now := time.monotonic()) < stop_at:
            body = bodies[n % len(bodies)]
            n += 1
            async with session.post(url, data=body, headers=headers) as response:
                payload = await response.read()
                status = response.status
            if status == 429:
                await asyncio.sleep(float(response.headers.get("retry-after", "1")) / 10)
            if now < measure_from:
                continue
            latencies.append(time.monotonic() - now)
            counts["requests"] += 1
            if status == 200:
                counts["accepted"] += (json.loads(payload)["accepted"] if content_type.endswith("json")
                                       else events_per_request)
            elif status == 429:
                counts["throttled"] += 1
            else:
                counts["errors"] += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session, i) for i in range(concurrency)))
    return {**counts, "p50_ms": round(1000 * percentile(latencies, 0.5), 2) if latencies else None,
            "p99_ms": round(1000 * percentile(latencies, 0.99), 2) if latencies else None}


async def _asgi_post(app, path: str, headers: list, body: bytes):
    """One POST through the app's ASGI interface; its status and response body."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)
    await app({"type": "http", "method": "POST", "path": path, "headers": headers}, receive, send)
    return sent[0]["status"], sent[1]["body"]


def in_process(app, key: str, fmt: str, bodies: list[bytes], events_per_request: int, requests: int) -> dict:
    """CPU of this process per event accepted by ``app`` and acknowledged by the broker."""
    import gc

    path, content_type = (("/v1/events", "application/json") if fmt == "json"
                          else ("/v1/traces", "application/x-protobuf"))
    headers = [(b"authorization", f"Bearer {key}".encode()), (b"content-type", content_type.encode())]
    in_gc = {"seconds": 0.0, "since": 0.0}

    def on_gc(phase, _info):
        if phase == "start":
            in_gc["since"] = time.thread_time()
        else:
            in_gc["seconds"] += time.thread_time() - in_gc["since"]

    async def post_all(count: int) -> int:
        accepted = 0
        for n in range(count):
            status, payload = await _asgi_post(app, path, headers, bodies[n % len(bodies)])
            if status != 200:
                raise click.ClickException(f"{fmt} request answered {status}: {payload[:300]!r}")
            accepted += json.loads(payload)["accepted"] if fmt == "json" else events_per_request
        return accepted

    asyncio.run(post_all(2))  # warm-up
    app.producer.flush(60)
    gc.callbacks.append(on_gc)
    # This process only: the broker started for the bench is a child of it.
    cpu_before, threads_before = time.process_time(), _tree_threads(os.getpid(), children=False)
    try:
        accepted = asyncio.run(post_all(requests))
        unacknowledged = app.producer.flush(120)
    finally:
        gc.callbacks.remove(on_gc)
    cpu = time.process_time() - cpu_before
    return {"requests": requests, "accepted": accepted, "unacknowledged": unacknowledged,
            "thread_cpu_s": thread_cpu(threads_before, _tree_threads(os.getpid(), children=False)),
            "cpu_us_per_event": round(cpu / accepted * 1e6, 1), "gc_us_per_event": round(
                in_gc["seconds"] / accepted * 1e6, 1), "events_per_s_per_core": round(accepted / cpu)}


def _client(queue, *args) -> None:
    queue.put(asyncio.run(_load(*args)))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"serve exited with code {proc.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise click.ClickException(f"serve did not answer on {url} within {timeout_s:.0f} s")


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (granian's workers are child processes)."""
    total = proc_usage(pid)[0]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        for child in children.read_text().split():
            try:
                total += _tree_cpu(int(child))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return total


def _tree_threads(pid: int, role: str = "serve", children: bool = True) -> dict[tuple[str, int], tuple[str, float]]:
    """CPU seconds of every thread of a process tree: (process role, thread id) -> (thread
    name, seconds). Rust runtime threads (tokio), librdkafka's (rdk:...) and Python's own
    threads (named after the process) show where a server's CPU goes under load."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        tid = int(task.name)
        threads[(role, tid)] = ("main" if tid == pid else name, (int(fields[11]) + int(fields[12])) / TICK)
    listed = Path(f"/proc/{pid}/task/{pid}/children")
    if children and listed.exists():
        for child in listed.read_text().split():
            threads.update(_tree_threads(int(child), "worker"))
    return threads


def thread_cpu(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per ``role/thread name`` between two ``_tree_threads`` snapshots, busiest first
    (threads of one name, such as librdkafka's per-broker ones, are added up)."""
    spent: dict[str, float] = {}
    for key, (name, seconds) in after.items():
        used = seconds - before.get(key, (name, 0.0))[1]
        if used > 0:
            label = f"{key[0]}/{name}"
            spent[label] = spent.get(label, 0.0) + used
    return {label: round(seconds, 2) for label, seconds in sorted(spent.items(), key=lambda item: -item[1])}


def _bench_in_process(results: dict, env: dict, key: str, formats, events_per_request: int, requests: int) -> None:
    from ops.api import app_factory

    os.environ.update(env)  # app_factory reads the settings a server worker would get
    app = app_factory()
    app.start()
    try:
        for fmt in formats:
            click.echo(f"bench api in process: {fmt}, {requests} requests of {events_per_request} events ...",
                       err=True)
            bodies = json_bodies(events_per_request) if fmt == "json" else otlp_bodies(events_per_request)
            results[fmt] = in_process(app, key, fmt, bodies, events_per_request, requests)
            click.echo(f"  {fmt}: {results[fmt]['cpu_us_per_event']} us CPU per event "
                       f"({results[fmt]['events_per_s_per_core']:,} per core), "
                       f"{results[fmt]['gc_us_per_event']} us of it in GC", err=True)
    finally:
        app.stop()


@click.command("api")
@click.option("--format", "formats", type=click.Choice(FORMATS), multiple=True, help="Default: both.")
@click.option("--events-per-request", default=500, show_default=True, type=click.IntRange(1, 20_000))
@click.option("--concurrency", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="Requests in flight from the load client.")
@click.option("--duration", default=15.0, show_default=True, type=click.FloatRange(min=1), help="Measured seconds.")
@click.option("--warmup", default=2.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--server", type=click.Choice(("granian", "uvicorn")), default="granian", show_default=True)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="Server worker processes.")
@click.option("--broker", type=click.Choice(["tansu", "noida"]), default="tansu", show_default=True,
              help="Broker started for the bench (ignored with --bootstrap).")
@click.option("--bootstrap", help="Use this broker instead of starting one.")
@click.option("--keep", type=click.Path(file_okay=False), help="Keep the server's log and spool here.")
@click.option("--in-process", "requests_in_process", type=click.IntRange(1), default=None, metavar="REQUESTS",
              help="Call the app directly with this many requests per format (no HTTP): CPU per event.")
def api(formats, events_per_request, concurrency, duration, warmup, server, workers, broker, bootstrap, keep,
        requests_in_process) -> None:
    """Accepted events/s per server core and request latency of `gatewatch serve`."""
    from connectors.ingest_api.keys import ApiKeyStore
    from ops.dev import services

    formats = formats or FORMATS
    root = Path(keep or tempfile.mkdtemp(prefix="gatewatch-bench-api-"))
    root.mkdir(parents=True, exist_ok=True)
    kafka = None
    if not bootstrap:
        kafka = services.start_kafka(root / "kafka", kind=broker, die_with_parent=True)
        bootstrap = kafka.address
    topic = f"bench-api-{os.getpid()}"
    services.create_topics(bootstrap, {topic: 3})
    key, _ = ApiKeyStore(root / "keys.sqlite").create("bench-org")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GATEWATCH_KAFKA__BOOTSTRAP": bootstrap, "GATEWATCH_KAFKA__EVENTS_TOPIC": topic,
           "GATEWATCH_API__KEYS_PATH": str(root / "keys.sqlite"), "GATEWATCH_API__SPOOL_DIR": str(root / "spool"),
           "GATEWATCH_LOG_LEVEL": "WARNING"}
    results = {"server": server, "workers": workers, "events_per_request": events_per_request,
               "concurrency": concurrency, "duration_s": duration, "cpus": os.cpu_count(), "broker": bootstrap}
    if requests_in_process:
        results = {"mode": "in-process", "events_per_request": events_per_request, "cpus": os.cpu_count(),
                   "broker": bootstrap}
        try:
            _bench_in_process(results, env, key, formats, events_per_request, requests_in_process)
        finally:
            if kafka is not None:
                kafka.stop()
            if not keep:
                shutil.rmtree(root, ignore_errors=True)
        click.echo(json.dumps(results, sort_keys=True))
        return
    with open(root / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "serve", "--server", server, "--workers",
                                 str(workers), "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_healthy(url, proc)
        for fmt in formats:
            click.echo(f"bench api: {fmt}, {events_per_request} events/request, {concurrency} in flight, "
                       f"{warmup:g} s warm-up + {duration:g} s ...", err=True)
            bodies = json_bodies(events_per_request) if fmt == "json" else otlp_bodies(events_per_request)
            path, content_type = (("/v1/events", "application/json") if fmt == "json"
                                  else ("/v1/traces", "application/x-protobuf"))
            context = multiprocessing.get_context("spawn")
            queue = context.Queue()
            client = context.Process(target=_client, args=(queue, url + path, key, content_type, bodies,
                                                           events_per_request, concurrency, warmup, duration))
            client.start()
            time.sleep(warmup)
            cpu_before, threads_before, wall_before = _tree_cpu(proc.pid), _tree_threads(proc.pid), time.monotonic()
            measured = queue.get(timeout=warmup + duration + 120)
            cpu = _tree_cpu(proc.pid) - cpu_before
            threads = thread_cpu(threads_before, _tree_threads(proc.pid))
            wall = time.monotonic() - wall_before
            client.join(30)
            accepted = measured["accepted"]
            results[fmt] = {**measured, "events_per_s": round(accepted / duration),
                            "server_cpu_s": round(cpu, 2), "server_cores_busy": round(cpu / wall, 2),
                            "events_per_s_per_core": round(accepted / cpu) if cpu else None,
                            "body_bytes": len(bodies[0]), "server_thread_cpu_s": threads}
            click.echo(f"  {fmt}: {results[fmt]['events_per_s']:,} events/s accepted, "
                       f"{results[fmt]['events_per_s_per_core'] or 0:,} per server core, "
                       f"p50 {measured['p50_ms']} ms p99 {measured['p99_ms']} ms, "
                       f"{measured['throttled']} x 429, {measured['errors']} errors", err=True)
            click.echo("  server CPU by thread: " + ", ".join(f"{label} {seconds:g} s"
                                                             for label, seconds in list(threads.items())[:6]), err=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if kafka is not None:
            kafka.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    click.echo(json.dumps(results, sort_keys=True))
