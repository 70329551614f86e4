"""Where a flow process spends its samples: py-spy's collapsed stacks (`--format raw`, one
"frame;frame;... count" line per distinct stack) split into the pipeline's stages and the
work around them (Bytewax's own Rust, the Kafka source, metrics, logging, GC).

A sample goes to the category of its innermost frame that names one, so a metric counted
inside the redaction step is metrics and a collection inside any step is GC; a sample with
no Python frame of ours below Bytewax's entry point is Bytewax's own work."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    # Checked in this order against each frame, innermost frame first.
    ("gc", ("gc_collect", "collect_with_callback")),
    ("metrics", ("prometheus_client/", "sinks/metrics.py", "socketserver.py", "wsgiref/")),
    ("logging", ("logging/", "ops/logs.py")),
    ("decode/validate", ("decode_batch (", "schemas/codec.py", "schemas/avro_reader.py", "<avro reader",
                         "schemas/rules.py", "fastavro")),
    ("redact", ("redaction/", "redact_batch (", "redact_dlq_payload (", "schemas/dlq.py")),
    ("dedupe/windows", ("dataflows/state.py", "first_sightings (", "unkeyed (")),
    ("price", ("schemas/pricing.py", "priced (", "priced_table (", "nanos (", "decimal_array (")),
    ("arrow blocks", ("event_blocks (", "to_table (")),
    ("sinks", ("sinks/", "chdb/", "pyarrow/parquet", "redis/")),
    ("kafka source", ("connectors/kafka", "kafka_source.py", "rd_kafka")),
    ("flow glue (python)", ("dataflows/", "bytewax/operators/", "bytewax/")),
    ("tracing", ("opentelemetry/",)),
]
ENTRY = "<module> (run.py"
PYTHON_FRAME = re.compile(r"\.py:\d+\)|<frozen |<avro ")


def category_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(needle in frame for needle in needles):
                return name
        if frame.startswith(ENTRY):
            break
    below_entry = [f for f in frames if f.startswith(ENTRY)]
    if not below_entry:
        return "other threads"
    if any(PYTHON_FRAME.search(f) for f in frames[frames.index(below_entry[0]) + 1:]):
        return "other python"
    if any("Parker::park" in f for f in frames):
        return "bytewax idle (parked)"
    return "bytewax/timely (rust)"


def summarize(lines) -> Counter[str]:
    """Samples per category of py-spy raw output lines."""
    counts: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            counts[category_of(stack)] += int(count)
    return counts


def summarize_file(path: Path) -> dict[str, float]:
    """Share of the samples per category, largest first; {} when py-spy wrote nothing."""
    if not path.exists():
        return {}
    with open(path) as handle:
        counts = summarize(handle)
    total = sum(counts.values())
    return {name: round(count / total, 3) for name, count in counts.most_common()} if total else {}
