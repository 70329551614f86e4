"""`gatewatch bench tracing`: the CPU the pipeline's own OpenTelemetry spans cost per event.

The same batches of loadgen events (schema v2: every one carries a gateway trace context)
go through what the ingest flow wraps in spans per batch: two batch steps (decode, redact)
and two sink writes (parquet, clickhouse), the wrapped work itself doing nothing, so only
the spans are measured. First with tracing off (the API's no-op provider: what every
deployment without `tracing.otlp_endpoint` pays), then with the SDK installed by
``ops.tracing`` exporting OTLP/HTTP to a local receiver that discards the bodies, sampling
``--sample-ratio`` of the batches (1: the worst case), flushed before the clock stops. CPU time of the whole process
(the exporter's thread included). The last line is one JSON object."""

from __future__ import annotations

import gc
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import click

from ops.dev.loadgen import make_event
from ops.launch import YOUNG_GENERATION
from ops.settings import TracingSettings
from ops.tracing import install_tracing
from sinks.tracing import MAX_LINKS, TracedStep, write_span

STAGES = ("decode", "redact")
STORES = ("parquet", "clickhouse")


def traced_events(count: int, seed: int = 16) -> list[dict]:
    rng = random.Random(seed)
    return [make_event(rng, 1_795_000_000_000, 1000, 0.0, v2_ratio=1.0)[0] for _ in range(count)]


def one_pass(events: list[dict], batch: int) -> None:
    """Every batch through the spans of the ingest flow's stages and sinks."""
    steps = [TracedStep(stage, lambda items: [("ok", item) for item in items]) for stage in STAGES]
    for start in range(0, len(events), batch):
        items = events[start:start + batch]
        for step in steps:
            step(items)
        for worker, store in enumerate(STORES):
            with write_span(store, worker, [(store, items)]):
                pass


def cpu_seconds(events: list[dict], batch: int, repeat: int, flush=lambda: None) -> float:
    """Best process CPU seconds of ``repeat`` passes (each one flushed)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        one_pass(events, batch)
        flush()
        best = min(best, time.process_time() - started)
    return best


class _Discard(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@click.command("tracing")
@click.option("--events", default=100_000, show_default=True, type=click.IntRange(1000))
@click.option("--batch", default=1000, show_default=True, type=click.IntRange(1),
              help="Events per batch (kafka.batch_size's default).")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1), help="Best of this many runs.")
@click.option("--sample-ratio", default=1.0, show_default=True, type=click.FloatRange(0, 1),
              help="tracing.sample_ratio: share of batch spans recorded.")
def tracing(events, batch, repeat, sample_ratio) -> None:
    """CPU µs per event of the pipeline's spans, tracing off vs on (OTLP/HTTP)."""
    sample = traced_events(events)
    gc.set_threshold(YOUNG_GENERATION, 20, 10)  # as a flow process runs (ops.launch.settle_heap)
    off = cpu_seconds(sample, batch, repeat)
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Discard)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
        provider = install_tracing(TracingSettings(otlp_endpoint=endpoint, sample_ratio=sample_ratio), "bench")
        on = cpu_seconds(sample, batch, repeat, flush=provider.force_flush)
        provider.shutdown()
    finally:
        receiver.shutdown()
        receiver.server_close()
    spans = len(range(0, events, batch)) * (len(STAGES) + len(STORES))
    result = {"events": events, "batch": batch, "sample_ratio": sample_ratio, "spans_per_pass": spans,
              "cpu_us_per_event_off": round(off / events * 1e6, 3), "cpu_us_per_event_on": round(on / events * 1e6, 3),
              "cpu_us_per_event_added": round((on - off) / events * 1e6, 3),
              "cpu_us_per_span_on": round(on / spans * 1e6, 1)}
    click.echo(f"tracing off: {result['cpu_us_per_event_off']} CPU µs/event; on (sample ratio {sample_ratio:g}, "
               f"{len(STAGES) + len(STORES)} spans of <={MAX_LINKS} links per {batch} events): "
               f"{result['cpu_us_per_event_on']} CPU µs/event", err=True)
    click.echo(json.dumps(result))
