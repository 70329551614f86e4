"""Allocator settings of the processes gatewatch starts (flows, the chdb host), read by each
process when it starts: they go into the environment it is started with, and the operator's
own values win. No imports beyond the standard library: the chdb host reads them too."""

from __future__ import annotations

import os

CHDB_JEMALLOC = "dirty_decay_ms:0,muzzy_decay_ms:0"
"""Embedded ClickHouse (chdb) in a flow process allocates through its own jemalloc, which
keeps freed pages 5 s without a background thread to return them: ~100 MB more resident per
flow process after a few 5,000-row inserts (ops/bench/FINDINGS.md). Read once, when chdb
loads. The price is CPU: each freed page faults again on its next use."""

HOST_JEMALLOC = "dirty_decay_ms:100,muzzy_decay_ms:0"
"""The chdb host's jemalloc keeps freed pages 100 ms. At zero decay about half of the host's
CPU in a drain went to the kernel, ~8 page faults per event; kept 100 ms, a merge or insert
reuses what the last one freed, and the host spends ~30% less CPU per event. It peaked past
600 MB with it while each insert arrived as one ~25 MB frame copied twice; the host now
passes inserts on in pieces (sinks.chdb_host.Payload) and peaked at 445-464 MB with it
(ops/bench/FINDINGS.md, issue 17)."""

GLIBC_MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}
"""glibc's malloc in the chdb host (a flow process maps later, FLOW_ALLOCATOR_ENV):
- A fixed mmap threshold: blocks of 128 KB and more are mapped and unmapped, not left in the
  heap; glibc otherwise raises the threshold after the first large free, and later large
  blocks stay resident (~100 MB in the chdb host when it received each insert whole, one
  frame per connection thread's arena).
- Two arenas, not eight per core: librdkafka, chdb and Bytewax run dozens of threads.
Measured in ops/bench/FINDINGS.md (resident memory, fifth pass; the chdb host's allocators)."""

FLOW_ALLOCATOR_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system", **GLIBC_MALLOC_ENV,
                      "MALLOC_MMAP_THRESHOLD_": str(4 * 1024 * 1024)}
"""A flow process's allocators: Arrow on glibc's malloc, two arenas, and a fixed mmap
threshold of 4 MB. Arrow's default pool (mimalloc) kept ~140 MB resident in a flow process
whose Arrow data was under 90 MB; on glibc's malloc the freed blocks go back. At a 128 KB
threshold every working buffer of the Parquet writer and its ZSTD, of Arrow's builders and of
librdkafka's decompression was a fresh mapping, faulted in page by page on each use: ~4 faults
per event, Parquet at 8 against 5 µs per event; at 4 MB they are reused from the heap, for
~45 MB more at the peak (ops/bench/FINDINGS.md, issue 17). The largest blocks (a batch's text
columns, several MB) are still mapped and go back when freed."""

HOST_ALLOCATOR_ENV = {"JE_MALLOC_CONF": HOST_JEMALLOC, **GLIBC_MALLOC_ENV}
"""The chdb host's allocators: HOST_JEMALLOC, and GLIBC_MALLOC_ENV for its Python side."""


def malloc_report() -> dict[str, str | None]:
    """The malloc settings this process runs on, read inside it: logged at start-up so an
    operator (and a test) can see that the settings took effect."""
    return {name.lower().strip("_"): os.environ.get(name)
            for name in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "JE_MALLOC_CONF")}
