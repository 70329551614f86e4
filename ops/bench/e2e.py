"""`gatewatch bench e2e`: the ingest flow against real local servers under `gatewatch loadgen`
traffic: sustained events/s, consumer lag over time, freshness p50/p99, peak RSS per
process and CPU seconds per 1,000 events. The last line is one JSON object.

With --backlog N the topic is filled first and the flow then drains it with nothing else
running, which isolates the flow's own cost per event from the producer's.

With --clickhouse server the flow processes write to one local clickhouse-server over the
native protocol (as a deployment does) instead of each embedding chdb; the server's CPU is
reported on its own and in the total, since it runs on the same cores.

With --clickhouse chdb-host (the default for several processes, as in `gatewatch demo
--processes N`) one chdb host process (ops/chdb_host.py) owns the one database and every
flow process writes through it (chdb+unix://): the flows' chdb work moved out of them, so
its CPU is counted in the flow's CPU per event (and shown on its own line, with its
threads), and its peak RSS is reported next to the flows'. With --clickhouse chdb each
process embeds a database of its own."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import click

from ops.chdb_host import RunningHost, start_host
from ops.dev import services
from ops.dev.loadgen import USER_MIXES
from ops.launch import ENTRY_POINTS, flow_command, process_env
from ops.migrate import migrate_kafka
from ops.settings import Settings, load_settings
from ops.status import Snapshot, merge, parse, quantile

TICK = os.sysconf("SC_CLK_TCK")
FRESHNESS_SINKS = ("clickhouse", "quota")
DRAIN_POLL_S = 1.0


def proc_usage(pid: int) -> tuple[float, float, float]:
    """(CPU seconds, resident MB, peak resident MB) of a process, from /proc. The peak is the
    kernel's high-water mark (VmHWM): a sample of VmRSS once a second misses short spikes
    (a batch written, a table concatenated), and the target is on the peak."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK
    with open(f"/proc/{pid}/status") as handle:
        status = dict(line.split(":", 1) for line in handle if line.startswith(("VmRSS:", "VmHWM:")))
    rss_kb, peak_kb = (int(status[key].split()[0]) for key in ("VmRSS", "VmHWM"))
    return cpu, rss_kb / 1024, peak_kb / 1024


SCHEDSTAT = Path("/proc/self/schedstat").exists()


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a process's threads so far: the scheduler's nanoseconds
    (/proc/PID/task/*/schedstat) when the kernel keeps them, else proc_usage's clock ticks
    (10 ms), coarse for a server that works a few milliseconds in a small run."""
    if not SCHEDSTAT:
        return proc_usage(pid)[0]
    nanoseconds = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            nanoseconds += int((task / "schedstat").read_text().split()[0])
        except FileNotFoundError:  # a thread that ended between the listing and the read
            continue
    return nanoseconds / 1e9


def thread_figures(at_start: dict[str, float], at_end: dict[str, float], events: float) -> dict[str, float]:
    """µs per event of each thread name between two threads_cpu readings, largest first
    (names under 0.05 µs left out)."""
    spent = {name: cpu - at_start.get(name, 0.0) for name, cpu in at_end.items()}
    return {name: round(cpu / events * 1e6, 1) for name, cpu in sorted(spent.items(), key=lambda kv: -kv[1])
            if cpu >= events * 5e-8}


def threads_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of the processes' threads, summed by thread name without its digits
    (``rdk:broker3`` -> ``rdk:broker``; chdb's ``ThreadPool``, ``MergeMutate``...): which threads
    besides the flow's worker take the CPU. A thread that ended is no longer counted."""
    by_name: dict[str, float] = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                spent = int((task / "schedstat").read_text().split()[0]) / 1e9 if SCHEDSTAT else \
                    sum(map(int, (task / "stat").read_text().rsplit(")", 1)[1].split()[11:13])) / TICK
            except (FileNotFoundError, ProcessLookupError):
                continue
            key = re.sub(r"\d+", "", name).strip("-_ ") or name
            by_name[key] = by_name.get(key, 0.0) + spent
    return by_name


def maps_chdb(pid: int) -> bool:
    """Whether chdb's library is mapped into the process (/proc/PID/maps): a flow writing to a
    ClickHouse server must never load it (its code alone is ~230 MB of each process's RSS)."""
    with open(f"/proc/{pid}/maps") as handle:
        return any("chdb" in line.rsplit("/", 1)[-1] for line in handle if "/" in line)


def consumed(snap: Snapshot) -> float:
    """Messages the flow has taken off the topic: decoded ones and undecodable ones."""
    decoded = snap.counters.get(("gatewatch_events", (("stage", "decoded"),)), 0)
    undecodable = sum(v for (name, labels), v in snap.counters.items()
                      if name == "gatewatch_dlq_records" and ("stage", "decode") in labels)
    return decoded + undecodable


def clickhouse_rows(snap: Snapshot) -> float:
    """Rows the flow's ClickHouse sink has written (the events table)."""
    return snap.counters.get(("gatewatch_sink_rows", (("sink", "clickhouse"),)), 0)


def aggregate_refreshes(snap: Snapshot) -> tuple[float, float]:
    """Aggregate refreshes that recomputed keys so far, and how many keys in all
    (sinks.metrics.observe_refresh): at many users, the refresh's keys cost more than the events."""
    refreshes = dict(snap.buckets.get(("gatewatch_aggregate_refresh_seconds", ()), [])).get(float("inf"), 0)
    return refreshes, snap.counters.get(("gatewatch_aggregate_keys", ()), 0)


def full_gc_collections(snap: Snapshot) -> float:
    """Full (generation 2) collections of CPython's cyclic GC, from prometheus_client's own
    metrics: each walks every tracked object of the flow, the largest overhead per event."""
    return snap.counters.get(("python_gc_collections", (("generation", "2"),)), 0)


def freshness_delta(before: Snapshot, after: Snapshot, q: float) -> float | None:
    """The q-quantile of freshness observed between two snapshots, worst of the sinks."""
    return max((value for value in freshness_by_sink(before, after, q).values() if value is not None), default=None)


def freshness_by_sink(before: Snapshot, after: Snapshot, q: float) -> dict[str, float | None]:
    """The q-quantile of freshness observed between two snapshots, per sink."""
    quantiles = {}
    for sink in FRESHNESS_SINKS:
        key = ("gatewatch_freshness_seconds", (("sink", sink),))
        old = dict(before.buckets.get(key, []))
        quantiles[sink] = quantile([(le, count - old.get(le, 0)) for le, count in after.buckets.get(key, [])], q)
    return quantiles


def sent(status_file: Path) -> tuple[int, bool]:
    """(messages loadgen has sent, whether it is done) from its status file."""
    try:
        status = json.loads(status_file.read_text())
    except (OSError, ValueError):
        return 0, False
    return status["sent"], status["done"]


@dataclass
class Flow:
    processes: list[subprocess.Popen]
    ports: list[int]
    peak_rss_mb: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    server_pid: int | None = None
    """The ClickHouse server the processes write to (--clickhouse server), measured apart."""
    server_peak_rss_mb: float | None = None
    services: dict[str, int] = field(default_factory=dict)
    """Redis and the broker by name -> pid: on the same cores, their CPU per event is reported too."""
    host: RunningHost | None = None
    """The chdb host the processes write through (--clickhouse chdb-host): its CPU is the flow's."""
    host_cpu_s: float = 0.0
    host_peak_rss_mb: float | None = None

    def snapshots(self) -> list[Snapshot]:
        from urllib.request import urlopen

        return [parse(urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode(), time.time())
                for port in self.ports]

    def snapshot(self) -> Snapshot:
        return merge(self.snapshots())

    def consumed_per_process(self) -> list[int]:
        """Events each process took off the topic: the producer keys by user, so a heavy user's
        partition makes one process's share far larger than the other's."""
        return [int(consumed(snap)) for snap in self.snapshots()]

    def usage(self) -> tuple[float, list[float]]:
        cpus, rss, peaks = [], [], []
        for proc in self.processes:
            c, r, peak = proc_usage(proc.pid)
            cpus.append(c)
            rss.append(r)
            peaks.append(peak)
        self.peak_rss_mb = peaks  # the kernel's high-water mark never falls
        self.cpu_s = cpus
        if self.host is not None:
            self.host_cpu_s, _rss, self.host_peak_rss_mb = proc_usage(self.host.pid)
        return sum(cpus) + self.host_cpu_s, rss

    def server_cpu(self) -> float:
        """CPU seconds of the ClickHouse server so far (0 with embedded chdb)."""
        if self.server_pid is None:
            return 0.0
        cpu, _rss, self.server_peak_rss_mb = proc_usage(self.server_pid)
        return cpu

    def services_cpu(self) -> dict[str, float]:
        """CPU seconds so far of each of `services`."""
        return {name: cpu_seconds(pid) for name, pid in self.services.items()}

    def host_pids(self) -> list[int]:
        return [self.host.pid] if self.host is not None else []

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.processes) and (self.host is None or self.host.alive())

    def chdb_mapped(self) -> list[bool]:
        return [maps_chdb(proc.pid) for proc in self.processes]

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.processes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


DEFAULT_FLOW = ENTRY_POINTS["ingest"]


@dataclass(frozen=True)
class ClickHouseTarget:
    """Where the flow processes write: each its own embedded chdb under the bench's directory
    (with server settings for its session), one chdb host they share, or one server."""

    server: services.Service | None = None
    chdb_settings: str = ""
    """name=value&... appended to each chdb:// URL (sinks.chdb_session.chdb_location)."""
    host: RunningHost | None = None

    def url(self, root: Path, index: int) -> str:
        if self.server is not None:
            return self.server.address
        if self.host is not None:
            return self.host.url
        return chdb_url(root / f"chdb-{index}", self.chdb_settings)

    @property
    def kind(self) -> str:
        return "server" if self.server is not None else "chdb-host" if self.host is not None else "chdb"


def chdb_url(directory: Path, chdb_settings: str) -> str:
    return f"chdb://{directory}" + (f"?{chdb_settings}" if chdb_settings else "")


def start_clickhouse_server(root: Path, settings: Settings) -> services.Service:
    """A clickhouse-server for the bench, migrated: a flow creates only an embedded database."""
    from ops.migrate import clickhouse_databases, migrate_clickhouse

    server = services.start_clickhouse(root / "clickhouse", die_with_parent=True)
    on_server = settings.model_copy(update={"clickhouse": settings.clickhouse.model_copy(
        update={"url": server.address})})
    for database in clickhouse_databases(on_server):
        migrate_clickhouse(on_server, database)
    return server


def start_flow(env: dict, root: Path, processes: int, workers: int, partitions: int,
               flow_target: str = DEFAULT_FLOW, clickhouse: ClickHouseTarget = ClickHouseTarget()) -> Flow:
    """`processes` independent flow processes, each reading its own share of the partitions
    (see kafka.only_partitions), with its own metrics port and ClickHouse (clickhouse.url)."""
    ports = [services.free_port() for _ in range(processes)]
    procs = []
    for index in range(processes):
        command = flow_command(flow_target, workers)
        share = ",".join(str(p) for p in range(index, partitions, processes))
        proc_env = process_env({**env, "PYTHONFAULTHANDLER": "1", "GATEWATCH_METRICS__PORT": str(ports[index]),
                                "GATEWATCH_KAFKA__ONLY_PARTITIONS": share,
                                "GATEWATCH_CLICKHOUSE__URL": clickhouse.url(root, index)})
        log = open(root / f"flow-{index}.log", "wb")
        procs.append(subprocess.Popen(command, env=proc_env, stdout=log, stderr=subprocess.STDOUT))
    return Flow(procs, ports, server_pid=clickhouse.server.pid if clickhouse.server else None, host=clickhouse.host)


def wait_for(predicate, timeout_s: float, flow: Flow, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not flow.alive():
            raise click.ClickException(f"a flow process died while waiting for {what}; see its log")
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise click.ClickException(f"timed out after {timeout_s:.0f} s waiting for {what}")


def loadgen(env: dict, rate: float, duration: float, status_file: Path, extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ops.cli", "loadgen", "--rate", str(rate), "--duration",
                             str(duration), "--status-file", str(status_file), *extra],
                            env=env, stdout=subprocess.PIPE, text=True)


@click.command("e2e")
@click.option("--rate", default=2000.0, show_default=True, type=click.FloatRange(min=1), help="Average events/s.")
@click.option("--duration", default=60.0, show_default=True, type=click.FloatRange(min=2), help="Seconds of load.")
@click.option("--burst-factor", default=1.0, show_default=True, type=click.FloatRange(min=1))
@click.option("--burst-every", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between bursts (0: none).")
@click.option("--burst-seconds", default=5.0, show_default=True, type=click.FloatRange(min=0.1))
@click.option("--processes", default=1, show_default=True, type=click.IntRange(1),
              help="Independent flow processes, each reading every Nth partition.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Workers per process.")
@click.option("--partitions", default=3, show_default=True, type=click.IntRange(1), help="Kafka partitions.")
@click.option("--users", default=10_000, show_default=True, type=click.IntRange(1))
@click.option("--user-mix", type=click.Choice(USER_MIXES), default="zipf", show_default=True,
              help="How loadgen spreads events over users, and so over partitions (see `gatewatch loadgen --help`); "
                   "pareto puts over half of them on one user, one partition and one process.")
@click.option("--broker", type=click.Choice(["tansu", "noida"]), default="tansu", show_default=True,
              help="Local broker; noida answers fetches at once instead of waiting, which costs the flow CPU.")
@click.option("--keep", type=click.Path(file_okay=False), help="Keep logs and data in this directory.")
@click.option("--backlog", default=0, show_default=True, type=click.IntRange(0),
              help="Fill the topic with this many events first, then time the drain alone (ignores --rate/--duration"
                   " and bursts).")
@click.option("--flow", "flow_target", default=DEFAULT_FLOW, show_default=True,
              help="The `python -m bytewax.run` target to measure: compare a variant of the flow with the shipped one.")
@click.option("--stages-sample", default=5000, show_default=True, type=click.IntRange(100),
              help="With --backlog: events `bench stages` measures after the drain.")
@click.option("--profile-dir", type=click.Path(file_okay=False),
              help="With --backlog: py-spy records each flow process (native frames, collapsed stacks) from the "
                   "first consumed events to the end of the drain, into flow-<i>.txt here.")
@click.option("--clickhouse", "clickhouse_kind", type=click.Choice(["chdb", "chdb-host", "server"]), default=None,
              help="Default: chdb for one flow process, chdb-host for several (the layout of `gatewatch demo "
                   "--processes N` and of a cluster on one machine). "
                   "Embedded chdb in each flow process, one chdb host process that every flow process writes "
                   "through (chdb+unix://, `gatewatch chdb-host`: chdb's code and heap resident once, each flow "
                   "process ~500 MB; each connection's statements run in parallel, inserts take turns; "
                   "ops/bench/FINDINGS.md), or one local clickhouse-server over the "
                   "native protocol.")
@click.option("--drain-timeout", default=300.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds the flow may take to catch up after the load; past them the figures so far are printed"
                   " and the bench fails.")
@click.option("--chdb-settings", default="", metavar="NAME=VALUE&...",
              help="ClickHouse server settings of each embedded chdb session (or the chdb host's), e.g. "
                   "mark_cache_size=67108864.")
def e2e(rate, duration, burst_factor, burst_every, burst_seconds, processes, workers, partitions, users, user_mix,
        broker, keep, backlog, stages_sample, flow_target, profile_dir, clickhouse_kind, drain_timeout,
        chdb_settings) -> None:
    """Run loadgen and the ingest flow against a local broker, Redis and ClickHouse (embedded or a server)."""
    clickhouse_kind = clickhouse_kind or ("chdb-host" if processes > 1 else "chdb")
    if chdb_settings and clickhouse_kind == "server":
        raise click.UsageError("--chdb-settings applies to --clickhouse chdb or chdb-host only")
    root = Path(keep or tempfile.mkdtemp(prefix="gatewatch-bench-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    settings = Settings()
    started = []
    flow = load = None
    try:
        kafka = services.start_kafka(root / "kafka", kind=broker, die_with_parent=True)
        started.append(kafka)
        redis_server = services.start_redis(root / "redis", die_with_parent=True)
        started.append(redis_server)
        migrate_kafka(settings.kafka.model_copy(update={"bootstrap": kafka.address, "partitions": partitions}))
        clickhouse = ClickHouseTarget(chdb_settings=chdb_settings)
        if clickhouse_kind == "server":
            clickhouse = ClickHouseTarget(server=start_clickhouse_server(root, settings))
            started.append(clickhouse.server)
            click.echo(f"bench: clickhouse-server {clickhouse.server.extra.get('version')} at "
                       f"{clickhouse.server.address}", err=True)
        elif clickhouse_kind == "chdb-host":
            clickhouse = ClickHouseTarget(host=start_host(chdb_url(root / "chdb", chdb_settings),
                                                          root / "chdb-host.sock", root / "chdb-host.log",
                                                          metrics_port=services.free_port()))
            started.append(clickhouse.host)
            click.echo(f"bench: chdb host pid {clickhouse.host.pid} at {clickhouse.host.url}", err=True)
        env = {**os.environ, "GATEWATCH_KAFKA__BOOTSTRAP": kafka.address, "GATEWATCH_REDIS__URL": redis_server.address,
               "GATEWATCH_PARQUET__ROOT": str(root / "raw"), "GATEWATCH_KAFKA__TAIL": "true",
               "GATEWATCH_LOG_LEVEL": "WARNING"}
        if backlog:
            drain_backlog(env, root, settings, backlog, processes, workers, partitions, users, user_mix, stages_sample,
                          flow_target, clickhouse, Path(profile_dir) if profile_dir else None,
                          {"redis": redis_server.pid, "broker": kafka.pid})
            return
        flow = start_flow(env, root, processes, workers, partitions, flow_target, clickhouse)
        click.echo(f"bench: {processes} process(es) x {workers} worker(s), {partitions} partitions; logs in {root}",
                   err=True)

        # Warm up (redactor start, first connections), then measure from a baseline.
        population = ["--users", str(users), "--user-mix", user_mix]
        warm = loadgen(env, 100, 3, root / "warm-up.json", ["--seed", "1", *population])
        warm.communicate()
        warm_sent, _ = sent(root / "warm-up.json")
        wait_for(lambda: consumed(flow.snapshot()) >= warm_sent, 180, flow, "the warm-up events")
        base = flow.snapshot()
        base_cpu, _ = flow.usage()
        base_host_cpu = flow.host_cpu_s
        base_server_cpu = flow.server_cpu()

        extra = [*population, "--burst-factor", str(burst_factor), "--burst-every", str(burst_every),
                 "--burst-seconds", str(burst_seconds)]
        status_file = root / "loadgen.json"
        load = loadgen(env, rate, duration, status_file, extra)
        timeline = []
        load_started = load_finished = None
        budget_s = 2 * duration + drain_timeout + 300
        drained = True
        give_up_at = time.monotonic() + budget_s
        while True:
            time.sleep(1.0)
            if not flow.alive():
                raise click.ClickException(f"a flow process died; see {root}/flow-*.log")
            if load.poll() not in (None, 0):
                raise click.ClickException(f"loadgen failed with exit code {load.returncode}; see its output above")
            if time.monotonic() > give_up_at:
                raise click.ClickException(f"the bench did not finish within {budget_s:.0f} s")
            try:
                snap = flow.snapshot()
            except (OSError, http.client.HTTPException):
                continue  # a flow too busy to answer within the timeout: sample again

            produced, load_done = sent(status_file)
            cpu, rss = flow.usage()
            if load_started is None and produced:
                load_started, at_load_start, cpu_at_load_start = time.monotonic(), snap, cpu
            done = consumed(snap) - consumed(base)
            lag = max(0, produced - done)
            if load_started is None:
                continue
            t = time.monotonic() - load_started
            timeline.append({"t": round(t, 1), "produced": produced, "consumed": done, "lag": int(lag)})
            if len(timeline) % 5 == 0:
                click.echo(f"bench  t={t:6.1f}s  produced {produced:>9,}  consumed {done:>9,.0f}  lag {lag:>8,.0f}"
                           f"  rss {'/'.join(f'{r:.0f}' for r in rss)} MB", err=True)
            if load_done:
                load_finished = load_finished or time.monotonic()
            if load.poll() is not None:
                if lag == 0:
                    break
                if time.monotonic() - load_finished > drain_timeout:
                    drained = False  # reported below with the lag left, then an error
                    break
        finished = time.monotonic()
        load_report = json.loads(load.communicate()[0].splitlines()[-1])
        final = flow.snapshot()
        cpu, _ = flow.usage()
        server_cpu = flow.server_cpu() - base_server_cpu
        chdb_mapped = flow.chdb_mapped()
        events = consumed(final) - consumed(base)
        refreshes, keys = (end - start for end, start in zip(aggregate_refreshes(final), aggregate_refreshes(base)))
        load_seconds = load_report["seconds"]
        in_load = [row for row in timeline if row["t"] <= load_seconds]
        result = {
            "rate": rate, "duration_s": duration, "burst_factor": burst_factor, "burst_every_s": burst_every,
            "flow": flow_target, "processes": processes, "workers": workers, "partitions": partitions, "broker": broker,
            "users": users, "user_mix": user_mix,
            "clickhouse": clickhouse.kind, "offered_events_per_s": load_report["events_per_s"],
            "sustained_events_per_s": round((in_load[-1]["consumed"] if in_load else events) / load_seconds, 1),
            "drain_s": round(finished - (load_finished or finished), 1),
            "events": int(events),
            "max_lag": max((row["lag"] for row in timeline), default=0),
            "drained": drained, "lag_left": timeline[-1]["lag"] if timeline else 0,
            "freshness_p50_s": _round(freshness_delta(base, final, 0.5)),
            "freshness_p99_s": _round(freshness_delta(base, final, 0.99)),
            "freshness_p99_s_by_sink": {sink: _round(value)
                                        for sink, value in freshness_by_sink(base, final, 0.99).items()},
            "worker_busy_by_step": worker_busy_by_step(at_load_start, final,
                                                       (finished - load_started) * processes * workers),
            **flow_steps(at_load_start, final, cpu - cpu_at_load_start, consumed(final) - consumed(at_load_start)),
            "peak_rss_mb": round(max(flow.peak_rss_mb), 1),
            "peak_rss_mb_per_process": [round(r, 1) for r in flow.peak_rss_mb],
            "cpu_s_per_1000_events": round((cpu - base_cpu) / max(events, 1) * 1000, 3),
            "aggregate_refreshes": int(refreshes), "aggregate_keys_per_event": round(keys / max(events, 1), 3),
            "chdb_mapped_per_process": chdb_mapped,
            **server_figures(flow, server_cpu / max(events, 1) * 1000, (cpu - base_cpu + server_cpu) / max(events, 1)
                             * 1000, "cpu_s_per_1000_events", 3),
            **host_figures(flow, (flow.host_cpu_s - base_host_cpu) / max(events, 1) * 1000, "cpu_s_per_1000_events",
                           3),
            "lag_timeline": [(row["t"], row["lag"]) for row in timeline[::max(1, len(timeline) // 30)]],
        }
        click.echo(render(result), err=True)
        click.echo(json.dumps(result))
        if not drained:
            raise click.ClickException(f"the flow did not drain the topic within {drain_timeout:g} s of the load "
                                       f"ending ({result['lag_left']:,} messages left; freshness counts only the "
                                       "events written)")
    finally:
        if load is not None and load.poll() is None:
            load.kill()
        if flow is not None:
            flow.stop()
        for service in reversed(started):
            service.stop()
        if keep is None and sys.exc_info()[0] is None:  # a failed run's logs stay for its message
            shutil.rmtree(root, ignore_errors=True)  # its broker data, databases and raw files


def server_figures(flow: Flow, server_per_event: float, total_per_event: float, unit: str,
                   digits: int) -> dict[str, float]:
    """The ClickHouse server's share of a result (nothing with embedded chdb): its own CPU,
    flow plus server, and its peak resident memory."""
    if flow.server_pid is None:
        return {}
    return {f"server_{unit}": round(server_per_event, digits), f"total_{unit}": round(total_per_event, digits),
            "server_peak_rss_mb": round(flow.server_peak_rss_mb or 0, 1)}


def host_figures(flow: Flow, host_per_event: float, unit: str, digits: int) -> dict[str, float]:
    """The chdb host's share of a result (already counted in the flow's CPU), and its peak
    resident memory (nothing without a host)."""
    if flow.host is None:
        return {}
    return {f"host_{unit}": round(host_per_event, digits), "host_peak_rss_mb": round(flow.host_peak_rss_mb or 0, 1),
            # the whole run's, migrations and the final read-back included
            "host_seconds_by_op": flow.host.seconds_by_op()}


def drain_backlog(env: dict, root: Path, settings: Settings, backlog: int, processes: int, workers: int,
                  partitions: int, users: int, user_mix: str, stages_sample: int, flow_target: str = DEFAULT_FLOW,
                  clickhouse: ClickHouseTarget = ClickHouseTarget(), profile_dir: Path | None = None,
                  services_pids: dict[str, int] | None = None) -> None:
    """Fill the topic with `backlog` loadgen events, then start the flow and time the drain.

    The clock and the CPU baseline start at the first sample that shows consumed events, so
    interpreter start and redactor loading are not charged to the events; events consumed
    before that sample are left out of both sides of the ratio."""
    fill = loadgen(env, backlog, 1, root / "backlog.json", ["--users", str(users), "--user-mix", user_mix])
    fill_report = json.loads(fill.communicate()[0].splitlines()[-1])
    if fill.returncode != 0 or fill_report["sent"] != backlog:
        raise click.ClickException(f"loadgen could not fill the backlog (exit {fill.returncode}, {fill_report})")
    click.echo(f"bench: {backlog:,} events in the topic; starting {processes} process(es) x {workers} worker(s), "
               f"{partitions} partitions; logs in {root}", err=True)
    flow = start_flow(env, root, processes, workers, partitions, flow_target, clickhouse)
    flow.services = dict(services_pids or {})
    services_at_launch = services_before = flow.services_cpu()
    profilers: list[subprocess.Popen] = []
    try:
        launched = time.monotonic()
        cpu_at_start: list[float] = [0.0] * processes
        host_cpu_at_start = 0.0
        start = None  # (monotonic time, events consumed, CPU seconds, snapshot) at the first sample with progress
        done = 0.0
        snap = None
        reported = launched
        while done < backlog:
            # Each scrape costs the flow a few ms of CPU (charged to its events): once a second.
            time.sleep(DRAIN_POLL_S)
            if not flow.alive():
                raise click.ClickException(f"a flow process died; see {root}/flow-*.log")
            if time.monotonic() - launched > 600 + backlog / 100:
                raise click.ClickException(f"the flow did not drain {backlog:,} events; consumed {done:,.0f}")
            try:
                snap = flow.snapshot()
            except (OSError, http.client.HTTPException):
                continue
            done = consumed(snap)
            cpu, rss = flow.usage()
            if start is None and done > 0:
                start = (time.monotonic(), done, cpu, snap, flow.server_cpu())
                cpu_at_start = list(flow.cpu_s)
                host_cpu_at_start = flow.host_cpu_s
                threads_at_start = threads_cpu([proc.pid for proc in flow.processes])
                host_threads_at_start = threads_cpu(flow.host_pids())
                services_before = flow.services_cpu()
                if profile_dir is not None:
                    profilers = start_profilers(flow, profile_dir)
            if time.monotonic() - reported >= 5:
                reported = time.monotonic()
                click.echo(f"bench  consumed {done:>9,.0f}/{backlog:,}  rss {'/'.join(f'{r:.0f}' for r in rss)} MB",
                           err=True)
        finished = time.monotonic()
        cpu, _ = flow.usage()
        host_cpu_at_end = flow.host_cpu_s  # later usage() calls move it past the drain
        per_process = flow.consumed_per_process()
        server_cpu = flow.server_cpu()
        services_cpu = flow.services_cpu()
        chdb_mapped = flow.chdb_mapped()
        # The last ClickHouse batch waits up to clickhouse.max_age_s; a flow stopped before
        # it is written would leave it to recovery. Not timed: the drain is over.
        flow_sinks = set(load_settings(use_service_state=False).sinks)  # the flows' own
        writes_clickhouse = "clickhouse" in flow_sinks
        if writes_clickhouse:
            wait_for(lambda: clickhouse_rows(flow.snapshot()) >= fill_report["valid"], 60, flow,
                     "the last ClickHouse batch")
        # Window totals reach the quota and billing sinks at the windows' next flush
        # (windows.flush_interval_s): on a loaded machine, after the last ClickHouse batch.
        for sink in {"quota", "billing"} & flow_sinks:
            wait_for(partial(step_reported, flow, f"{sink}_out"), 60, flow, f"the {sink} sink's first write")
        # The flows report their steps' CPU once a second (dataflows.step_cpu): wait for the last report.
        time.sleep(STEP_REPORT_WAIT_S)
        steps_snap = flow.snapshot()
        steps_cpu, _ = flow.usage()
        threads_at_end = threads_cpu([proc.pid for proc in flow.processes])
        host_threads_at_end = threads_cpu(flow.host_pids())
    finally:
        stop_profilers(profilers)
        flow.stop()
    stored = stored_events(clickhouse, settings, root, processes) if writes_clickhouse else None
    started_at, consumed_before, cpu_before, first, server_cpu_before = start
    if consumed_before >= done:  # drained before the first sample: charge start-up too
        started_at, consumed_before, cpu_before, first, server_cpu_before = launched, 0.0, 0.0, None, 0.0
        threads_at_start = host_threads_at_start = {}
        cpu_at_start = [0.0] * processes
        host_cpu_at_start = 0.0
        services_before = services_at_launch
    timed_events = done - consumed_before
    from ops.bench.stages import CORE_STAGES

    stages = stage_figures(settings, min(stages_sample, backlog), users, user_mix, root / "stages-chdb", env)
    stages_us = sum(stages.values())
    stages_core_us = sum(us for name, us in stages.items() if name in CORE_STAGES)
    cpu_us = (cpu - cpu_before) / timed_events * 1e6
    server_us = (server_cpu - server_cpu_before) / timed_events * 1e6
    result = {
        "backlog": backlog, "flow": flow_target, "processes": processes, "workers": workers, "partitions": partitions,
        "users": users, "user_mix": user_mix,
        "clickhouse": clickhouse.kind, "valid_events": fill_report["valid"],
        **({"clickhouse_events": stored} if stored is not None else {}),
        "events": int(done), "timed_events": int(timed_events),
        "drain_s": round(finished - started_at, 2),
        "drain_events_per_s": round(timed_events / (finished - started_at), 1),
        "cpu_us_per_event": round(cpu_us, 1),
        "stages_us_per_event": round(stages_us, 1),
        "cpu_to_stages_ratio": round(cpu_us / stages_us, 2),
        # The stage set before the sinks, the source and the DLQ were added (issue 17): the old target's sum.
        "stages_core_us_per_event": round(stages_core_us, 1),
        "cpu_to_stages_core_ratio": round(cpu_us / stages_core_us, 2),
        "stage_us_per_event": {name: round(us, 2) for name, us in stages.items()},
        **flow_steps(first, steps_snap, steps_cpu - cpu_before, timed_events),
        # Same window as the steps: from the first sample with progress to the steps' last report.
        "flow_thread_us_per_event": thread_figures(threads_at_start, threads_at_end, timed_events),
        **({"host_thread_us_per_event": thread_figures(host_threads_at_start, host_threads_at_end, timed_events)}
           if flow.host is not None else {}),
        "startup_cpu_s": round(cpu_before, 2),
        "full_gc_collections": int(full_gc_collections(snap) - (full_gc_collections(first) if first else 0)),
        "peak_rss_mb_per_process": [round(r, 1) for r in flow.peak_rss_mb],
        "events_per_process": per_process,
        # A process's CPU seconds over the drain's wall seconds: under 1 while it has events
        # left, its core went to other processes (or it waited on a sink).
        "cpu_share_per_process": [round((end - begin) / (finished - started_at), 2)
                                  for begin, end in zip(cpu_at_start, flow.cpu_s)],
        "chdb_mapped_per_process": chdb_mapped,
        # Redis and the broker share the two cores (Redis: the quota's Lua scripts, ~43 µs per event).
        "services_us_per_event": {name: round((cpu_s - services_before[name]) / timed_events * 1e6, 1)
                                  for name, cpu_s in services_cpu.items()},
        **server_figures(flow, server_us, cpu_us + server_us, "cpu_us_per_event", 1),
        **host_figures(flow, (host_cpu_at_end - host_cpu_at_start) / timed_events * 1e6, "cpu_us_per_event", 1),
    }
    if profile_dir is not None:
        from ops.bench.profile import summarize_file

        result["profile_shares"] = [summarize_file(profile_dir / f"flow-{index}.txt") for index in range(processes)]
    click.echo(render_backlog(result), err=True)
    click.echo(json.dumps(result))
    if stored is not None and stored != fill_report["valid"]:
        raise click.ClickException(f"ClickHouse holds {stored:,} distinct events of the {fill_report['valid']:,} "
                                   f"valid ones sent")


def start_profilers(flow: Flow, profile_dir: Path) -> list[subprocess.Popen]:
    """py-spy on every flow process; its samples cost the flow nothing (sampled from outside,
    but --native pauses the process for each sample: compare CPU figures only between runs
    that both profile)."""
    profile_dir.mkdir(parents=True, exist_ok=True)
    profilers = []
    for index, proc in enumerate(flow.processes):
        with open(profile_dir / f"py-spy-{index}.log", "wb") as log:
            profilers.append(subprocess.Popen(
                ["py-spy", "record", "--native", "--format", "raw", "--rate", "50", "--pid", str(proc.pid),
                 "-o", str(profile_dir / f"flow-{index}.txt")], stdout=subprocess.DEVNULL, stderr=log))
    return profilers


def stop_profilers(profilers: list[subprocess.Popen]) -> None:
    """SIGINT makes py-spy write what it sampled."""
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)
    for profiler in profilers:
        try:
            profiler.wait(timeout=60)
        except subprocess.TimeoutExpired:
            profiler.kill()
            profiler.wait()


def stored_events(clickhouse: ClickHouseTarget, settings: Settings, root: Path, processes: int) -> int:
    """Distinct events in the events tables after the flows stopped: the server's, the chdb
    host's, or each flow process's own chdb database, opened here one after the other (a
    process opens one chdb path at a time; opening the next closes the last): nothing lost on the way."""
    from sinks.clickhouse import ClickHouse, close_chdb

    database = settings.clickhouse.database
    total = 0
    try:
        for url in sorted({clickhouse.url(root, index) for index in range(processes)}):
            (count,), = ClickHouse(url, database).rows(f"SELECT count() FROM {database}.events FINAL")
            total += int(count)
    finally:
        close_chdb()
    return total


def stage_figures(settings: Settings, sample: int, users: int, user_mix: str, chdb_dir: Path,
                  env: dict) -> dict[str, float]:
    """`bench stages`' CPU µs per event of each stage on loadgen events of the same shape, with
    the sinks, the source and the DLQ against the bench's own Redis and broker (env), in CPU
    seconds of this process (all threads, as for the flow), so a busy machine does not inflate
    them; best of two runs, so first-call costs (chdb table creation) are not charged per event."""
    from ops.bench.stages import messages_for, stage_seconds

    on_services = settings.model_copy(update={
        "kafka": settings.kafka.model_copy(update={"bootstrap": env["GATEWATCH_KAFKA__BOOTSTRAP"]}),
        "redis": settings.redis.model_copy(update={"url": env["GATEWATCH_REDIS__URL"]})})
    seconds = stage_seconds(on_services, messages_for(settings, sample, users, user_mix), 2, chdb_dir,
                            time.process_time, services=True)
    return {name: spent / sample * 1e6 for name, spent in seconds.items()}


STEP_REPORT_WAIT_S = 1.5


def step_reported(flow: Flow, step: str) -> bool:
    """Whether the flow reported a call of the step (always, for a flow without a step clock)."""
    calls = counter_delta(None, flow.snapshot(), "gatewatch_step_calls")
    return not calls or calls.get(step, 0) > 0


def counter_delta(before: Snapshot | None, after: Snapshot, name: str) -> dict[str, float]:
    """A labelled counter's increase between two snapshots, by its first label's value."""
    old = before.counters if before is not None else {}
    return {labels[0][1] if labels else "": value - old.get((metric, labels), 0.0)
            for (metric, labels), value in after.counters.items() if metric == name}


def flow_steps(before: Snapshot | None, after: Snapshot, flow_cpu_s: float, events: float) -> dict:
    """The flow's own CPU breakdown (dataflows.step_cpu) over the drain, per timed event: each
    step's thread CPU and the mean items a call of it was handed; the worker threads' CPU
    outside any step (Bytewax's Rust, its exchanges and Python calls); the other threads
    (librdkafka, chdb, the metrics server; with a chdb host flow_cpu_s includes the host's,
    which then counts here); the GC's share. Empty for a flow that has no
    step clock (an older one under --flow)."""
    cpu = counter_delta(before, after, "gatewatch_step_cpu_seconds")
    if not cpu:
        return {}
    calls = counter_delta(before, after, "gatewatch_step_calls")
    items = counter_delta(before, after, "gatewatch_step_items")
    steps_s = sum(cpu.values())
    worker_s = sum(counter_delta(before, after, "gatewatch_worker_cpu_seconds").values())
    per_event = 1e6 / max(events, 1)
    return {
        "flow_step_us_per_event": {step: round(spent * per_event, 2)
                                   for step, spent in sorted(cpu.items(), key=lambda kv: -kv[1])},
        "flow_step_items_per_call": {step: round(items.get(step, 0) / calls[step], 1)
                                     for step in cpu if calls.get(step)},
        "flow_steps_sum_us_per_event": round(steps_s * per_event, 1),
        "flow_between_steps_us_per_event": round((worker_s - steps_s) * per_event, 1),
        "flow_other_threads_us_per_event": round((flow_cpu_s - worker_s) * per_event, 1),
        "flow_gc_us_per_event": round(sum(counter_delta(before, after, "gatewatch_gc_cpu_seconds").values())
                                      * per_event, 1),
    }


def worker_busy_by_step(before: Snapshot, after: Snapshot, worker_seconds: float) -> dict[str, float]:
    """The share of the workers' wall time each flow step held them (dataflows.step_cpu), its
    waits for a sink's server included, largest first; steps under 0.5% left out."""
    wall = counter_delta(before, after, "gatewatch_step_wall_seconds")
    shares = {step: spent / max(worker_seconds, 1e-9) for step, spent in wall.items()}
    return {step: round(share, 3) for step, share in sorted(shares.items(), key=lambda kv: -kv[1]) if share >= 0.005}


def render_backlog(r: dict) -> str:
    rows = [
        ("backlog drained", f"{r['events']:,} events, timed {r['timed_events']:,} over {r['drain_s']:.1f} s"),
        ("drain rate", f"{r['drain_events_per_s']:,.0f} events/s"),
        ("CPU per event (flow)", f"{r['cpu_us_per_event']:.1f} µs (start-up {r['startup_cpu_s']:.1f} s not included)"),
        ("stages alone", f"{r['stages_us_per_event']:.1f} µs per event (ratio {r['cpu_to_stages_ratio']:.2f}); "
                         f"core stages {r['stages_core_us_per_event']:.1f} (ratio {r['cpu_to_stages_core_ratio']:.2f})"),
        ("full GC collections", f"{r['full_gc_collections']:,} during the drain, all processes"),
        ("peak RSS per process", " / ".join(f"{m:.0f} MB" for m in r["peak_rss_mb_per_process"])),
        ("events per process", " / ".join(f"{n:,}" for n in r["events_per_process"])),
        ("CPU share per process", " / ".join(f"{share:.2f} of a core" for share in r["cpu_share_per_process"])),
        ("topology", f"{r['processes']} process(es) x {r['workers']} worker(s), {r['partitions']} partitions"),
        ("users", f"{r['users']:,}, {r['user_mix']} mix"),
        *[(f"{name} CPU", f"{us:g} µs per event") for name, us in r.get("services_us_per_event", {}).items()],
        *server_rows(r, "cpu_us_per_event", "µs per event"),
    ]
    rows.extend(step_rows(r))
    for index, shares in enumerate(r.get("profile_shares", [])):
        rows.append((f"profile, process {index}", ", ".join(f"{name} {share:.0%}" for name, share in shares.items())))
    return "\n".join(f"  {name:<22}{value}" if len(name) < 22 else f"  {name}  {value}" for name, value in rows)


def step_rows(r: dict) -> list[tuple[str, str]]:
    """Each stage of `bench stages`, then the flow's own steps (dataflows.step_cpu), in µs per event."""
    rows = [(f"stage {name}", f"{us:.2f} µs per event") for name, us in r.get("stage_us_per_event", {}).items()]
    if "flow_step_us_per_event" not in r:
        return rows
    sizes = r["flow_step_items_per_call"]
    rows += [(f"flow {step}", f"{us:.2f} µs per event, {sizes.get(step, 0):g} items per call")
             for step, us in r["flow_step_us_per_event"].items()]
    rows += [("flow steps, sum", f"{r['flow_steps_sum_us_per_event']:.1f} µs per event"),
             ("flow between steps", f"{r['flow_between_steps_us_per_event']:.1f} µs per event (worker thread, "
                                    "outside our Python: Bytewax)"),
             ("flow other threads", f"{r['flow_other_threads_us_per_event']:.1f} µs per event (librdkafka, chdb "
                                    "or the chdb host, metrics server)"),
             ("flow GC", f"{r['flow_gc_us_per_event']:.1f} µs per event (inside the steps above)")]
    rows += [(f"thread {name}", f"{us:g} µs per event") for name, us in r.get("flow_thread_us_per_event", {}).items()]
    rows += [(f"host thread {name}", f"{us:g} µs per event")
             for name, us in r.get("host_thread_us_per_event", {}).items()]
    return rows


def server_rows(r: dict, unit: str, label: str) -> list[tuple[str, str]]:
    if f"host_{unit}" in r:
        rows = [("clickhouse", "one chdb host for every flow process"),
                ("chdb host CPU", f"{r[f'host_{unit}']:g} {label} (counted in the flow's)"),
                ("chdb host RSS", f"peak {r['host_peak_rss_mb']:.0f} MB")]
    elif f"server_{unit}" not in r:
        rows = [("clickhouse", "embedded chdb in each flow process")]
    else:
        rows = [("clickhouse server CPU", f"{r[f'server_{unit}']:g} {label}; flow + server {r[f'total_{unit}']:g}"),
                ("clickhouse server RSS", f"peak {r['server_peak_rss_mb']:.0f} MB")]
    if "clickhouse_events" in r:
        rows.append(("clickhouse events", f"{r['clickhouse_events']:,} stored of {r['valid_events']:,} valid sent"))
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def render(r: dict) -> str:
    rows = [
        ("offered load", f"{r['offered_events_per_s']:,.0f} events/s"
         + (f" (bursts {r['burst_factor']:g}x every {r['burst_every_s']:g} s)" if r["burst_every_s"] else "")),
        ("sustained", f"{r['sustained_events_per_s']:,.0f} events/s"),
        ("drained after load", f"{r['drain_s']:.1f} s"),
        ("max consumer lag", f"{r['max_lag']:,} messages"),
        ("freshness p50 / p99", f"{r['freshness_p50_s']} s / {r['freshness_p99_s']} s"),
        ("freshness p99 by sink", ", ".join(f"{sink} {value} s"
                                            for sink, value in r["freshness_p99_s_by_sink"].items())),
        ("workers busy in", ", ".join(f"{step} {share:.0%}" for step, share in r["worker_busy_by_step"].items())
         + f" (of {r['processes'] * r['workers']} workers' wall time)"),
        ("peak RSS per process", " / ".join(f"{m:.0f} MB" for m in r["peak_rss_mb_per_process"])),
        ("CPU per 1,000 events", f"{r['cpu_s_per_1000_events']:.3f} s"),
        ("topology", f"{r['processes']} process(es) x {r['workers']} worker(s), {r['partitions']} partitions"),
        ("users", f"{r['users']:,}, {r['user_mix']} mix"),
        ("aggregate refreshes", f"{r['aggregate_refreshes']}, {r['aggregate_keys_per_event']:.2f} keys recomputed "
                                "per event"),
        *server_rows(r, "cpu_s_per_1000_events", "CPU s per 1,000 events"),
        *step_rows(r),
    ]
    lag = "  ".join(f"{t:g}s:{lag}" for t, lag in r["lag_timeline"])
    return "\n".join(f"  {name:<22}{value}" if len(name) < 22 else f"  {name}  {value}" for name, value in rows) \
        + f"\n  lag over time: {lag}"
