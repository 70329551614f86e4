"""`gatewatch bench quota`: CPU per window total of the quota path, in this process and in
redis-server, and Redis memory per user.

With a realistic user mix (a million users, Zipf) a flush holds a window total for every one
or two events (0.7-0.8 totals per event at the brief's rates), so the cost per total is most
of the quota path's cost per event. The bench
does what the quota sink does with each flush (QuotaWriter): QuotaStore.apply (one Lua script
call per APPLY_CHUNK totals), then, with month bases, keep_month_bases for the batch's users. Three passes, in
flush-sized batches:
  first of day  each user's first window of the day: no month counter or base yet;
  new window    the next window of the same users: the common case at a million users,
                which the projection to the brief's rates uses;
  next flush    the same windows again, one event more each: their window records exist.
The aggregates (ClickHouse) answer that no user has earlier days this month: the bases are
written, their query is not measured. The table goes to stderr, one JSON object last on stdout."""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import click
import redis

from ops.bench import brief
from ops.bench.e2e import cpu_seconds
from ops.dev import services
from ops.dev.loadgen import MODELS
from ops.settings import Settings, WindowSettings
from sinks.quota import QuotaStore, keep_month_bases, periods, users_of_month

ORGS = 7
WINDOW_LENGTH_MS = 60_000
PROJECTED_RATES = (brief.EVENTS_PER_S, brief.PEAK_EVENTS_PER_S)
"""Events/s of the brief's scale; one window total per event."""
PROGRESS_EVERY_S = 2.0
PASSES = ("first_of_day", "new_window", "next_flush")
LABELS = {"first_of_day": "first of the day", "new_window": "new window", "next_flush": "next flush, same"}


@dataclass
class Cost:
    """What one step of a pass cost over its totals."""

    totals: int
    python_s: float
    redis_s: float | None
    wall_s: float

    def figures(self) -> dict:
        per_total = 1e6 / self.totals
        return {"python_us_per_total": round(self.python_s * per_total, 2),
                "redis_us_per_total": None if self.redis_s is None else round(self.redis_s * per_total, 2),
                "totals_per_s": round(self.totals / self.wall_s, 1)}

    def __add__(self, other: Cost) -> Cost:
        """Both steps over the same totals: what the flush costs."""
        redis_s = None if self.redis_s is None or other.redis_s is None else self.redis_s + other.redis_s
        return Cost(self.totals, self.python_s + other.python_s, redis_s, self.wall_s + other.wall_s)


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


def windows_spanned(count: int, users: int) -> int:
    """How many window starts window_totals(count, users, ...) uses."""
    return (math.ceil(count / users) - 1) // len(MODELS) + 1


def next_flush(totals: list[dict]) -> list[dict]:
    """The same windows one event later: running absolute totals, n and tokens grown."""
    return [{**total, "n": total["n"] + 1,
             **{kind: total[kind] + total[kind] // total["n"] for kind in ("input", "output", "cache_read")}}
            for total in totals]


def redis_cpu_s(pid: int | None) -> float | None:
    """CPU seconds of the server so far, or None when its pid is unknown (--redis-url)."""
    return None if pid is None else cpu_seconds(pid)


def in_batches(step: Callable[[list[dict]], object], totals: list[dict], batch: int, redis_pid: int | None,
               progress: Callable[[int, float], None]) -> Cost:
    """Run step over totals `batch` at a time (one flush each), timing this process's CPU,
    the server's (when its pid is known) and the wall clock."""
    redis_before = redis_cpu_s(redis_pid)
    python_before, wall_before = time.process_time(), time.perf_counter()
    last_report = wall_before
    for start in range(0, len(totals), batch):
        step(totals[start:start + batch])
        now = time.perf_counter()
        if now - last_report >= PROGRESS_EVERY_S:
            progress(min(start + batch, len(totals)), now - wall_before)
            last_report = now
    wall_s = time.perf_counter() - wall_before
    python_s = time.process_time() - python_before
    redis_s = None if redis_before is None else redis_cpu_s(redis_pid) - redis_before
    return Cost(len(totals), python_s, redis_s, wall_s)


def no_earlier_days(_who: list, _month: str, _cutoff: str) -> dict:
    """The aggregates' answer for users and orgs with no usage before the cutoff this month."""
    return {}


class QuotaSteps:
    """The quota sink's two steps per flush, counted: apply the totals, then (month bases)
    write the month bases the batch's users lack."""

    def __init__(self, store: QuotaStore):
        self.store = store
        self.changed = 0
        self.bases_written = 0

    def apply(self, totals: list[dict]) -> None:
        self.changed += self.store.apply(totals)

    def keep_bases(self, totals: list[dict]) -> None:
        users = users_of_month(totals, periods(int(self.store.clock() * 1000))[1])  # as QuotaWriter does
        self.bases_written += keep_month_bases(self.store, no_earlier_days, no_earlier_days, users)

    def flush(self, totals: list[dict]) -> None:
        self.apply(totals)
        if self.store.month_bases:
            self.keep_bases(totals)


def measured_pass(steps: QuotaSteps, totals: list[dict], batch: int, redis_pid: int | None,
                  progress: Callable[[str, int, float], None]) -> dict:
    """Figures of a pass: the whole flush per total, and its apply and (month bases) bases
    steps, each timed on its own over all the batches. Per user the order is the flow's
    (apply, then its base); a user with several totals in a pass meets its base sooner in
    the flow than here."""
    changed_before, written_before = steps.changed, steps.bases_written
    apply = in_batches(steps.apply, totals, batch, redis_pid, partial(progress, "apply"))
    figures = {"totals": len(totals), "changed": steps.changed - changed_before}
    if not steps.store.month_bases:
        return {**figures, **apply.figures()}
    bases = in_batches(steps.keep_bases, totals, batch, redis_pid, partial(progress, "month bases"))
    return {**figures, **(apply + bases).figures(), "apply": apply.figures(),
            "bases": {**bases.figures(), "written": steps.bases_written - written_before}}


def projection(python_us: float, redis_us: float | None, bytes_per_window: float, record_life_s: int,
               rates=PROJECTED_RATES) -> dict:
    """At each rate, one new window per event: the cores of Python and of Redis, and the window
    records alive (each lives record_life_s) with their Redis memory: an upper bound, since a
    busy user's events in one window share its record."""
    return {str(rate): {"python_cores": round(python_us * rate / 1e6, 3),
                        "redis_cores": None if redis_us is None else round(redis_us * rate / 1e6, 3),
                        "window_records": rate * record_life_s,
                        "redis_gib_window_records": round(rate * record_life_s * bytes_per_window / 2**30, 3)}
            for rate in rates}


def window_record_life_s(windows: WindowSettings) -> int:
    """How long the flow has a window's record kept: twice its horizon (quota_writer in
    dataflows.outputs), so the bench's records and memory are the flow's."""
    return int(2 * (windows.allowed_lateness_s + windows.length_s + windows.flush_interval_s))


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def run_bench(url: str, redis_pid: int | None, totals: int, users: int, batch: int, month_bases: bool,
              progress_to: Callable[[str], None]) -> dict:
    settings = Settings()
    record_life_s = window_record_life_s(settings.windows)
    # Configured as the flow's quota sink: its tiers (limits checked per total), thresholds, record life.
    store = QuotaStore(url, settings.quota.default_tier, tuple(settings.quota.alert_thresholds),
                       window_ttl_s=record_life_s, month_bases=month_bases)
    store.publish_tiers(settings.quota.tiers)
    steps = QuotaSteps(store)
    client = redis.Redis.from_url(url)
    window_start_ms = int(time.time() * 1000) // WINDOW_LENGTH_MS * WINDOW_LENGTH_MS
    # Users of its own, after the measured ones: the scripts are loaded and the connection
    # open before the clock starts, and nothing of the measured users exists yet.
    warmup = window_totals(batch, batch, window_start_ms, first_user=users)
    steps.flush(warmup)
    memory_start = used_memory(client)
    first_of_day = window_totals(users, users, window_start_ms - windows_spanned(totals, users) * WINDOW_LENGTH_MS)
    new_window = window_totals(totals, users, window_start_ms)
    passes = {"first_of_day": first_of_day, "new_window": new_window, "next_flush": next_flush(new_window)}
    result = {"totals": totals, "users": users, "batch": batch, "month_bases": month_bases,
              "day_of_month": time.gmtime(window_start_ms / 1000).tm_mday, "redis_cpu_measured": redis_pid is not None}
    memory = {}
    for name, pass_totals in passes.items():
        def progress(step: str, done: int, seconds: float, name=name, count=len(pass_totals)) -> None:
            progress_to(f"{LABELS[name]}, {step}: {done:,}/{count:,} totals, {done / seconds:,.0f} totals/s")
        result[name] = measured_pass(steps, pass_totals, batch, redis_pid, progress)
        memory[name] = used_memory(client)
    per_user = (memory["first_of_day"] - memory_start) / users
    headline = result["new_window"]
    result.update({key: headline[key] for key in ("python_us_per_total", "redis_us_per_total", "totals_per_s")},
                  redis_used_memory_bytes=memory["next_flush"], redis_bytes_per_user=round(per_user, 1),
                  redis_bytes_per_window=round((memory["new_window"] - memory["first_of_day"]) / totals, 1),
                  redis_gib_per_million_users=round(per_user * brief.USERS / 2**30, 3),
                  requests_applied=sum(t["n"] for t in (*warmup, *first_of_day, *passes["next_flush"])),
                  bases_written=steps.bases_written, window_record_life_s=record_life_s)
    result["projection"] = projection(result["python_us_per_total"], result["redis_us_per_total"],
                                      result["redis_bytes_per_window"], record_life_s)
    return result


def refuse_a_database_in_use(url: str) -> None:
    """The bench writes quota counters and the tiers: into a database that holds keys it would
    mix its counters with others' (and skip windows a previous run recorded)."""
    keys = redis.Redis.from_url(url, socket_connect_timeout=5).dbsize()
    if keys:
        raise click.UsageError(f"--redis-url: the database holds {keys:,} keys; the bench writes quota counters "
                               "and tiers there: give it an empty database (e.g. another /N of the server)")


def render(result: dict) -> str:
    def row(label: str, figures: dict) -> str:
        redis_us = figures["redis_us_per_total"]
        return (f"  {label:<32}{figures['python_us_per_total']:>10.1f}"
                f"{'n/a' if redis_us is None else format(redis_us, '.1f'):>10}{figures['totals_per_s']:>10,.0f}")

    lines = [f"{result['totals']:,} window totals of {result['users']:,} users in batches of {result['batch']:,}, "
             f"month bases {'on' if result['month_bases'] else 'off'}, day {result['day_of_month']} of the month",
             f"  {'pass (per window total)':<32}{'python µs':>10}{'redis µs':>10}{'totals/s':>10}"]
    for name in PASSES:
        figures = result[name]
        lines.append(row(f"{LABELS[name]} ({figures['totals']:,})", figures))
        if "bases" in figures:
            lines.append(row("  apply", figures["apply"]))
            lines.append(row(f"  month bases ({figures['bases']['written']:,} written)", figures["bases"]))
    for rate, cores in result["projection"].items():
        redis_cores = cores["redis_cores"]
        lines.append(f"  at {int(rate):,} events/s, new windows: {cores['python_cores']:.2f} Python cores, "
                     f"{'n/a' if redis_cores is None else format(redis_cores, '.2f')} Redis cores, "
                     f"{cores['window_records']:,} window records alive ({result['window_record_life_s']} s each): "
                     f"{cores['redis_gib_window_records']:.2f} GiB at most")
    lines.append(f"  redis used_memory {result['redis_used_memory_bytes'] / 2**20:,.1f} MiB; "
                 f"{result['redis_bytes_per_user']:,.0f} bytes per user (its counters, first window"
                 f"{', base' if result['month_bases'] else ''}) -> {result['redis_gib_per_million_users']:.2f} GiB "
                 f"for {brief.USERS:,} users; {result['redis_bytes_per_window']:,.0f} bytes per further window")
    if not result["redis_cpu_measured"]:
        lines.append("  redis CPU not measured: --redis-url names a server this bench did not start "
                     "(its process is not ours to read); Python only")
    return "\n".join(lines)


@click.command("quota")
@click.option("--totals", default=20_000, show_default=True, type=click.IntRange(1),
              help="Window totals per pass of new windows and of their next flush.")
@click.option("--users", default=20_000, show_default=True, type=click.IntRange(1),
              help="Distinct users (the first pass applies one window of each).")
@click.option("--batch", default=2_000, show_default=True, type=click.IntRange(1),
              help="Totals per flush (QuotaStore.apply): what one flush of the flow holds.")
@click.option("--month-bases/--no-month-bases", default=True, show_default=True,
              help="The quota store's month mode (the flow's default: on).")
@click.option("--redis-url", default=None,
              help="Use this Redis database, which must be empty, instead of starting a server (the "
                   "server's CPU is then not measured). The bench leaves its quota keys there.")
def quota(totals: int, users: int, batch: int, month_bases: bool, redis_url: str | None) -> None:
    """Python and redis-server CPU per window total of the quota sink's flush (QuotaStore.apply,
    then the month bases its users lack) for each user's first window of the day, for new
    windows and for the next flush of the same windows; the cores new windows take at 1,000
    and 5,000 events/s; Redis memory per user, projected to a million users."""
    def progress_to(line: str) -> None:
        click.echo(line, err=True)

    if redis_url:
        refuse_a_database_in_use(redis_url)
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
