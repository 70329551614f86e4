"""`gatewatch serve` acknowledges only durable events: a 2xx survives a SIGKILL of the
server (the restarted server delivers it), and a spool that cannot store an event makes
the request a 503 with Retry-After, never a silent drop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
import uuid

import httpx
import orjson
import pytest

from connectors.ingest_api.app import ApiConfig, IngestApp
from connectors.ingest_api.keys import ApiKeyStore
from connectors.producer import EventProducer
from connectors.spool import DiskSpool
from ops.dev import services as svc
from schemas.registry import LocalRegistry
from tests.test_ingest_api import Server, _event, _wait_for
from tests.test_producer import events, own_broker  # noqa: F401 (fixture)


@contextlib.contextmanager
def _silent_broker():
    """A port that accepts connections and never answers: librdkafka keeps events in memory,
    waiting, without seeing the broker as down (what a non-durable server loses on a crash)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def _open_when_released(directory, timeout: float = 20) -> DiskSpool:
    """The spool once the killed worker process is gone (its lock goes with it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return DiskSpool(directory, 1 << 30)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.integration
@pytest.mark.parametrize("outage", ["stopped", "silent"])
def test_events_acknowledged_before_a_sigkill_are_delivered_by_the_restarted_server(own_broker, tmp_path, outage):
    topic = f"api-kill-{uuid.uuid4().hex[:8]}"
    svc.create_topics(own_broker.address, {topic: 2})
    env = {"GATEWATCH_KAFKA__BOOTSTRAP": own_broker.address, "GATEWATCH_KAFKA__EVENTS_TOPIC": topic}
    acknowledged: set[str] = set()
    with _silent_broker() as silent:
        server = Server(tmp_path, env if outage == "stopped" else {**env, "GATEWATCH_KAFKA__BOOTSTRAP": silent})
        try:
            headers = {"Authorization": f"Bearer {server.create_key('acme', 'us')}"}
            if outage == "stopped":
                own_broker.stop()  # from now on the spool is the only place an accepted event can be
            for batch in range(5):
                sent = events(40, users=6, seed=batch, first=batch * 40)
                response = httpx.post(f"{server.url}/v1/events", json=sent, headers=headers, timeout=30)
                assert response.status_code == 200, response.text
                assert response.json()["accepted"] == len(sent)
                acknowledged |= {event["event_id"] for event in sent}
            os.killpg(server.proc.pid, signal.SIGKILL)  # right after the last 2xx: no shutdown, no flush
            server.proc.wait(20)
        finally:
            server.stop()
            if outage == "stopped":
                own_broker.start()

    spool = _open_when_released(tmp_path / "spool" / "w0")  # the killed worker's slot
    try:
        assert spool.pending == len(acknowledged), "every acknowledged event is in the killed server's spool"
    finally:
        spool.close()

    restarted = Server(tmp_path, env)  # takes the free slot w0 and replays it to the real broker
    try:
        found = _wait_for(own_broker.address, topic, acknowledged, timeout=60)
    finally:
        restarted.stop()
    missing = acknowledged - set(found)
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged events never reached Kafka"
    assert {copy["org_id"] for copies in found.values() for copy in copies} == {"acme"}


def _post(app: IngestApp, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, bytes]:
    """One request through the ASGI app, in process."""
    sent: list[dict] = []
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {"type": "http", "method": "POST", "path": path, "headers": raw}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = sent[0]
    return (start["status"], {k.decode(): v.decode() for k, v in start["headers"]},
            b"".join(m.get("body", b"") for m in sent[1:]))


def test_a_full_durable_spool_is_a_503_with_retry_after_and_stores_none_of_the_request(tmp_path):
    """A broker that is not there and a spool of a few events: the request that does not fit
    is refused (503, Retry-After) and none of its events is stored; what fitted stays."""
    producer = EventProducer("127.0.0.1:1", "t", LocalRegistry(), tmp_path / "spool", durable=True,
                             max_spool_bytes=4096)
    keys = ApiKeyStore(tmp_path / "keys.sqlite")
    key, _ = keys.create("acme")
    app = IngestApp(lambda: producer, keys, ApiConfig(retry_after_s=3, spool_high_water=1.0))
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    try:
        status, _headers, body = _post(app, "/v1/events", orjson.dumps([_event(i) for i in range(3)]), headers)
        assert status == 200 and orjson.loads(body)["accepted"] == 3
        status, response_headers, body = _post(app, "/v1/events", orjson.dumps([_event(i) for i in range(100)]),
                                               headers)
        assert status == 503, body
        assert response_headers["retry-after"] == "3"
        assert b"retry later" in body
        assert producer.spool.pending == 3
        assert producer.counts["dropped"] == 0
    finally:
        producer.close(0)
