"""`gatewatch bench producer`: what EventProducer's durable mode costs a gateway.

For each mode (default: librdkafka's memory; durable: the spool before send() returns;
durable+fsync: fsync before send() returns) the same events are sent to a local noida
broker from one thread: send() latency p50/p99/max, events/s accepted by send(), events/s
acknowledged by the broker (send loop + flush) and CPU time per event (all threads).
``--batch N`` measures send_many() of N events per call instead."""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import click

from connectors.producer import EventProducer
from ops.dev import services
from ops.dev.loadgen import make_event
from schemas.registry import LocalRegistry

MODES = {
    "default": {},
    "durable": {"durable": True},
    "durable+fsync": {"durable": True, "fsync_each_send": True},
}


def make_events(count: int, users: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    return [make_event(rng, now, users, 0.2)[0] for _ in range(count)]


def measure(bootstrap: str, topic: str, spool_dir: Path, events: list[dict], options: dict, batch: int = 1) -> dict:
    """One mode's send() latencies and rates (``batch`` > 1: send_many of that many events,
    latencies per call divided by ``batch``); the producer is closed afterwards."""
    latencies = []
    producer = EventProducer(bootstrap, topic, LocalRegistry(), spool_dir, **options)
    try:
        cpu_began, began = time.process_time(), time.perf_counter()
        for at in range(0, len(events), batch):
            chunk = events[at:at + batch]
            started = time.perf_counter()
            if batch == 1:
                producer.send(chunk[0])
            else:
                producer.send_many(chunk)
            latencies.append((time.perf_counter() - started) / len(chunk))
        sending = time.perf_counter() - began
        left = producer.flush(120)
        total = time.perf_counter() - began
        cpu = time.process_time() - cpu_began  # every thread of this process, librdkafka's too
    finally:
        producer.close(timeout=5)
    latencies.sort()
    return {
        "events": len(events),
        "batch": batch,
        "cpu_us_per_event": round(cpu / len(events) * 1e6, 1),
        "send_p50_us": round(statistics.median(latencies) * 1e6, 1),
        "send_p99_us": round(latencies[int(len(latencies) * 0.99)] * 1e6, 1),
        "send_max_ms": round(latencies[-1] * 1e3, 2),
        "sent_per_s": round(len(events) / sending),
        "acknowledged_per_s": round(len(events) / total) if left == 0 else None,
        "unacknowledged": left,
    }


@click.command("producer")
@click.option("--events", "count", default=20_000, show_default=True, type=click.IntRange(100),
              help="Events per mode.")
@click.option("--users", default=1000, show_default=True, type=click.IntRange(1))
@click.option("--modes", default=",".join(MODES), show_default=True, help="Comma-separated: " + ", ".join(MODES))
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1, 100_000),
              help="Events per call: 1 measures send(), more measure send_many().")
@click.option("--bootstrap", help="An existing broker (host:port); default: start a noida broker for the run.")
def producer(count: int, users: int, modes: str, batch: int, bootstrap: str | None) -> None:
    """send() latency and throughput of EventProducer, default vs durable mode."""
    chosen = [mode.strip() for mode in modes.split(",") if mode.strip()]
    unknown = [mode for mode in chosen if mode not in MODES]
    if unknown:
        raise click.BadParameter(f"unknown modes {unknown}; choose from {list(MODES)}", param_hint="--modes")
    events = make_events(count, users)
    with tempfile.TemporaryDirectory(prefix="bench-producer-") as scratch:
        root = Path(scratch)
        broker = None if bootstrap else services.start_kafka(root / "kafka")
        address = bootstrap or broker.address
        try:
            for mode in chosen:
                topic = f"bench-producer-{uuid.uuid4().hex[:8]}"
                services.create_topics(address, {topic: 3})
                click.echo(f"{mode}: sending {count} events ...", err=True)
                result = measure(address, topic, root / f"spool-{mode}", events, MODES[mode], batch)
                click.echo(json.dumps({"mode": mode, **result}))
        finally:
            if broker is not None:
                broker.stop()


if __name__ == "__main__":
    producer()
