"""`gatewatch bench state`: memory of the dedupe state per remembered event id, and
throughput of the dedupe + window operators in a real Bytewax flow for many active users."""

from __future__ import annotations

import json
import pickle
import random
import time
import tracemalloc
import uuid
from functools import partial

import bytewax.operators as op
import click
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflows.state import DedupeLogic, SeenIds, UserWindows, WindowLogic, bucket_of

BUCKETS = 256


def dedupe_bytes_per_key(keys: int) -> tuple[float, float]:
    """(resident bytes, snapshot bytes) per remembered org/event_id, the key string included
    (the flow builds it per event, so the state is what keeps it alive)."""
    ids = [str(uuid.uuid4()) for _ in range(keys)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    seen = SeenIds(horizon_s=7200)
    now = time.time()
    for i, event_id in enumerate(ids):
        seen.first(f"org-{i % 7:02d}/{event_id}", now)
    resident = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return resident / keys, len(pickle.dumps(seen.frozen())) / keys


def events_for(users: int, count: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    return [{"event_id": str(uuid.UUID(int=rng.getrandbits(128))), "org_id": f"org-{u % 7}", "user_id": f"user-{u}",
             "model": "gpt-4o", "event_time": now_ms + i, "input_tokens": 10, "output_tokens": 5,
             "cache_read_tokens": 0, "cache_write_tokens": 0}
            for i, u in enumerate(rng.randrange(users) for _ in range(count))]


def flow_events_per_s(events: list[dict]) -> tuple[float, int]:
    """Events/s through key -> dedupe -> windows (flushed at EOF) in Bytewax; windows emitted."""
    flow = Dataflow("bench_state")
    stream = op.input("in", flow, TestingSource(events, batch_size=1000))
    keyed = op.key_on("by_user", stream, lambda e: bucket_of(f"{e['org_id']}/{e['user_id']}", BUCKETS))
    seen = op.stateful_batch("dedupe", keyed, partial(DedupeLogic.build, 7200))
    unique = op.filter_map("first", seen, lambda item: item[1][1] if item[1][0] else None)
    rekeyed = op.key_on("by_user_again", unique, lambda e: bucket_of(f"{e['org_id']}/{e['user_id']}", BUCKETS))
    windows = op.stateful_batch("windows", rekeyed, partial(WindowLogic.build,
                                                            lambda: UserWindows(60_000, 3_600_000, "dlq"), 2, 3600))
    out: list = []
    op.output("out", op.key_rm("unkey", windows), TestingSink(out))
    started = time.perf_counter()
    run_main(flow)
    seconds = time.perf_counter() - started
    return len(events) / seconds, sum(len(totals) for kind, totals in out if kind == "totals")


@click.command("state")
@click.option("--events", default=200_000, show_default=True, type=click.IntRange(1000))
@click.option("--keys", default=200_000, show_default=True, type=click.IntRange(1000),
              help="Event ids remembered when measuring dedupe memory.")
def state(events: int, keys: int) -> None:
    """Dedupe bytes per key, and dedupe + window throughput for 10k and 100k active users."""
    resident, snapshot = dedupe_bytes_per_key(keys)
    click.echo(f"dedupe state: {resident:.0f} bytes/key resident, {snapshot:.0f} bytes/key in a snapshot "
               f"({keys:,} keys)")
    result = {"dedupe_bytes_per_key": round(resident, 1), "dedupe_snapshot_bytes_per_key": round(snapshot, 1)}
    click.echo(f"{'active users':>14}{'events':>10}{'events/s':>12}{'window totals':>15}")
    for users in (10_000, 100_000):
        rate, totals = flow_events_per_s(events_for(users, events))
        click.echo(f"{users:>14,}{events:>10,}{rate:>12,.0f}{totals:>15,}")
        result[f"window_events_per_s_{users}_users"] = round(rate)
    click.echo(json.dumps(result))
