"""Usage aggregates catch up with a burst's last events while the flow runs on and nothing
more arrives (the brief's "usage visible within 2 minutes"): no later batch starts the
refresh that is due, the ClickHouse batcher's quiet tick does."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from ops.chdb_host import start_host
from ops.dev.demo import produce
from ops.dev.loadgen import generate
from ops.dev.services import free_port
from ops.launch import flow_command
from ops.settings import load_settings
from schemas.codec import EventCodec
from schemas.registry import registry_from_settings
from sinks.clickhouse import ClickHouse
from tests.test_sink_faults import stacks, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

INTERVAL_S = 6


def test_a_bursts_last_events_reach_the_aggregates_with_nothing_after_them(kafka_bootstrap, flow_topics_env,
                                                                             tmp_path):
    host = start_host(f"chdb://{tmp_path / 'chdb'}", tmp_path / "host.sock", tmp_path / "host.log",
                      metrics_port=free_port())
    database = f"quiet_{uuid.uuid4().hex[:6]}"
    env = {**os.environ, **flow_topics_env(partitions=2), "GATEWATCH_KAFKA__TAIL": "true",
           "GATEWATCH_SINKS": "clickhouse,dlq", "GATEWATCH_CLICKHOUSE__URL": host.url,
           "GATEWATCH_CLICKHOUSE__DATABASE": database, "GATEWATCH_CLICKHOUSE__MAX_AGE_S": "0.2",
           "GATEWATCH_CLICKHOUSE__AGGREGATE_INTERVAL_S": str(INTERVAL_S),
           "GATEWATCH_METRICS__PORT": str(free_port())}
    settings = load_settings(environ=env, use_service_state=False)
    codec = EventCodec(registry_from_settings(settings.schemas), settings.validation)
    clickhouse = ClickHouse(host.url, database)

    def requests() -> int:
        return clickhouse.rows(f"SELECT sum(requests) FROM {database}.usage_daily FINAL")[0][0] or 0

    flow = subprocess.Popen(flow_command(), env=env, stdout=open(tmp_path / "flow.log", "wb"),
                            stderr=subprocess.STDOUT)
    try:
        stored = 0
        for seed in (1, 2):
            # The second burst lands well within an interval of the refresh that showed the
            # first: only a timer can start the refresh that covers it.
            burst = produce(kafka_bootstrap, settings.kafka.events_topic,
                            generate(codec, 300, 0.0, 0.0, users=20, seed=seed), 300)
            stored += burst.valid
            wait_until(lambda: requests() == stored, 60 + 3 * INTERVAL_S,
                       lambda: f"aggregates hold {requests()} of {stored} requests with the flow running\n"
                               f"{stacks(flow, tmp_path / 'flow.log')}")
        assert flow.poll() is None, "the flow stopped: its closing refresh is not what this test checks"
    finally:
        flow.terminate()
        flow.wait(30)
        host.stop()
