"""Bytewax's KafkaSource, resting a moment after a poll that found nothing, optionally
reading a subset of the partitions, and failing with a clear error when the broker cannot
be reached (Bytewax's own partition listing waits for it forever).

Bytewax polls each partition with a 1 ms timeout in a tight loop, so a caught-up flow
keeps a core busy (and the broker answering) doing nothing. A partition whose last poll
came back empty asks to be woken idle_wait_s later instead; under load every poll has
messages and nothing waits.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import NamedTuple

from bytewax.connectors.kafka import KafkaError, KafkaSource
from bytewax.inputs import StatefulSourcePartition
from confluent_kafka import KafkaError as ConfluentKafkaError, KafkaException
from confluent_kafka.admin import AdminClient


class _RestingPartition(StatefulSourcePartition):
    """In a cluster, while the cluster-wide frontier lags an epoch behind (backpressure),
    Bytewax 0.21.1 polls no partition and does not refresh next_awake either, so it
    reschedules the input at once, every step: a process waiting on a stuck peer spins a
    core in timely (bytewax src/inputs.rs, `partitioned_input`). Nothing a partition
    returns changes that; ops/cluster.py removes the known cause of stuck peers."""

    def __init__(self, inner: StatefulSourcePartition, idle_wait: timedelta):
        self._inner = inner
        self._idle_wait = idle_wait
        self._awake: datetime | None = None

    def next_batch(self):
        batch = lean_batch(self._inner)
        self._awake = None if batch else datetime.now(timezone.utc) + self._idle_wait
        return batch

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self):
        return self._inner.snapshot()

    def close(self) -> None:
        self._inner.close()


class SourceMessage(NamedTuple):
    """A consumed message: the fields of Bytewax's KafkaSourceMessage, built positionally."""

    key: bytes | None
    value: bytes | None
    topic: str
    headers: list
    latency: float | None
    offset: int
    partition: int
    timestamp: tuple[int, int]


def lean_batch(part) -> list:
    """Bytewax 0.21.1's _KafkaSourcePartition.next_batch (the version pyproject pins), with
    each message a SourceMessage: its KafkaSourceMessage dataclass, built from keywords, took
    1.9 µs per message and this tuple 0.4."""
    if part._eof:
        raise StopIteration()
    batch = []
    last_offset = None
    for msg in part._consumer.consume(part._batch_size, 0.001):
        error = msg.error()
        if error is not None:
            if error.code() == ConfluentKafkaError._PARTITION_EOF:
                part._eof = True  # StopIteration at the next call, after this batch
                break
            if part._raise_on_errors:
                raise RuntimeError(f"error consuming from Kafka topic `{part._topic!r}`: {error}")
        headers = msg.headers()
        message = SourceMessage(msg.key(), msg.value(), msg.topic(), [] if headers is None else headers, msg.latency(),
                                msg.offset(), msg.partition(), msg.timestamp())
        batch.append(message if error is None else KafkaError(error, message))
        last_offset = message.offset
    if last_offset is not None:
        part._offset = last_offset + 1  # the snapshot: resume after this message
    return batch


PREFETCH_LIMITS = {"queued.max.messages.kbytes": "8192", "queued.min.messages": "5000"}
"""librdkafka's consumer prefetches up to 64 MB or 100,000 messages per consumer by default,
and Bytewax opens one consumer per partition: a backlog of ~3 KB events filled ~130 MB of a
two-partition process before the flow had read it (ops/bench/FINDINGS.md). 8 MB per
partition is still several of the source's 1,000-message batches ahead. kafka.extra
overrides either."""


class RestingKafkaSource(KafkaSource):
    """only_partitions, when given, restricts every topic to those partition numbers."""

    def __init__(self, *args, idle_wait_s: float = 0.05, only_partitions: list[int] | None = None,
                 list_timeout_s: float = 30.0, **kwargs):
        super().__init__(*args, **kwargs)
        # The partition listing's admin client takes no consumer properties (librdkafka warns).
        self._admin_config = dict(self._add_config)
        self._add_config = {**PREFETCH_LIMITS, **self._add_config}
        self._idle_wait = timedelta(seconds=idle_wait_s)
        self._only = None if only_partitions is None else set(only_partitions)
        self._list_timeout_s = list_timeout_s

    def list_parts(self) -> list[str]:
        brokers = ",".join(self._brokers)
        client = AdminClient({"bootstrap.servers": brokers, **self._admin_config})
        parts = []
        for topic in self._topics:
            try:
                found = client.list_topics(topic, timeout=self._list_timeout_s).topics[topic]
            except KafkaException as exc:
                raise RuntimeError(f"cannot list the partitions of Kafka topic {topic!r} on {brokers} within "
                                   f"{self._list_timeout_s:g} s: {exc.args[0].str()} (is kafka.bootstrap right?)"
                                   ) from None
            if found.error is not None:
                raise RuntimeError(f"cannot list the partitions of Kafka topic {topic!r} on {brokers}: "
                                   f"{found.error.str()}")
            # Bytewax names a part "<partition>-<topic>".
            parts.extend(f"{index}-{topic}" for index in found.partitions
                         if self._only is None or index in self._only)
        return parts

    def build_part(self, step_id: str, for_part: str, resume_state):
        return _RestingPartition(super().build_part(step_id, for_part, resume_state), self._idle_wait)
