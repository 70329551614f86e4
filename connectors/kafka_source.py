"""Bytewax's KafkaSource, resting a moment after a poll that found nothing, and optionally
reading a subset of the partitions.

Bytewax polls each partition with a 1 ms timeout in a tight loop, so a caught-up flow
keeps a core busy (and the broker answering) doing nothing. A partition whose last poll
came back empty asks to be woken idle_wait_s later instead; under load every poll has
messages and nothing waits.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from bytewax.connectors.kafka import KafkaSource
from bytewax.inputs import StatefulSourcePartition


class _RestingPartition(StatefulSourcePartition):
    def __init__(self, inner: StatefulSourcePartition, idle_wait: timedelta):
        self._inner = inner
        self._idle_wait = idle_wait
        self._awake: datetime | None = None

    def next_batch(self):
        batch = self._inner.next_batch()
        self._awake = None if batch else datetime.now(timezone.utc) + self._idle_wait
        return batch

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self):
        return self._inner.snapshot()

    def close(self) -> None:
        self._inner.close()


class RestingKafkaSource(KafkaSource):
    """only_partitions, when given, restricts every topic to those partition numbers."""

    def __init__(self, *args, idle_wait_s: float = 0.05, only_partitions: list[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._idle_wait = timedelta(seconds=idle_wait_s)
        self._only = None if only_partitions is None else set(only_partitions)

    def list_parts(self) -> list[str]:
        parts = super().list_parts()
        # Bytewax names a part "<partition>-<topic>".
        return parts if self._only is None else [p for p in parts if int(p.split("-", 1)[0]) in self._only]

    def build_part(self, step_id: str, for_part: str, resume_state):
        return _RestingPartition(super().build_part(step_id, for_part, resume_state), self._idle_wait)
