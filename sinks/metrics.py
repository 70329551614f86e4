"""The metrics hook of the lower packages (``sinks``, ``connectors``), in the manner of
getsentry/arroyo's ``configure_metrics``: they report through ``get_metrics()`` and never
import a metrics library or ``ops``. ``ops.metrics`` (the composition root) installs the
Prometheus backend when it is imported; until then every call is a no-op, so a sink used
on its own needs no set-up.

Names are the full Prometheus metric names (``gatewatch_sink_errors``) and tags their
labels, so the exported series are exactly the ones the backend registered.
"""

from __future__ import annotations

import time
from typing import Iterable, Mapping, Protocol


class Metrics(Protocol):
    def increment(self, name: str, value: float = 1, tags: Mapping[str, str] | None = None) -> None: ...

    def gauge(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None: ...

    def timing(self, name: str, seconds: float, tags: Mapping[str, str] | None = None) -> None: ...

    def timings(self, name: str, seconds: Iterable[float], tags: Mapping[str, str] | None = None) -> None:
        """Many observations of one series (a batch's freshness): its labels looked up once."""
        ...


class NoOpMetrics:
    def increment(self, name: str, value: float = 1, tags: Mapping[str, str] | None = None) -> None:
        pass

    def gauge(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        pass

    def timing(self, name: str, seconds: float, tags: Mapping[str, str] | None = None) -> None:
        pass

    def timings(self, name: str, seconds: Iterable[float], tags: Mapping[str, str] | None = None) -> None:
        pass


_backend: Metrics = NoOpMetrics()


def configure_metrics(backend: Metrics) -> None:
    """Install the backend every later report goes to (once, at start-up)."""
    global _backend
    _backend = backend


def get_metrics() -> Metrics:
    return _backend


# -- what every sink reports ---------------------------------------------------------------

def count_written(sink: str, rows: int) -> None:
    get_metrics().increment("gatewatch_sink_rows", rows, tags={"sink": sink})


def observe_refresh(keys: int, seconds: float) -> None:
    """One aggregate refresh that recomputed keys: how many (org, hour, user), in how long."""
    get_metrics().increment("gatewatch_aggregate_keys", keys)
    get_metrics().timing("gatewatch_aggregate_refresh_seconds", seconds)


def observe_freshness(sink: str, times_ms: list[int], lateness_s: float) -> None:
    """Seconds from event time (or window end) until the sink acknowledged the write.

    Events the gateway sent later than the allowed lateness are counted as late events
    instead: their age says nothing about the pipeline's own delay."""
    now_ms = time.time() * 1000
    # A row without a time (refused for it: sinks.clickhouse.NullInRequiredColumn) has no age.
    ages_s = (max(0.0, (now_ms - at_ms) / 1000) for at_ms in times_ms if at_ms is not None)
    get_metrics().timings("gatewatch_freshness_seconds", [age for age in ages_s if age <= lateness_s],
                          tags={"sink": sink})
