"""Bounded exponential backoff shared by every sink.

A sink that is down must never drop events: the write is retried with capped, jittered
backoff for as long as it takes. Retrying inside the write blocks the Bytewax worker,
which is the backpressure we want: the Kafka offset of an unwritten batch never advances
past a recovery snapshot.

Retries are for outages only. A failure that the same rows would cause again (``permanent``:
a value out of range, text that is not text) is not retried: ``write_isolating`` halves the
batch until the rows at fault are found, writes the others and returns those rows, which
the caller sends to the DLQ.
"""

from __future__ import annotations

import logging
import random
import time
from functools import partial
from typing import Callable, TypeVar

from sinks.metrics import get_metrics

T = TypeVar("T")
log = logging.getLogger(__name__)


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
    give_up_on: Callable[[BaseException], bool] | None = None,
) -> T:
    """Run write() until it succeeds; every failure is logged, counted and waited out,
    except one that ``give_up_on`` calls permanent, which is raised at once."""
    attempt = 0
    labels = {"sink": sink}
    for delay in backoff_delays(initial_backoff_s, max_backoff_s):
        attempt += 1
        started = time.perf_counter()
        try:
            result = write()
        except retry_on as exc:
            get_metrics().increment("gatewatch_sink_errors", tags=labels)
            if give_up_on is not None and give_up_on(exc):
                raise
            get_metrics().gauge("gatewatch_sink_up", 0, tags=labels)
            if max_attempts is not None and attempt >= max_attempts:
                raise
            log.warning("sink write failed, retrying", extra={"sink": sink, "attempt": attempt,
                        "retry_in_s": round(delay, 2), "error": f"{type(exc).__name__}: {exc}"})
            get_metrics().increment("gatewatch_sink_retries", tags=labels)
            time.sleep(delay)
            continue
        get_metrics().timing("gatewatch_sink_write_seconds", time.perf_counter() - started, tags=labels)
        get_metrics().gauge("gatewatch_sink_up", 1, tags=labels)
        return result
    raise AssertionError("unreachable")


# Errors of the rows themselves, raised before anything is sent (Arrow conversion, text
# encoding): the same rows fail again however long one waits.
PERMANENT_ROW_ERRORS: tuple[type[BaseException], ...] = (OverflowError, TypeError, UnicodeError)


def row_error(exc: BaseException) -> bool:
    """True for an error the rows cause (see PERMANENT_ROW_ERRORS, Arrow's invalid data)."""
    if isinstance(exc, PERMANENT_ROW_ERRORS):
        return True
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        return False
    return isinstance(exc, (pa.ArrowInvalid, pa.ArrowTypeError))


def write_isolating(sink: str, write: Callable[[list], object], rows: list, retry: Callable[..., object],
                    permanent: Callable[[BaseException], bool] = row_error) -> list[tuple[object, BaseException]]:
    """write(rows) with retries for outages; rows that fail for a permanent reason are
    found by halving the batch and returned with their error, the rest written."""
    rejected: list[tuple[object, BaseException]] = []

    def attempt(part: list) -> None:
        try:
            retry(sink, lambda: write(part), give_up_on=permanent)
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not permanent(exc):
                raise
            if len(part) == 1:
                rejected.append((part[0], exc))
                return
            middle = len(part) // 2
            attempt(part[:middle])
            attempt(part[middle:])

    attempt(rows)
    return rejected


Retry = Callable[..., T]
"""``retry(sink, write, **options)``: write_with_retries with the configured backoff bound in."""


def retry_policy(initial_backoff_s: float, max_backoff_s: float) -> Retry:
    """The retry every sink of one flow writes under (the settings' ``retry`` section)."""
    return partial(write_with_retries, initial_backoff_s=initial_backoff_s, max_backoff_s=max_backoff_s)
