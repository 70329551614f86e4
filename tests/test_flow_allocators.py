"""A flow process started the way gatewatch starts one (ops.launch's command line and
process_env) runs on the allocators ops.launch gives it: read inside the process, from the
line it logs at start-up."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from ops.launch import FLOW_ALLOCATOR_ENV, flow_command, process_env
from tests.processes import REPO


def allocators_logged(tmp_path, env: dict[str, str]) -> dict:
    log_path = tmp_path / "flow.log"
    with open(log_path, "wb") as log:
        finished = subprocess.run(flow_command("ingest"), env=process_env(env), cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=240)
    text = log_path.read_text(errors="replace")
    assert finished.returncode == 0, text[-3000:]
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{") and '"allocators"' in line]
    assert lines, f"the flow logged no allocators line:\n{text[-3000:]}"
    return lines[0]


def flow_env(tmp_path, topics: dict[str, str], **extra: str) -> dict[str, str]:
    inherited = {name: value for name, value in os.environ.items()
                 if name not in FLOW_ALLOCATOR_ENV and name != "JE_MALLOC_CONF"}
    return {**inherited, **topics, "GATEWATCH_SINKS": "parquet,clickhouse,dlq", "GATEWATCH_LOG_LEVEL": "INFO",
            "GATEWATCH_PARQUET__ROOT": str(tmp_path / "raw"),
            "GATEWATCH_CLICKHOUSE__URL": f"chdb://{tmp_path / 'chdb'}",
            "GATEWATCH_DLQ__SPOOL_PATH": str(tmp_path / "dlq-spool.jsonl"), **extra}


@pytest.mark.integration
def test_a_flow_process_runs_on_the_allocators_ops_launch_gives_it(flow_topics_env, tmp_path):
    report = allocators_logged(tmp_path, flow_env(tmp_path, flow_topics_env(1)))
    assert report["arrow_pool"] == "system"  # pyarrow's own answer, not our variable read back
    assert report["malloc_arena_max"] == "2" and report["malloc_mmap_threshold"] == str(4 * 1024 * 1024)
    assert report["je_malloc_conf"] == "dirty_decay_ms:0,muzzy_decay_ms:0"


@pytest.mark.integration
def test_the_operators_allocator_settings_win(flow_topics_env, tmp_path):
    report = allocators_logged(tmp_path, flow_env(tmp_path, flow_topics_env(1), ARROW_DEFAULT_MEMORY_POOL="mimalloc",
                                                  MALLOC_ARENA_MAX="4"))
    assert report["arrow_pool"] == "mimalloc" and report["malloc_arena_max"] == "4"
