"""The producer's disk spool: a bounded FIFO of (key, value) records in append-only,
CRC-framed segment files that survives a process restart.

Records are appended at the tail (or written as a new segment before every other one by
``prepend``), read oldest first and acknowledged in any order; a segment file is deleted
once it is sealed, read to its end and fully acknowledged. Each segment's acknowledged
offset is checkpointed to a small ``.ack`` file, with the records acknowledged out of order
beyond it, so a restarted reader resumes after it and never hands an acknowledged record out again.

Durability: ``append`` (``append_many``: a batch) writes to the kernel with one unbuffered
``write()``, so a record survives the death of the process as soon as that returns; it survives
a power loss only after ``sync()`` (the producer calls it every ``fsync_interval_s``, or
on every send with ``fsync_each_send``). ``prepend`` and ``close`` always fsync.

A durable producer appends every event and reads it back right away to produce it: reading
the file back (frame header, CRC, slices) cost more than the append. So appended records
also stay in memory, up to ``UNREAD_CACHE_BYTES``, until they are read once; read() takes
them from there. The file stays the record of truth: anything not in that cache (read
before, after a restart, or appended while it was full) is read from disk."""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("gatewatch.producer")

FRAME = struct.Struct(">IIqi")  # crc32, body length, send time ms, key length (-1: no key)
_HEADER_HEAD = struct.Struct(">II")  # FRAME in two parts: the CRC covers the tail, not the head
_HEADER_TAIL = struct.Struct(">qi")
SEGMENT_SUFFIX = ".spool"
ACK_SUFFIX = ".ack"
FIRST_SEQ = 10**12
READ_AHEAD = 1 << 20
UNREAD_CACHE_BYTES = 16 << 20


# -- the disk spool ---------------------------------------------------------------------

@dataclass
class _Segment:
    seq: int
    path: Path
    size: int = 0
    acked: int = 0
    """Byte offset below which every record is acknowledged (persisted in the .ack file)."""
    sealed: bool = True
    outstanding: collections.deque = field(default_factory=collections.deque)
    """(start, end) of records read but not yet acknowledged, in read order."""
    done: set = field(default_factory=set)
    """Starts of acknowledged records that are not yet at the head of ``outstanding``."""
    acked_ahead: set = field(default_factory=set)
    """Starts of records beyond ``acked`` acknowledged out of order before a restart_reading
    or a restart (kept in the .ack file): read() never hands them out again."""
    pending: int = 0
    """Records not yet acknowledged (read or not)."""
    unread: dict = field(default_factory=dict)
    """Start offset -> SpoolRecord of records appended by this process and not yet read:
    read() takes them from here instead of reading the file back (see DiskSpool)."""
    unread_bytes: int = 0

    @property
    def ack_path(self) -> Path:
        return self.path.with_suffix(ACK_SUFFIX)


class _ReadAhead:
    """A segment file read forward in READ_AHEAD chunks: one read() syscall for many records
    (seek + read per header and per body cost more than the rest of a replay). Bytes once
    written never change, so a chunk stays valid while the writer appends behind it."""

    def __init__(self, path: Path):
        self._file = open(path, "rb", buffering=0)
        self._chunk = b""
        self._chunk_at = 0
        self._position = 0

    def seek(self, position: int) -> None:
        self._position = position

    def read(self, size: int) -> bytes:
        start = self._position - self._chunk_at
        if start < 0 or start + size > len(self._chunk):
            self._file.seek(self._position)
            self._chunk, self._chunk_at, start = self._file.read(max(size, READ_AHEAD)), self._position, 0
        data = self._chunk[start:start + size]
        self._position += len(data)
        return data

    def close(self) -> None:
        self._file.close()


class SpoolRecord(NamedTuple):
    """One record read back (a tuple: a frozen dataclass costs a microsecond per record to build)."""
    handle: tuple[int, int, int]
    """(segment seq, start offset, end offset)."""
    key: bytes | None
    value: bytes
    sent_ms: int


class DiskSpool:
    """FIFO of (key, value) records in append-only segment files, bounded in bytes.

    Not thread-safe: EventProducer serialises access with its lock. Records are read in
    order, acknowledged in any order; a segment is deleted once sealed, read to its end
    and fully acknowledged. A torn record at the end of a segment (crash mid-write) ends
    that segment."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int, segment_bytes: int = 8 << 20):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self._lock_file = open(self.directory / "LOCK", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise RuntimeError(f"spool directory {self.directory} is used by another producer; "
                               "give each producer process its own spool_dir") from None
        self.segments: list[_Segment] = []
        self.corrupt = 0
        for path in sorted(self.directory.glob(f"*{SEGMENT_SUFFIX}")):
            try:
                seq = int(path.stem)
            except ValueError:
                continue
            segment = _Segment(seq, path, size=path.stat().st_size)
            self._load_checkpoint(segment)
            self.segments.append(segment)
        self.segments.sort(key=lambda s: s.seq)
        for ack in self.directory.glob(f"*{ACK_SUFFIX}"):
            if not ack.with_suffix(SEGMENT_SUFFIX).exists():
                ack.unlink(missing_ok=True)
        for segment in self.segments:
            self._recount(segment)
        self._writer = None
        self._reader = None
        self._cached_bytes = 0
        """Bytes of records in the segments' ``unread`` caches."""
        self._read_seq: int | None = None
        self._read_pos = 0
        self._by_seq: dict[int, _Segment] = {}
        """``segments`` by seq: every read and ack looks its segment up."""
        self._drop_finished()

    @staticmethod
    def _load_checkpoint(segment: _Segment) -> None:
        """The .ack file: the acknowledged offset, then (optional line) the starts of the
        records acknowledged beyond it."""
        try:
            lines = segment.ack_path.read_text().split("\n")
            segment.acked = min(int(lines[0].strip() or 0), segment.size)
            ahead = {int(start) for start in lines[1].split()} if len(lines) > 1 else set()
        except (FileNotFoundError, ValueError):
            segment.acked, ahead = 0, set()
        segment.acked_ahead = {start for start in ahead if segment.acked < start < segment.size}

    def _recount(self, segment: _Segment) -> None:
        """Count the records not acknowledged, moving ``acked`` past those at its head that
        were acknowledged out of order."""
        pending = 0
        for record in self._scan(segment, segment.acked):
            start, end = record.handle[1], record.handle[2]
            if start not in segment.acked_ahead:
                pending += 1
            elif not pending:
                segment.acked_ahead.discard(start)
                segment.acked = end
        segment.pending = pending

    # -- size and state
    @property
    def bytes(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def pending(self) -> int:
        return sum(s.pending for s in self.segments)

    def __bool__(self) -> bool:
        return bool(self.segments)

    # -- writing
    @staticmethod
    def _frame(key: bytes | None, value: bytes, sent_ms: int) -> bytes:
        key_bytes = key or b""
        header_tail = _HEADER_TAIL.pack(sent_ms, -1 if key is None else len(key_bytes))
        crc = zlib.crc32(value, zlib.crc32(key_bytes, zlib.crc32(header_tail)))
        return b"".join((_HEADER_HEAD.pack(crc, len(key_bytes) + len(value)), header_tail, key_bytes, value))

    def _new_segment(self, seq: int) -> _Segment:
        segment = _Segment(seq, self.directory / f"{seq:020d}{SEGMENT_SUFFIX}", sealed=False)
        segment.ack_path.unlink(missing_ok=True)
        return segment

    def append(self, key: bytes | None, value: bytes, sent_ms: int) -> bool:
        """Write one record at the tail; False (nothing written) when the spool is full."""
        return self.append_many([(key, value, sent_ms)])

    def append_many(self, records: list[tuple[bytes | None, bytes, int]]) -> bool:
        """Write records at the tail with one write() (one segment holds them all); False,
        and nothing written, when they do not all fit."""
        frames = [self._frame(key, value, sent_ms) for key, value, sent_ms in records]
        data = b"".join(frames)
        if self.bytes + len(data) > self.max_bytes:
            return False
        tail = self.segments[-1] if self.segments else None
        if tail is None or tail.sealed or tail.size >= self.segment_bytes:
            if tail is not None:
                self._seal(tail)
                self._drop_finished()
            tail = self._new_segment(self.segments[-1].seq + 1 if self.segments else FIRST_SEQ)
            self.segments.append(tail)
            self._by_seq[tail.seq] = tail
            self._writer = open(tail.path, "ab", buffering=0)
        self._writer.write(data)
        if self._cached_bytes + len(data) <= UNREAD_CACHE_BYTES:
            self._cache_unread(tail, records, frames)
        tail.size += len(data)
        tail.pending += len(records)
        return True

    def _cache_unread(self, tail: _Segment, records: list, frames: list[bytes]) -> None:
        unread, seq, position = tail.unread, tail.seq, tail.size
        for (key, value, sent_ms), frame in zip(records, frames):
            end = position + len(frame)
            unread[position] = SpoolRecord((seq, position, end), key, value, sent_ms)
            position = end
        added = position - tail.size
        tail.unread_bytes += added
        self._cached_bytes += added

    def prepend(self, records: list[tuple[bytes | None, bytes, int]]) -> int:
        """Write records as a new segment before every other one (older than all); returns
        how many fit."""
        if not records:
            return 0
        seq = self.segments[0].seq - 1 if self.segments else FIRST_SEQ
        segment = _Segment(seq, self.directory / f"{seq:020d}{SEGMENT_SUFFIX}")
        segment.ack_path.unlink(missing_ok=True)
        written = 0
        with open(segment.path, "ab") as out:
            for key, value, sent_ms in records:
                frame = self._frame(key, value, sent_ms)
                if self.bytes + segment.size + len(frame) > self.max_bytes:
                    break
                out.write(frame)
                segment.size += len(frame)
                written += 1
            out.flush()
            os.fsync(out.fileno())
        segment.pending = written
        if written:
            self.segments.insert(0, segment)
            self._by_seq[segment.seq] = segment
            # The reader must start again from the new head.
            self._close_reader()
        else:
            segment.path.unlink(missing_ok=True)
        return written

    def _seal(self, segment: _Segment) -> None:
        segment.sealed = True
        if self._writer is not None and self.segments and segment is self.segments[-1]:
            self._writer.close()
            self._writer = None

    def sync(self) -> None:
        """fsync the tail segment: what was appended survives a power loss."""
        if self._writer is not None:
            os.fsync(self._writer.fileno())

    def writer_fd(self) -> int | None:
        return os.dup(self._writer.fileno()) if self._writer is not None else None

    # -- reading
    def _scan(self, segment: _Segment, start: int):
        with open(segment.path, "rb") as stream:
            stream.seek(start)
            position = start
            while True:
                record = self._read_frame(stream, segment, position)
                if record is None:
                    return
                position = record.handle[2]
                yield record

    def _read_frame(self, stream, segment: _Segment, position: int) -> SpoolRecord | None:
        header = stream.read(FRAME.size)
        if len(header) < FRAME.size:
            if header:
                self._torn(segment, position)
            return None
        crc, length, sent_ms, key_len = FRAME.unpack(header)
        body = stream.read(length)
        if len(body) < length or zlib.crc32(body, zlib.crc32(header[8:])) != crc or key_len > length:
            self._torn(segment, position)
            return None
        key = None if key_len < 0 else body[:key_len]
        value = body[max(key_len, 0):]
        return SpoolRecord((segment.seq, position, position + FRAME.size + length), key, value, sent_ms)

    def _torn(self, segment: _Segment, position: int) -> None:
        if segment.sealed:
            log.warning("spool segment %s: unreadable record at byte %d (torn write?); skipping the rest",
                        segment.path.name, position)
            self.corrupt += 1
            segment.size = position

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader, self._read_seq = None, None

    def _segment(self, seq: int) -> _Segment | None:
        return self._by_seq.get(seq)

    def read(self) -> SpoolRecord | None:
        """The next record not yet handed out, oldest first, or None."""
        while True:
            if self._read_seq is None:
                for candidate in self.segments:
                    start = candidate.outstanding[-1][1] if candidate.outstanding else candidate.acked
                    if start < candidate.size:
                        self._reader = _ReadAhead(candidate.path)
                        self._read_seq, self._read_pos = candidate.seq, start
                        break
                else:
                    return None
            segment = self._segment(self._read_seq)
            if segment is None:
                self._close_reader()
                continue
            if self._read_pos < segment.size:
                record = segment.unread.pop(self._read_pos, None)
                if record is not None:
                    size = record.handle[2] - record.handle[1]
                    segment.unread_bytes -= size
                    self._cached_bytes -= size
                else:
                    self._reader.seek(self._read_pos)
                    record = self._read_frame(self._reader, segment, self._read_pos)
                if record is not None:
                    start = record.handle[1]
                    self._read_pos = record.handle[2]
                    segment.outstanding.append((start, record.handle[2]))
                    if start not in segment.acked_ahead:
                        return record
                    segment.acked_ahead.discard(start)  # delivered before: never handed out again
                    segment.done.add(start)
                    self._advance(segment)
                    continue
            if not segment.sealed:
                return None  # caught up with the writer
            self._close_reader()
            self._drop_finished()

    def restart_reading(self) -> None:
        """Forget what was handed out: reading starts again at each segment's
        acknowledged offset, past the records already acknowledged out of order."""
        for segment in self.segments:
            segment.acked_ahead |= segment.done
            segment.outstanding.clear()
            segment.done.clear()
            self._recount(segment)
        self._close_reader()

    def settle(self) -> bool:
        """When every record is acknowledged, remove all segments; True if the spool is empty."""
        if all(s.acked >= s.size and not s.outstanding for s in self.segments):
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            for segment in self.segments:
                segment.sealed = True
            self._drop_finished()
        return not self.segments

    def rewind(self, record: SpoolRecord) -> None:
        """Give back the record just read (the producer's queue was full)."""
        seq, start, _ = record.handle
        segment = self._segment(seq)
        if segment is not None and segment.outstanding and segment.outstanding[-1][0] == start:
            segment.outstanding.pop()
            if self._read_seq == seq:
                self._read_pos = start
            else:
                self._close_reader()

    def ack(self, handle: tuple[int, int, int]) -> None:
        self.ack_many((handle,))

    def ack_many(self, handles) -> None:
        """Acknowledge records (in any order); each segment advances once for the batch."""
        by_seq, touched = self._by_seq, {}
        for seq, start, _end in handles:
            segment = by_seq.get(seq)
            if segment is None:
                continue
            segment.done.add(start)
            segment.pending -= 1
            touched[seq] = segment
        finished = False
        for segment in touched.values():
            self._advance(segment)
            finished = finished or (segment.sealed and segment.acked >= segment.size and not segment.outstanding)
        if finished:
            self._drop_finished()

    @staticmethod
    def _advance(segment: _Segment) -> None:
        while segment.outstanding and segment.outstanding[0][0] in segment.done:
            first_start, first_end = segment.outstanding.popleft()
            segment.done.discard(first_start)
            segment.acked = first_end

    def _drop_finished(self) -> None:
        keep = []
        for segment in self.segments:
            finished = segment.sealed and segment.acked >= segment.size and not segment.outstanding
            if finished:
                if self._read_seq == segment.seq:
                    self._close_reader()
                segment.path.unlink(missing_ok=True)
                segment.ack_path.unlink(missing_ok=True)
                self._cached_bytes -= segment.unread_bytes
            else:
                keep.append(segment)
        self.segments = keep
        self._by_seq = {segment.seq: segment for segment in keep}

    def checkpoint(self) -> None:
        """Persist every segment's acknowledged offset (fewer duplicates after a crash)."""
        for segment in self.segments:
            ahead = segment.acked_ahead | segment.done
            if segment.acked or ahead:
                tmp = segment.ack_path.with_suffix(".ack.tmp")
                tmp.write_text(str(segment.acked) + ("\n" + " ".join(map(str, sorted(ahead))) if ahead else ""))
                os.replace(tmp, segment.ack_path)

    def close(self) -> None:
        self.checkpoint()
        if self._writer is not None:
            self._writer.flush()
            os.fsync(self._writer.fileno())
            self._writer.close()
            self._writer = None
        self._close_reader()
        self._lock_file.close()
