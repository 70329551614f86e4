"""Where a dataflow process starts: the settings are loaded here, in the composition root,
and passed to the flow's build function (``dataflows`` never imports ``ops``).

``python -m bytewax.run ops.launch:ingest`` (or ``:feedback``) builds the flow from the
environment: JSON logs, the Prometheus backend of the metrics hook (installed by importing
``ops.metrics``), the metrics endpoint, the cluster check, a stack dump on SIGUSR1.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import signal
from datetime import date
from typing import Callable

from bytewax.dataflow import Dataflow

from dataflows.feedback import build_flow as build_feedback
from dataflows.ingest import build_flow as build_ingest
from dataflows.replay import build_flow as build_replay_flow
from ops import metrics
from ops.cluster import check_environment
from ops.logs import configure as configure_logs
from ops.settings import Settings, load_settings

# Reached through __getattr__ below: no module-level name may be called like a flow.
FLOWS: dict[str, Callable[[Settings], Dataflow]] = {"ingest": build_ingest, "feedback": build_feedback}


def build(flow: str, settings: Settings) -> Dataflow:
    """A flow of FLOWS with this process's logs configured."""
    configure_logs(settings.log_level)
    return FLOWS[flow](settings)


def build_replay(settings: Settings, first: date, last: date, region: str | None = None) -> Dataflow:
    configure_logs(settings.log_level)
    return build_replay_flow(settings, first, last, region)


def from_environment(flow: str) -> Dataflow:
    """A flow for `python -m bytewax.run`: settings from the environment, metrics served."""
    settings = load_settings()
    check_environment(settings)  # a cluster cannot write embedded chdb (ops/cluster.py says why)
    # `kill -USR1 <pid>` prints every thread's stack to the log: what a stuck flow is waiting on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if settings.metrics.port is not None:
        index = int(os.environ.get("BYTEWAX_PROCESS_ID", 0)) if settings.metrics.offset_by_process else 0
        metrics.serve(settings.metrics.port + index, settings.metrics.host)
    if settings.metrics.dump_path:
        atexit.register(metrics.dump_counters, settings.metrics.dump_path)
    return build(flow, settings)


def __getattr__(name: str) -> Dataflow:
    # Built only when bytewax.run asks for the attribute: importing this module builds nothing.
    if name in FLOWS:
        return from_environment(name)
    raise AttributeError(name)
