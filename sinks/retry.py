"""Bounded exponential backoff shared by every sink.

A sink that is down must never drop events: the write is retried with capped, jittered
backoff for as long as it takes. Retrying inside the write blocks the Bytewax worker,
which is the backpressure we want: the Kafka offset of an unwritten batch never advances
past a recovery snapshot.
"""

from __future__ import annotations

import random
import time
from typing import Callable, TypeVar

from ops import metrics
from ops.logs import get_logger

T = TypeVar("T")
log = get_logger(__name__)


def backoff_delays(initial_s: float = 0.2, max_s: float = 30.0, factor: float = 2.0):
    """Endless delays: initial_s, growing by factor, capped at max_s, each with full jitter."""
    delay = initial_s
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(max_s, delay * factor)


def write_with_retries(
    sink: str,
    write: Callable[[], T],
    retry_on: tuple[type[BaseException], ...] = (Exception,),
    initial_backoff_s: float = 0.2,
    max_backoff_s: float = 30.0,
    max_attempts: int | None = None,
) -> T:
    """Run write() until it succeeds; every failure is logged, counted and waited out."""
    attempt = 0
    for delay in backoff_delays(initial_backoff_s, max_backoff_s):
        attempt += 1
        started = time.perf_counter()
        try:
            result = write()
        except retry_on as exc:
            metrics.SINK_ERRORS.labels(sink=sink).inc()
            metrics.SINK_UP.labels(sink=sink).set(0)
            if max_attempts is not None and attempt >= max_attempts:
                raise
            log.warning("sink write failed, retrying", extra={"sink": sink, "attempt": attempt,
                        "retry_in_s": round(delay, 2), "error": f"{type(exc).__name__}: {exc}"})
            metrics.SINK_RETRIES.labels(sink=sink).inc()
            time.sleep(delay)
            continue
        metrics.SINK_WRITE_SECONDS.labels(sink=sink).observe(time.perf_counter() - started)
        metrics.SINK_UP.labels(sink=sink).set(1)
        return result
    raise AssertionError("unreachable")
