"""`gatewatch spool status|drain` against a real broker we stop and start: the spool slots an
API pod left behind while Kafka was unreachable are delivered exactly once, each user's
events in order; a rerun sends nothing more; a slot a running producer holds is refused;
with the broker still down the drain fails and every record stays spooled."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from connectors.producer import EventProducer
from connectors.spool import DiskSpool
from ops.dev import services as svc
from ops.spool_drain import find_slots
from schemas.registry import LocalRegistry
from tests.test_producer import (_drain, assert_exactly_once, assert_ordered_per_user, consume, events,  # noqa: F401
                                 own_broker)

ROOT = Path(__file__).resolve().parent.parent


def gatewatch(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GATEWATCH_")}
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def status(directory: Path) -> dict[str, dict]:
    done = gatewatch("spool", "status", str(directory))
    assert done.returncode == 0, done.stderr
    return {line["slot"]: line for line in map(json.loads, done.stdout.splitlines())}


def drain(directory: Path, broker, topic: str, *extra: str) -> subprocess.CompletedProcess:
    return gatewatch("spool", "drain", str(directory), "--bootstrap", broker.address, "--topic", topic, *extra)


def orphan(broker, topic: str, slot: Path, sent: list[dict], durable: bool) -> None:
    """What a scaled-down API pod leaves: a producer accepts events while the broker is
    unreachable, then stops with them in its spool slot."""
    producer = EventProducer(broker.address, topic, LocalRegistry(), slot, durable=durable)
    for event in sent:
        producer.send(event)
    assert producer.close(timeout=0.5) == len(sent)


@contextlib.contextmanager
def unreachable(broker):
    broker.stop()
    try:
        yield
    finally:
        broker.start()


@pytest.fixture
def topic(own_broker) -> str:
    name = f"drain-{uuid.uuid4().hex[:8]}"
    svc.create_topics(own_broker.address, {name: 3})
    return name


def test_drain_delivers_every_orphaned_slot_once_in_user_order_and_a_rerun_sends_nothing(own_broker, topic,
                                                                                         tmp_path):
    spool_dir = tmp_path / "spool"
    first, second = events(300, users=12, seed=31), events(200, users=12, seed=32, first=300)
    with unreachable(own_broker):
        orphan(own_broker, topic, spool_dir / "w0", first, durable=True)
        orphan(own_broker, topic, spool_dir / "w1", second, durable=False)

    before = status(spool_dir)
    assert [before[slot]["records"] for slot in ("w0", "w1")] == [len(first), len(second)]
    assert all(line["bytes"] > 0 and line["oldest_age_s"] >= 0 and not line["locked"] for line in before.values())

    done = drain(spool_dir, own_broker, topic)
    assert done.returncode == 0, done.stderr
    summary = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(line["slot"], line["delivered"], line["left"]) for line in summary] == \
        [("w0", len(first), 0), ("w1", len(second), 0)]
    assert '"remaining": 0' in done.stderr  # progress lines
    messages = consume(own_broker.address, topic)
    assert_exactly_once(messages, first + second)
    assert_ordered_per_user(messages)
    assert not list(spool_dir.glob("*/*.spool"))
    assert all(line["records"] == 0 for line in status(spool_dir).values())

    again = drain(spool_dir, own_broker, topic)
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["records"] for line in again.stdout.splitlines()] == [0, 0]
    assert len(consume(own_broker.address, topic)) == len(first) + len(second)


def test_a_slot_held_by_a_running_producer_is_refused_and_the_others_drained(own_broker, topic, tmp_path):
    spool_dir = tmp_path / "spool"
    orphaned = events(100, users=5, seed=41)
    with unreachable(own_broker):
        orphan(own_broker, topic, spool_dir / "w1", orphaned, durable=True)
    running = EventProducer(own_broker.address, topic, LocalRegistry(), spool_dir / "w0")
    try:
        assert status(spool_dir)["w0"]["locked"] is True
        done = drain(spool_dir, own_broker, topic)
        assert done.returncode != 0
        assert f"spool slot {spool_dir / 'w0'} is locked by a running producer" in done.stderr
        assert [json.loads(line)["slot"] for line in done.stdout.splitlines()] == ["w1"]
        running.send(events(1, seed=42, first=100)[0])  # the running producer still owns its slot
        assert running.flush(20) == 0
    finally:
        running.close()
    assert_exactly_once(consume(own_broker.address, topic), orphaned + events(1, seed=42, first=100))


def test_with_the_broker_unreachable_the_drain_fails_and_keeps_every_record(own_broker, topic, tmp_path):
    spool_dir = tmp_path / "spool"
    sent = events(150, users=6, seed=51)
    with unreachable(own_broker):
        orphan(own_broker, topic, spool_dir / "w0", sent, durable=True)
        failed = drain(spool_dir, own_broker, topic, "--stall-timeout", "2")
        assert failed.returncode != 0
        assert f"150 of 150 records not acknowledged by {own_broker.address}" in failed.stderr
        assert "rerun the drain" in failed.stderr
        assert status(spool_dir)["w0"]["records"] == len(sent)
    done = drain(spool_dir, own_broker, topic)
    assert done.returncode == 0, done.stderr
    messages = consume(own_broker.address, topic)
    assert_exactly_once(messages, sent)
    assert_ordered_per_user(messages)


def test_slots_are_found_in_number_order_and_a_single_slot_directory_is_its_own_slot(tmp_path):
    for name in ("w10", "w2", "w0"):
        (tmp_path / "api" / name).mkdir(parents=True)
        (tmp_path / "api" / name / "LOCK").touch()
    (tmp_path / "api" / "notes").mkdir()
    assert [slot.name for slot in find_slots(tmp_path / "api")] == ["w0", "w2", "w10"]
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "00000000001000000000.spool").write_bytes(b"")
    assert find_slots(tmp_path / "one") == [tmp_path / "one"]
    with pytest.raises(FileNotFoundError, match="no spool directory"):
        find_slots(tmp_path / "missing")


def test_records_acknowledged_out_of_order_are_never_handed_out_again(tmp_path):
    """An interrupted drain: the broker acknowledged v2 and v4 (other partitions) but not v1
    and v3 before it went away. A retry and a rerun send v1 and v3 only, still in order."""
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    for i in range(6):
        spool.append(None, f"v{i}".encode(), i)
    read = [spool.read() for _ in range(5)]
    for record in (read[0], read[2], read[4]):
        spool.ack(record.handle)
    spool.restart_reading()  # a failed replay (or a closing producer) gives back what is unacknowledged
    assert spool.pending == 3
    retried = spool.read()
    assert retried.value == b"v1"
    spool.restart_reading()
    spool.close()  # the process stops: acknowledgements are checkpointed

    again = DiskSpool(tmp_path, max_bytes=1 << 20)
    assert again.pending == 3
    assert _drain(again) == [b"v1", b"v3", b"v5"]
    assert again.settle() and not list(tmp_path.glob("*.spool"))
    again.close()


def test_an_old_checkpoint_without_out_of_order_acknowledgements_still_reads(tmp_path):
    spool = DiskSpool(tmp_path, max_bytes=1 << 20)
    for i in range(3):
        spool.append(None, f"v{i}".encode(), i)
    spool.ack(spool.read().handle)
    spool.close()
    ack_file, = tmp_path.glob("*.ack")
    assert ack_file.read_text().strip().isdigit()  # one line, as before out-of-order acknowledgements were kept
    assert _drain(DiskSpool(tmp_path, max_bytes=1 << 20)) == [b"v1", b"v2"]
