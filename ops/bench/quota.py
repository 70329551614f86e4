"""`gatewatch bench quota`: CPU per window total of the quota path (QuotaStore.apply, one Lua
script per total in Redis), in this process and in redis-server, and Redis memory per user.

With a realistic user mix (a million users, Zipf) almost every event becomes a window total
of its own per flush, so the cost per total is the quota path's cost per event. The bench
applies distinct totals in flush-sized batches (first pass: new windows), then the same
totals again with one more event each (second pass: the next flush of the same windows,
whose records exist), and projects the cores the brief's rates take. The table goes to
stderr, one JSON object last on stdout."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import redis

from ops.bench.e2e import proc_usage
from ops.dev import services
from ops.dev.loadgen import MODELS
from sinks.quota import QuotaStore

ORGS = 7
WINDOW_LENGTH_MS = 60_000
PROJECTED_RATES = (1_000, 5_000)
"""Events/s of the brief's scale; one window total per event."""
PROJECTED_USERS = 1_000_000
PROGRESS_EVERY_S = 2.0


@dataclass
class PassCost:
    """What applying one pass of totals cost."""

    totals: int
    changed: int
    python_s: float
    redis_s: float | None
    wall_s: float

    def figures(self) -> dict:
        per_total = 1e6 / self.totals
        return {"totals": self.totals, "changed": self.changed,
                "python_us_per_total": round(self.python_s * per_total, 2),
                "redis_us_per_total": None if self.redis_s is None else round(self.redis_s * per_total, 2),
                "totals_per_s": round(self.totals / self.wall_s, 1)}


def window_totals(count: int, users: int, window_start_ms: int, events: int = 1, first_user: int = 0) -> list[dict]:
    """`count` window totals of distinct (user, model, window), each covering `events` events.

    Total i goes to user first_user + i % users (org = user % 7); past the users, the next
    rounds take each user's other models, then the windows before: no two totals share a
    window record, so every one of them is counted."""
    totals = []
    for i in range(count):
        round_, offset = divmod(i, users)
        user = first_user + offset
        totals.append({"org_id": f"org-{user % ORGS:02d}", "user_id": f"user-{user:07d}",
                       "model": MODELS[(user + round_) % len(MODELS)][1],
                       "window_start_ms": window_start_ms - (round_ // len(MODELS)) * WINDOW_LENGTH_MS,
                       "window_length_ms": WINDOW_LENGTH_MS, "n": events,
                       "input": events * (200 + user % 800), "output": events * (50 + user % 400),
                       "cache_read": events * (user % 3) * 100, "cache_write": 0})
    return totals


def next_flush(totals: list[dict]) -> list[dict]:
    """The same windows one event later: running absolute totals, n and tokens grown."""
    return [{**total, "n": total["n"] + 1,
             **{kind: total[kind] + total[kind] // total["n"] for kind in ("input", "output", "cache_read")}}
            for total in totals]


def redis_cpu_s(pid: int | None) -> float | None:
    return None if pid is None else proc_usage(pid)[0]


def apply_in_batches(store: QuotaStore, totals: list[dict], batch: int, redis_pid: int | None,
                     progress: Callable[[int, float], None]) -> PassCost:
    """Apply totals `batch` at a time (one flush each), timing this process's CPU, the
    server's (when its pid is known) and the wall clock."""
    changed = 0
    redis_before = redis_cpu_s(redis_pid)
    python_before, wall_before = time.process_time(), time.perf_counter()
    last_report = wall_before
    for start in range(0, len(totals), batch):
        changed += store.apply(totals[start:start + batch])
        now = time.perf_counter()
        if now - last_report >= PROGRESS_EVERY_S:
            progress(min(start + batch, len(totals)), now - wall_before)
            last_report = now
    wall_s = time.perf_counter() - wall_before
    python_s = time.process_time() - python_before
    redis_after = redis_cpu_s(redis_pid)
    redis_s = None if redis_before is None else redis_after - redis_before
    return PassCost(len(totals), changed, python_s, redis_s, wall_s)


def projection(python_us: float, redis_us: float | None, rates=PROJECTED_RATES) -> dict:
    """Cores of Python and of Redis at each rate, one window total per event."""
    return {str(rate): {"python_cores": round(python_us * rate / 1e6, 3),
                        "redis_cores": None if redis_us is None else round(redis_us * rate / 1e6, 3)}
            for rate in rates}


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def run_bench(url: str, redis_pid: int | None, totals: int, users: int, batch: int, month_bases: bool,
              progress_to: Callable[[str], None]) -> dict:
    store = QuotaStore(url, month_bases=month_bases)
    client = redis.Redis.from_url(url)
    window_start_ms = int(time.time() * 1000) // WINDOW_LENGTH_MS * WINDOW_LENGTH_MS
    # Its own users after the measured ones: the measured windows are all new, and the script
    # is loaded and the connection open before the clock starts.
    warmup = window_totals(min(batch, totals), batch, window_start_ms, first_user=users)
    store.apply(warmup)
    memory_before = used_memory(client)
    first = window_totals(totals, users, window_start_ms)
    second = next_flush(first)
    costs = {}
    for name, pass_totals in (("first", first), ("second", second)):
        def progress(done: int, seconds: float, name=name) -> None:
            progress_to(f"{name} pass: {done:,}/{totals:,} totals, {done / seconds:,.0f} totals/s")
        costs[name] = apply_in_batches(store, pass_totals, batch, redis_pid, progress)
    memory_after = used_memory(client)
    distinct_users = min(users, totals)
    per_user = (memory_after - memory_before) / distinct_users
    result = {"totals": totals, "users": users, "batch": batch, "month_bases": month_bases,
              "day_of_month": time.gmtime(window_start_ms / 1000).tm_mday,
              "redis_cpu_measured": redis_pid is not None,
              **costs["first"].figures(), "next_flush": costs["second"].figures(),
              "redis_used_memory_bytes": memory_after,
              "redis_bytes_per_user": round(per_user, 1),
              "redis_gib_per_million_users": round(per_user * PROJECTED_USERS / 2**30, 3),
              "requests_applied": sum(t["n"] for t in warmup) + sum(t["n"] for t in second)}
    result["projection"] = projection(result["python_us_per_total"], result["redis_us_per_total"])
    return result


def render(result: dict) -> str:
    def cell(value: float | None, width: int, spec: str) -> str:
        return f"{'n/a':>{width}}" if value is None else f"{value:>{width}{spec}}"

    rates = [str(rate) for rate in PROJECTED_RATES]
    lines = [f"{result['totals']:,} window totals of {min(result['users'], result['totals']):,} users in batches of "
             f"{result['batch']:,}, month bases {'on' if result['month_bases'] else 'off'}, "
             f"day {result['day_of_month']} of the month",
             f"  {'pass':<28}{'python µs':>10}{'redis µs':>10}{'totals/s':>10}"]
    for label, figures in (("first (new windows)", result), ("second (next flush, same)", result["next_flush"])):
        lines.append(f"  {label:<28}{figures['python_us_per_total']:>10.1f}"
                     f"{cell(figures['redis_us_per_total'], 10, '.1f')}{figures['totals_per_s']:>10,.0f}")
    for rate in rates:
        cores = result["projection"][rate]
        lines.append(f"  at {int(rate):,} events/s (one total per event): {cores['python_cores']:.2f} Python cores, "
                     f"{'n/a' if cores['redis_cores'] is None else format(cores['redis_cores'], '.2f')} Redis cores")
    lines.append(f"  redis used_memory {result['redis_used_memory_bytes'] / 2**20:,.1f} MiB, "
                 f"{result['redis_bytes_per_user']:,.0f} bytes per user -> "
                 f"{result['redis_gib_per_million_users']:.2f} GiB for {PROJECTED_USERS:,} users")
    if not result["redis_cpu_measured"]:
        lines.append("  redis CPU not measured: --redis-url names a server this bench did not start "
                     "(its process is not ours to read); Python only")
    return "\n".join(lines)


@click.command("quota")
@click.option("--totals", default=20_000, show_default=True, type=click.IntRange(1),
              help="Window totals applied per pass.")
@click.option("--users", default=20_000, show_default=True, type=click.IntRange(1), help="Distinct users.")
@click.option("--batch", default=2_000, show_default=True, type=click.IntRange(1),
              help="Totals per QuotaStore.apply: what one flush of the flow holds.")
@click.option("--month-bases/--no-month-bases", default=True, show_default=True,
              help="The quota store's month mode (the flow's default: on).")
@click.option("--redis-url", default=None,
              help="Use this Redis instead of starting one (its CPU is then not measured). "
                   "The bench writes quota keys there.")
def quota(totals: int, users: int, batch: int, month_bases: bool, redis_url: str | None) -> None:
    """Python and redis-server CPU per window total through QuotaStore.apply, for new windows
    and for the next flush of the same windows, projected to 1,000 and 5,000 events/s; and
    Redis memory per user, projected to a million users."""
    def progress_to(line: str) -> None:
        click.echo(line, err=True)

    if redis_url:
        result = run_bench(redis_url, None, totals, users, batch, month_bases, progress_to)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-quota-") as root:
            server = services.start_redis(Path(root) / "redis", die_with_parent=True)
            try:
                result = run_bench(server.address, server.pid, totals, users, batch, month_bases, progress_to)
            finally:
                server.stop()
    click.echo(render(result), err=True)
    click.echo(json.dumps(result))
