"""The py-spy stack categories of `bench e2e --profile-dir`: stages, the work around them, idle."""

from ops.bench.profile import category_of, summarize

ENTRY = "_run_module_as_main (<frozen runpy>:198);<module> (run.py:355);bytewax::worker::worker_main::h1 (_bytewax.so)"
STEP = ENTRY + ";timely::worker::Worker::step_or_park::h2 (_bytewax.so);bytewax::operators::FlatMapBatch::h3 (_bytewax.so)"


def test_a_sample_goes_to_its_innermost_named_frame():
    redact = STEP + ";__call__ (sinks/tracing.py:104);redact_batch (dataflows/ingest.py:90);feed (redaction/gate.py:50)"
    assert category_of(redact) == "redact"
    # A metric counted inside the redaction step is metrics, not redaction.
    assert category_of(redact + ";increment (sinks/metrics.py:40);inc (prometheus_client/metrics.py:300)") == "metrics"
    assert category_of(redact + ";gc_collect_main (libpython3.11.so)") == "gc"
    blocks = STEP + ";event_blocks (sinks/parquet.py:167);to_table (sinks/parquet.py:121);realloc (libc.so.6)"
    assert category_of(blocks) == "arrow blocks"
    assert category_of(STEP + ";write_batch (sinks/base.py:44);write_table (sinks/parquet.py:282)") == "sinks"
    assert category_of(STEP + ";next_batch (connectors/kafka_source.py:36)") == "kafka source"


def test_bytewax_own_work_idle_and_other_threads_are_told_apart():
    assert category_of(STEP + ";timely::progress::reachability::Tracker::propagate::h4 (_bytewax.so)") \
        == "bytewax/timely (rust)"
    assert category_of(ENTRY + ";std::sys_common::thread_parking::futex::Parker::park_timeout (futex.rs:1);syscall") \
        == "bytewax idle (parked)"
    assert category_of("_bootstrap (threading.py:1002);run (threading.py:982);wait (threading.py:320)") \
        == "other threads"


def test_summarize_adds_the_counts_of_each_line():
    lines = [STEP + ";decode_batch (dataflows/ingest.py:46) 7\n", STEP + ";priced (dataflows/outputs.py:240) 3\n",
             STEP + ";decode_batch (dataflows/ingest.py:50) 2\n", "\n"]
    assert summarize(lines) == {"decode/validate": 9, "price": 3}


def test_the_bench_profilers_record_a_running_python_process_until_stopped(tmp_path):
    import subprocess
    import sys
    import time

    from ops.bench.e2e import Flow, start_profilers, stop_profilers
    from ops.bench.profile import summarize_file

    busy = subprocess.Popen([sys.executable, "-c", "while True: sum(range(1000))"])
    try:
        profilers = start_profilers(Flow([busy], []), tmp_path)
        time.sleep(2)
        stop_profilers(profilers)
    finally:
        busy.kill()
        busy.wait()
    assert all(profiler.returncode is not None for profiler in profilers)
    shares = summarize_file(tmp_path / "flow-0.txt")
    # The child runs no flow: its samples are outside Bytewax's entry point (or its collections).
    assert shares.get("other threads", 0) > 0.5 and set(shares) <= {"other threads", "gc"}, (
        shares, (tmp_path / "py-spy-0.log").read_text())
