"""`gatewatch loadgen` and the benchmarks: counts and shapes, never timings."""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import pytest

from ops.dev.loadgen import FleetWire, collect, draw_user, generate, messages_in, schedule
from ops.settings import Settings
from schemas.codec import EventCodec, InvalidEvent
from schemas.registry import registry_from_settings
from sinks.kafka import read_topic
from tests.processes import run_cli


def test_schedule_sends_bursts_at_the_burst_rate():
    offsets = schedule(messages_in(30, 100, burst_factor=5, burst_every_s=10, burst_seconds=2), 100, 5, 10, 2)
    per_second = Counter(int(t) for t in offsets)
    assert len(offsets) == 100 * 30 + 4 * 100 * 2 * 2
    assert per_second[5] == 100 and per_second[25] == 100
    # Seconds that start or end a burst can share a few messages with their neighbours.
    assert all(abs(per_second[s] - 500) <= 5 for s in (10, 11, 20, 21))
    assert offsets == sorted(offsets) and offsets[-1] < 30.1


def test_no_bursts_is_a_steady_rate():
    offsets = schedule(messages_in(4, 250), 250)
    assert len(offsets) == 1000 and set(Counter(int(t) for t in offsets).values()) == {250}


def test_zipf_mix_shrinks_the_heaviest_users_share_as_users_grow_pareto_does_not():
    import random

    def heaviest_share(users: int, mix: str) -> float:
        rng = random.Random(3)
        draws = Counter(draw_user(rng, users, mix) for _ in range(40_000))
        assert set(draws) <= set(range(1, users + 1))
        return draws[1] / 40_000

    # Zipf: user 1's share is 1 / H(users): 0.102 of 10,000 users, 0.072 of a million.
    assert 0.09 < heaviest_share(10_000, "zipf") < 0.115
    assert 0.062 < heaviest_share(1_000_000, "zipf") < 0.082
    # Pareto(1.2): 1 - 2**-1.2 = 0.565 whatever the number of users: one hot key.
    assert 0.55 < heaviest_share(10_000, "pareto") < 0.58
    assert 0.55 < heaviest_share(1_000_000, "pareto") < 0.58


@pytest.mark.integration
def test_loadgen_produces_what_it_reports(kafka_bootstrap, topic_factory, tmp_path):
    topic = topic_factory(partitions=2)
    status = tmp_path / "status.json"
    result = run_cli("loadgen", "--rate", "400", "--duration", "2", "--users", "50", "--dup-ratio", "0.1",
                     "--bad-ratio", "0.05", "--topic", topic, "--status-file", str(status),
                     env={"GATEWATCH_KAFKA__BOOTSTRAP": kafka_bootstrap}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["sent"] == 800 == report["valid"] + report["duplicates"] + report["bad"]
    assert json.loads(status.read_text()) == {"sent": 800, "done": True}
    assert "sent" in result.stderr

    codec = EventCodec(registry_from_settings(Settings().schemas), Settings().validation)
    decoded, bad = [], 0
    for _partition, _offset, value in read_topic(kafka_bootstrap, topic, lambda raw: raw):
        try:
            decoded.append(codec.decode(value, int(time.time() * 1000)))
        except InvalidEvent:
            bad += 1
    assert len(decoded) + bad == 800 and bad == report["bad"]
    assert len({e["event_id"] for e in decoded}) == report["valid"]
    assert len({e["user_id"] for e in decoded}) > 10
    unique = {e["event_id"]: e for e in decoded}.values()
    assert sum(e["reasoning_tokens"] for e in unique) == report["reasoning_tokens"] > 0
    assert sum(e["schema_version"] == 2 for e in unique) == report["v2"]
    assert 0 < report["v2"] < report["valid"]  # v1 events (written as v1 Avro) mixed in


def test_generated_events_mix_schema_v1_and_v2_and_expect_their_reasoning_tokens():
    settings = Settings()
    registry = registry_from_settings(settings.schemas)
    codec = EventCodec(registry, settings.validation)
    messages, expected = collect(generate(FleetWire(registry, settings.validation), 600, dup_ratio=0.0, bad_ratio=0.0, users=30, seed=3,
                                          keep_events=True, v2_ratio=0.4))
    events = list(expected.events.values())
    v2 = [e for e in events if e["schema_version"] == 2]
    v1 = [e for e in events if e["schema_version"] == 1]
    assert len(v2) == expected.v2 and 0.3 * 600 < len(v2) < 0.5 * 600 and v1
    assert all("reasoning_tokens" not in e and "trace_id" not in e for e in v1)
    assert all(0 <= e["reasoning_tokens"] <= e["output_tokens"] for e in v2)
    assert any(e["reasoning_tokens"] for e in v2)
    assert len({e["trace_id"] for e in v2}) == len(v2) and all(len(e["span_id"]) == 16 for e in v2)
    assert expected.reasoning_tokens == sum(e["reasoning_tokens"] for e in v2)
    # Each version is written with its own writer schema, as gateways of two releases do;
    # the reader takes both, a v1 event with no reasoning and no trace.
    writers = {int.from_bytes(value[1:5], "big") for _key, value in messages}
    assert writers == {registry.entry("gateway_event", 1).schema_id, registry.entry("gateway_event").schema_id}
    now = int(time.time() * 1000)
    decoded = {e["event_id"]: e for e in (codec.decode(value, now) for _key, value in messages)}
    assert sum(e["reasoning_tokens"] for e in decoded.values()) == expected.reasoning_tokens
    assert all(decoded[e["event_id"]]["trace_id"] is None for e in v1)
    assert all(decoded[e["event_id"]]["trace_id"] == e["trace_id"] for e in v2)


@pytest.mark.integration
def test_bench_e2e_prints_its_table_and_json(tmp_path):
    # A refresh every second, so that the run's refreshes and their keys are reported.
    result = run_cli("bench", "e2e", "--rate", "200", "--duration", "3",
                     env={"TMPDIR": str(tmp_path), "GATEWATCH_CLICKHOUSE__AGGREGATE_INTERVAL_S": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("gatewatch-bench-*")) == []  # a run without --keep leaves no data behind
    report = json.loads(result.stdout.splitlines()[-1])
    for key in ("sustained_events_per_s", "freshness_p50_s", "freshness_p99_s", "max_lag", "peak_rss_mb",
                "cpu_s_per_1000_events"):
        assert report[key] is not None, key
    assert report["events"] == 600 and report["sustained_events_per_s"] > 0
    assert "freshness p50 / p99" in result.stderr
    assert report["aggregate_refreshes"] >= 1 and report["aggregate_keys_per_event"] > 0
    assert "keys recomputed per event" in result.stderr
    by_sink = report["freshness_p99_s_by_sink"]
    assert set(by_sink) == {"clickhouse", "quota"} and max(v for v in by_sink.values() if v) == report["freshness_p99_s"]
    # Shares of the workers' wall time from the load's start (sampled each second, so a 3 s
    # load may show only the sinks' waits): each a share, together at most the whole.
    busy = report["worker_busy_by_step"]
    assert all(0 < share <= 1 for share in busy.values()) and sum(busy.values()) <= 1.05, busy


def test_full_gc_collections_are_read_from_prometheus_clients_gc_metrics():
    from ops.bench.e2e import full_gc_collections
    from ops.status import merge, parse

    text = ("# TYPE python_gc_collections_total counter\n"
            'python_gc_collections_total{generation="0"} 900.0\n'
            'python_gc_collections_total{generation="2"} 7.0\n')
    assert full_gc_collections(merge([parse(text, 0), parse(text, 0)])) == 14
    assert full_gc_collections(parse("", 0)) == 0


def test_bench_stages_names_the_slowest_stage():
    result = run_cli("bench", "stages", "--events", "300", "--repeat", "1", "--cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["clock"] == "cpu" and "CPU time" in result.stderr
    # With a broker and Redis of its own (the default), the flow's work against them too.
    assert set(report["events_per_s"]) == {"decode (Avro)", "validate", "redact", "dedupe", "window", "price",
                                           "Arrow table", "Parquet encode", "ClickHouse insert (chdb)",
                                           "ClickHouse merges (chdb)", "Kafka source", "quota (Redis)", "billing", "DLQ (bad messages)"}
    assert report["slowest"] == min(report["events_per_s"], key=report["events_per_s"].get)
    assert "<- slowest" in result.stderr
    assert report["core_stages_events_per_s"] > report["all_stages_events_per_s"] > 0


def test_bench_refresh_recomputes_each_steps_keys_and_the_aggregates_count_every_event():
    result = run_cli("bench", "refresh", "--stored-rows", "3000", "--keys", "40,300", "--orgs", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    # The second step's users include the first's, whose keys are the same (org, hour, user).
    assert [step["keys_recomputed"] for step in report["steps"]] == [40, 300]
    assert report["events_stored"] == 3000 + 2 * 40 + 2 * 300 == report["requests_in_daily_aggregates"]
    assert report["projection"]["keys_per_refresh_at_brief"] == 62_933  # 65 s of 1,000 events/s, 1 M users


def test_bench_stages_core_only_starts_no_services():
    from ops.bench.stages import CORE_STAGES

    result = run_cli("bench", "stages", "--events", "200", "--repeat", "1", "--cpu", "--core-only")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert set(report["events_per_s"]) == {*CORE_STAGES, "ClickHouse merges (chdb)"}
    assert report["core_stages_events_per_s"] > report["all_stages_events_per_s"] > 0


def test_timed_leaves_each_runs_preparation_off_the_clock():
    from ops.bench.stages import timed

    now = [0.0]
    calls = []

    def prepare():
        calls.append("prepare")
        now[0] += 100.0

    def run():
        calls.append("run")
        now[0] += 2.0 if calls.count("run") == 1 else 1.0

    assert timed(run, 2, lambda: now[0], prepare) == 1.0
    assert calls == ["prepare", "run", "prepare", "run"]


def test_the_merge_stage_leaves_every_inserted_row_in_one_merged_part_per_table(tmp_path):
    from ops.bench.stages import MERGED_TABLES, messages_for, stage_seconds
    from sinks.clickhouse import ClickHouse, close_chdb

    settings = Settings()
    seconds = stage_seconds(settings, messages_for(settings, 300, 50), 2, tmp_path / "chdb", time.process_time)
    assert seconds["ClickHouse merges (chdb)"] > 0
    try:
        clickhouse = ClickHouse(f"chdb://{tmp_path / 'chdb'}", "bench")
        for table in MERGED_TABLES:
            # Each run empties the tables: the last run's 300 rows, once each, its five parts merged into one.
            (rows, ids, parts), = clickhouse.rows(
                f"SELECT count(), uniqExact(event_id), uniqExact(_part) FROM bench.{table}")
            assert rows == ids == 300 and parts == 1, table
    finally:
        close_chdb()


@pytest.mark.integration
def test_bench_e2e_backlog_drains_every_event():
    result = run_cli("bench", "e2e", "--backlog", "2000", "--processes", "2", "--partitions", "4",
                     "--stages-sample", "200", "--flow", "ops.launch:ingest", "--chdb-settings",
                     "mark_cache_size=67108864", "--clickhouse", "chdb")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["events"] == 2000 and report["flow"] == "ops.launch:ingest"
    assert report["clickhouse"] == "chdb" and report["chdb_mapped_per_process"] == [True, True]
    assert report["clickhouse_events"] == report["valid_events"] > 0  # read back from both processes' chdb
    assert f"{report['clickhouse_events']:,} stored of" in result.stderr
    assert "server_cpu_us_per_event" not in report and "embedded chdb" in result.stderr
    assert report["full_gc_collections"] >= 0
    assert 0 < report["timed_events"] <= 2000
    for key in ("drain_events_per_s", "cpu_us_per_event", "stages_us_per_event"):
        assert report[key] > 0, key
    # The report rounds both figures to 0.1 µs and computes the ratio before rounding them.
    assert report["cpu_to_stages_ratio"] == pytest.approx(report["cpu_us_per_event"] / report["stages_us_per_event"],
                                                          rel=0.01, abs=0.01)
    assert len(report["peak_rss_mb_per_process"]) == 2 and min(report["peak_rss_mb_per_process"]) > 0
    assert "stages alone" in result.stderr
    # Both sums: the stages with the sinks, the source and the DLQ, and the core set without them.
    assert report["stages_us_per_event"] > report["stages_core_us_per_event"] > 0
    assert report["cpu_to_stages_core_ratio"] == pytest.approx(
        report["cpu_us_per_event"] / report["stages_core_us_per_event"], rel=0.01, abs=0.01)
    assert {"Kafka source", "quota (Redis)", "billing", "DLQ (bad messages)"} <= set(report["stage_us_per_event"])
    assert sum(report["stage_us_per_event"].values()) == pytest.approx(report["stages_us_per_event"], abs=0.2)
    # The flow's own steps (dataflows.step_cpu), each with the items a call was handed.
    steps = report["flow_step_us_per_event"]
    # (the Parquet files of so small a drain may wait for their age past the bench's end)
    for step in ("kafka_in", "decode", "redact", "dedupe", "windows", "event_blocks", "clickhouse_out",
                 "quota_out", "billing_out"):
        assert steps.get(step, 0) > 0, step
        assert report["flow_step_items_per_call"][step] > 0, step
    assert report["flow_steps_sum_us_per_event"] == pytest.approx(sum(steps.values()), abs=0.5)
    assert "flow decode" in result.stderr and "flow between steps" in result.stderr
    # Redis runs the quota's scripts for the drained events; the broker's share may round to 0.
    assert report["services_us_per_event"]["redis"] > 0 <= report["services_us_per_event"]["broker"]
    assert "redis CPU" in result.stderr


def test_proc_usage_reports_the_kernels_high_water_mark_not_a_sample():
    """The peak is VmHWM: a spike between two samples still counts, and it never falls."""
    from ops.bench.e2e import proc_usage

    _, rss_before, peak_before = proc_usage(os.getpid())
    spike = bytearray(64 * 1024 * 1024)  # touched pages, freed before the next sample
    spike[::4096] = b"x" * len(spike[::4096])
    del spike
    _, rss_after, peak_after = proc_usage(os.getpid())
    assert peak_before >= rss_before and peak_after >= rss_after
    assert peak_after >= peak_before
    assert peak_after >= rss_after + 48  # 64 MB were resident, then returned (mmap'd, so unmapped)
