"""Orphaned producer spools: what they hold, and sending it to Kafka.

An API pod removed by the autoscaler while Kafka was unreachable leaves its spool slots
(``<api.spool_dir>/w<N>``) on a retained volume. `gatewatch spool status|drain` read them
from wherever that volume is mounted. A drain opens an EventProducer on each slot in
turn: the producer replays a spool it finds at start-up (oldest first, so each user's
events keep their order) and deletes segments once the broker acknowledged every record,
so the drain has no delivery code of its own. A slot whose lock is held belongs to a
running producer and is refused, never read behind its back.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from connectors.spool import SEGMENT_SUFFIX, DiskSpool

IN_USE = "used by another producer"


class SlotInUse(RuntimeError):
    """The slot's lock is held: a running producer owns it."""


@dataclass
class SlotStatus:
    slot: str
    path: str
    locked: bool
    records: int | None
    """Records not yet acknowledged (None when locked: counting would need the lock)."""
    bytes: int
    oldest_age_s: float | None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DrainResult:
    slot: str
    records: int
    delivered: int
    left: int

    def as_dict(self) -> dict:
        return asdict(self)


def _natural(path: Path) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))


def _is_slot(path: Path) -> bool:
    return path.is_dir() and ((path / "LOCK").exists() or any(path.glob(f"*{SEGMENT_SUFFIX}")))


def find_slots(directory: Path) -> list[Path]:
    """The spool slots under ``directory`` (w0, w1, ... w10 in number order), or the
    directory itself when it is one slot."""
    if not directory.is_dir():
        raise FileNotFoundError(f"no spool directory {directory}")
    if any(directory.glob(f"*{SEGMENT_SUFFIX}")):
        return [directory]
    return sorted((child for child in directory.iterdir() if _is_slot(child)), key=_natural)


def _segment_bytes(slot: Path) -> int:
    return sum(path.stat().st_size for path in slot.glob(f"*{SEGMENT_SUFFIX}"))


def _in_use(slot: Path) -> SlotInUse:
    return SlotInUse(f"spool slot {slot} is locked by a running producer; stop it (or let it send its own "
                     "spool) before draining this slot")


def open_slot(slot: Path, max_bytes: int) -> DiskSpool:
    try:
        return DiskSpool(slot, max_bytes)
    except RuntimeError as exc:
        if IN_USE in str(exc):
            raise _in_use(slot) from None
        raise


def slot_status(slot: Path, now_ms: int | None = None) -> SlotStatus:
    """Records, bytes and the age of the oldest record of one slot; a locked slot is
    reported with its file size only."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    try:
        spool = open_slot(slot, max_bytes=1 << 62)
    except SlotInUse:
        return SlotStatus(slot.name, str(slot), True, None, _segment_bytes(slot), None)
    try:
        oldest = spool.read()
        age = None if oldest is None else max(0.0, (now_ms - oldest.sent_ms) / 1000)
        return SlotStatus(slot.name, str(slot), False, spool.pending, spool.bytes, age)
    finally:
        spool.close()


def spool_status(directory: Path) -> Iterator[SlotStatus]:
    for slot in find_slots(directory):
        yield slot_status(slot)


def drain_slot(slot: Path, open_producer: Callable[[Path], object], *, stall_timeout_s: float,
               progress: Callable[[dict], None] = lambda _: None, progress_every_s: float = 1.0) -> DrainResult:
    """Deliver every record of one slot through an EventProducer opened on it
    (``open_producer(slot)``), until all are acknowledged or nothing was acknowledged for
    ``stall_timeout_s`` seconds. What is not acknowledged stays in the slot, acknowledged
    records are removed (or checkpointed) when the producer closes, so a rerun goes on
    from there. Raises SlotInUse for a slot a running producer holds."""
    try:
        producer = open_producer(slot)
    except RuntimeError as exc:
        if IN_USE in str(exc):
            raise _in_use(slot) from None
        raise
    records = producer.pending()
    remaining = records
    try:
        last_progress = last_report = time.monotonic()
        while remaining:
            now_remaining = producer.flush(min(progress_every_s, stall_timeout_s))
            now = time.monotonic()
            if now_remaining < remaining:
                last_progress = now
            remaining = now_remaining
            if now - last_report >= progress_every_s or not remaining:
                last_report = now
                progress({"slot": slot.name, "records": records, "delivered": records - remaining,
                          "remaining": remaining})
            if remaining and now - last_progress >= stall_timeout_s:
                break
    finally:
        left = producer.close(timeout=0)
    return DrainResult(slot.name, records, records - left, left)
