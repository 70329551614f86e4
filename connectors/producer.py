"""EventProducer: what an inference gateway calls once per request.

``send(event)`` validates and Avro-encodes the event (Confluent wire format, registered
schema id) and hands it to librdkafka without waiting: it never blocks the request path.
Messages are keyed ``org_id/user_id`` (murmur2 partitioner, as Java clients hash), so one
user's events stay ordered in one partition; the producer is idempotent with acks=all.

When the broker is down (librdkafka reports all brokers down) or the local queue is full
(``BufferError``), events go to a bounded on-disk spool instead; a background thread
replays the spool, oldest first, once the broker takes messages again, and deletes spool
segments only after every record in them was acknowledged. While anything is spooled, new
events are spooled behind it, so a user's events keep their order. The spool survives a
process restart (it is replayed by the next EventProducer with the same ``spool_dir``).
When the spool is full, new events are dropped and counted (never blocking).

Delivery guarantees: every event accepted by ``send`` is delivered at least once unless
the spool overflows (counted in ``gatewatch_producer_dropped_total``). Duplicates are
possible only where a broker may have stored a message whose acknowledgement never came
(purged in flight at shutdown, or a crash between delivery and the spool's ack record);
the pipeline drops them by event_id.

Metrics (prometheus_client, default registry; labels are the topic and bounded codes,
never user ids): gatewatch_producer_{sent,delivered,spooled,replayed,dropped,invalid,
delivery_errors}_total, gatewatch_producer_spool_bytes, gatewatch_producer_queue_messages,
gatewatch_producer_send_seconds, gatewatch_producer_delivery_seconds.
"""

from __future__ import annotations

import collections
import fcntl
import functools
import logging
import os
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import KafkaError, Producer
from prometheus_client import Counter, Gauge, Histogram

from schemas.codec import EventCodec, InvalidEvent

log = logging.getLogger("gatewatch.producer")

SENT = Counter("gatewatch_producer_sent", "Events accepted by EventProducer.send", ["topic"])
INVALID = Counter("gatewatch_producer_invalid", "Events rejected by validation in send()", ["topic", "code"])
DELIVERED = Counter("gatewatch_producer_delivered", "Events acknowledged by the broker", ["topic"])
SPOOLED = Counter("gatewatch_producer_spooled", "Events written to the disk spool", ["topic", "reason"])
REPLAYED = Counter("gatewatch_producer_replayed", "Spooled events acknowledged by the broker", ["topic"])
DROPPED = Counter("gatewatch_producer_dropped", "Events lost (spool full, permanent delivery error)",
                  ["topic", "reason"])
DELIVERY_ERRORS = Counter("gatewatch_producer_delivery_errors", "Delivery reports with an error", ["topic", "code"])
SPOOL_BYTES = Gauge("gatewatch_producer_spool_bytes", "Bytes in the disk spool", ["topic"])
QUEUE_MESSAGES = Gauge("gatewatch_producer_queue_messages", "Messages in librdkafka's queue", ["topic"])
SEND_SECONDS = Histogram("gatewatch_producer_send_seconds", "Time spent inside send() (validate, encode, enqueue)",
                         ["topic"], buckets=(2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1))
DELIVERY_SECONDS = Histogram("gatewatch_producer_delivery_seconds", "From send() to the broker's acknowledgement",
                             ["topic"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300, 3600))

# Delivery errors after which a message is not worth retrying: it can never be stored.
PERMANENT_ERRORS = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG, KafkaError._INVALID_ARG,
})
FRAME = struct.Struct(">IIqi")  # crc32, body length, send time ms, key length (-1: no key)
SEGMENT_SUFFIX = ".spool"
ACK_SUFFIX = ".ack"
FIRST_SEQ = 10**12


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
    pending: int = 0
    """Records not yet acknowledged (read or not)."""

    @property
    def ack_path(self) -> Path:
        return self.path.with_suffix(ACK_SUFFIX)


@dataclass(frozen=True)
class SpoolRecord:
    handle: tuple[int, int, int]
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
            try:
                segment.acked = min(int(segment.ack_path.read_text().strip() or 0), segment.size)
            except (FileNotFoundError, ValueError):
                segment.acked = 0
            self.segments.append(segment)
        self.segments.sort(key=lambda s: s.seq)
        for ack in self.directory.glob(f"*{ACK_SUFFIX}"):
            if not ack.with_suffix(SEGMENT_SUFFIX).exists():
                ack.unlink(missing_ok=True)
        for segment in self.segments:
            segment.pending = sum(1 for _ in self._scan(segment, segment.acked))
        self._writer = None
        self._reader = None
        self._read_seq: int | None = None
        self._read_pos = 0
        self._drop_finished()

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
    def _frame(self, key: bytes | None, value: bytes, sent_ms: int) -> bytes:
        key_bytes = key or b""
        body = key_bytes + value
        header_tail = struct.pack(">qi", sent_ms, -1 if key is None else len(key_bytes))
        crc = zlib.crc32(body, zlib.crc32(header_tail))
        return FRAME.pack(crc, len(body), sent_ms, -1 if key is None else len(key_bytes)) + body

    def _new_segment(self, seq: int) -> _Segment:
        segment = _Segment(seq, self.directory / f"{seq:020d}{SEGMENT_SUFFIX}", sealed=False)
        segment.ack_path.unlink(missing_ok=True)
        return segment

    def append(self, key: bytes | None, value: bytes, sent_ms: int) -> bool:
        """Write one record at the tail; False (nothing written) when the spool is full."""
        frame = self._frame(key, value, sent_ms)
        if self.bytes + len(frame) > self.max_bytes:
            return False
        tail = self.segments[-1] if self.segments else None
        if tail is None or tail.sealed or tail.size >= self.segment_bytes:
            if tail is not None:
                self._seal(tail)
            tail = self._new_segment(self.segments[-1].seq + 1 if self.segments else FIRST_SEQ)
            self.segments.append(tail)
            self._writer = open(tail.path, "ab", buffering=0)
        self._writer.write(frame)
        tail.size += len(frame)
        tail.pending += 1
        return True

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
        for segment in self.segments:
            if segment.seq == seq:
                return segment
        return None

    def read(self) -> SpoolRecord | None:
        """The next record not yet handed out, oldest first, or None."""
        while True:
            if self._read_seq is None:
                for candidate in self.segments:
                    start = candidate.outstanding[-1][1] if candidate.outstanding else candidate.acked
                    if start < candidate.size:
                        self._reader = open(candidate.path, "rb")
                        self._read_seq, self._read_pos = candidate.seq, start
                        break
                else:
                    return None
            segment = self._segment(self._read_seq)
            if segment is None:
                self._close_reader()
                continue
            if self._read_pos < segment.size:
                self._reader.seek(self._read_pos)
                record = self._read_frame(self._reader, segment, self._read_pos)
                if record is not None:
                    self._read_pos = record.handle[2]
                    segment.outstanding.append((record.handle[1], record.handle[2]))
                    return record
            if not segment.sealed:
                return None  # caught up with the writer
            self._close_reader()
            self._drop_finished()

    def restart_reading(self) -> None:
        """Forget what was handed out: reading starts again at each segment's
        acknowledged offset (records acknowledged out of order are read again)."""
        for segment in self.segments:
            segment.outstanding.clear()
            segment.done.clear()
            segment.pending = sum(1 for _ in self._scan(segment, segment.acked))
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
        seq, start, _ = handle
        segment = self._segment(seq)
        if segment is None:
            return
        segment.done.add(start)
        segment.pending -= 1
        while segment.outstanding and segment.outstanding[0][0] in segment.done:
            first_start, first_end = segment.outstanding.popleft()
            segment.done.discard(first_start)
            segment.acked = first_end
        self._drop_finished()

    def _drop_finished(self) -> None:
        keep = []
        for segment in self.segments:
            finished = segment.sealed and segment.acked >= segment.size and not segment.outstanding
            if finished:
                if self._read_seq == segment.seq:
                    self._close_reader()
                segment.path.unlink(missing_ok=True)
                segment.ack_path.unlink(missing_ok=True)
            else:
                keep.append(segment)
        self.segments = keep

    def checkpoint(self) -> None:
        """Persist every segment's acknowledged offset (fewer duplicates after a crash)."""
        for segment in self.segments:
            if segment.acked:
                tmp = segment.ack_path.with_suffix(".ack.tmp")
                tmp.write_text(str(segment.acked))
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


# -- the producer -----------------------------------------------------------------------

class EventProducer:
    """Asynchronous, spooling, idempotent producer of gateway events (see the module doc).

    ``registry`` is a schemas.registry registry (LocalRegistry or ConfluentRegistry);
    ``validation`` an ops.settings.ValidationSettings (defaults when None)."""

    def __init__(self, bootstrap: str, topic: str, registry, spool_dir: str | os.PathLike, *,
                 max_spool_bytes: int = 256 << 20, extra_config: dict | None = None, validation=None,
                 schema: str = "gateway_event", replay_window: int = 1000, fsync_interval_s: float = 1.0,
                 close_timeout_s: float = 10.0):
        self.topic = topic
        self.codec = EventCodec(registry, validation, schema=schema)
        self.replay_window = replay_window
        self.fsync_interval_s = fsync_interval_s
        self.close_timeout_s = close_timeout_s
        self.config = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "partitioner": "murmur2_random",
            # Keep messages until the broker takes them; the spool bounds what waits.
            "message.timeout.ms": 0,
            "queue.buffering.max.messages": 100_000,
            "queue.buffering.max.kbytes": 65_536,
            "reconnect.backoff.max.ms": 2000,
            **(extra_config or {}),
            "error_cb": self._on_error,
        }
        self.spool = DiskSpool(spool_dir, max_spool_bytes)
        try:
            self._producer = Producer(self.config)
        except Exception:
            self.spool.close()
            raise
        self._lock = threading.RLock()
        self._spooling = bool(self.spool)
        self._broker_down = False
        self._replay_outstanding = 0
        self._rescued: list[tuple[bytes | None, bytes, int]] | None = None
        self._closed = False
        self._stop = threading.Event()
        self.counts = collections.Counter()
        """Per-instance totals: sent, delivered, spooled, replayed, dropped, invalid, delivery_errors."""
        self._metrics = {name: metric.labels(topic=topic) for name, metric in
                         (("sent", SENT), ("delivered", DELIVERED), ("replayed", REPLAYED),
                          ("send_seconds", SEND_SECONDS), ("delivery_seconds", DELIVERY_SECONDS),
                          ("spool_bytes", SPOOL_BYTES), ("queue", QUEUE_MESSAGES))}
        self._thread = threading.Thread(target=self._run, name=f"gatewatch-producer-{topic}", daemon=True)
        self._thread.start()

    # -- the request path ----------------------------------------------------------------

    def send(self, event: dict) -> None:
        """Validate, encode and enqueue one event; never waits for the broker or the disk.

        Raises InvalidEvent (with .code and .reason) for an event that breaks the schema or
        the validation rules; nothing is sent then."""
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        try:
            canonical = self.codec.check(event, now_ms)
        except InvalidEvent as exc:
            INVALID.labels(topic=self.topic, code=exc.code).inc()
            self.counts["invalid"] += 1
            raise
        value = self.codec.encode_canonical(canonical)
        key = f"{canonical['org_id']}/{canonical['user_id']}".encode()
        with self._lock:
            if self._closed:
                raise RuntimeError("EventProducer is closed")
            if self._spooling:
                self._spool(key, value, now_ms, "broker_down" if self._broker_down else "backlog")
            else:
                try:
                    self._producer.produce(self.topic, value, key, timestamp=now_ms, on_delivery=self._on_direct)
                except BufferError:
                    self._spooling = True
                    self._spool(key, value, now_ms, "queue_full")
            self.counts["sent"] += 1
        self._metrics["sent"].inc()
        self._metrics["send_seconds"].observe(time.perf_counter() - started)

    def _spool(self, key: bytes | None, value: bytes, sent_ms: int, reason: str) -> bool:
        """Append to the spool (caller holds the lock); count a drop when it is full or
        the disk fails (never raising into the request path)."""
        try:
            if self.spool.append(key, value, sent_ms):
                SPOOLED.labels(topic=self.topic, reason=reason).inc()
                self.counts["spooled"] += 1
                return True
            why = "spool_full"
        except OSError as exc:
            why = "spool_error"
            if self.counts["dropped"] == 0:
                log.error("producer spool %s cannot be written: %s", self.spool.directory, exc)
        DROPPED.labels(topic=self.topic, reason=why).inc()
        self.counts["dropped"] += 1
        if self.counts["dropped"] in (1, 10, 100) or self.counts["dropped"] % 1000 == 0:
            log.error("producer spool %s (at most %d bytes): %d events dropped so far (%s)",
                      self.spool.directory, self.spool.max_bytes, self.counts["dropped"], why)
        return False

    # -- librdkafka callbacks (run in the thread that polls) -----------------------------

    def _on_error(self, err: KafkaError) -> None:
        code = err.code()
        if code == KafkaError._ALL_BROKERS_DOWN:
            with self._lock:
                if not self._broker_down:
                    log.warning("all brokers of %s are down: spooling events to %s",
                                self.config["bootstrap.servers"], self.spool.directory)
                self._broker_down = True
                self._spooling = True
        elif err.fatal():
            log.error("fatal producer error (%s): recreating the producer", err.str())
            self._fatal = True
        else:
            log.debug("producer error: %s", err.str())

    def _delivered(self, msg) -> None:
        with self._lock:
            self.counts["delivered"] += 1
            if self._broker_down:
                log.info("broker of %s is back", self.config["bootstrap.servers"])
                self._broker_down = False
        self._metrics["delivered"].inc()
        _kind, sent_ms = msg.timestamp()
        if sent_ms > 0:
            self._metrics["delivery_seconds"].observe(max(0.0, time.time() - sent_ms / 1000))

    def _failed(self, err: KafkaError) -> bool:
        """Count a delivery error; True when the message is worth another try."""
        DELIVERY_ERRORS.labels(topic=self.topic, code=err.name()).inc()
        with self._lock:
            self.counts["delivery_errors"] += 1
        return err.code() not in PERMANENT_ERRORS

    def _on_direct(self, err, msg) -> None:
        if err is None:
            self._delivered(msg)
            return
        sent_ms = msg.timestamp()[1]
        if not self._failed(err):
            DROPPED.labels(topic=self.topic, reason="permanent_error").inc()
            with self._lock:
                self.counts["dropped"] += 1
            log.error("event dropped: %s (%d bytes)", err.str(), len(msg.value() or b""))
            return
        with self._lock:
            if self._rescued is not None:
                # Shutting down: these were queued before anything in the spool.
                self._rescued.append((msg.key(), msg.value(), sent_ms))
            else:
                self._spooling = True
                self._spool(msg.key(), msg.value(), sent_ms, "delivery_error")

    def _on_replay(self, handle, err, msg) -> None:
        with self._lock:
            self._replay_outstanding -= 1
            if err is None:
                self.spool.ack(handle)
                self.counts["replayed"] += 1
                self._metrics["replayed"].inc()
            elif err.code() in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT) and self._rescued is not None:
                pass  # still in its segment, unacknowledged: replayed by the next producer
            else:
                retry = self._failed(err)
                self.spool.ack(handle)
                if retry:
                    self._spool(msg.key(), msg.value(), msg.timestamp()[1], "delivery_error")
                else:
                    DROPPED.labels(topic=self.topic, reason="permanent_error").inc()
                    self.counts["dropped"] += 1
        if err is None:
            self._delivered(msg)

    # -- the background thread -------------------------------------------------------------

    _fatal = False

    def _run(self) -> None:
        last_sync = time.monotonic()
        while not self._stop.is_set():
            try:
                self._producer.poll(0.05)
                if self._fatal:
                    self._recreate()
                self._pump()
                now = time.monotonic()
                if now - last_sync >= self.fsync_interval_s:
                    last_sync = now
                    self._sync()
            except Exception:
                log.exception("producer background thread error")
                time.sleep(0.5)

    def _pump(self) -> None:
        """Move spooled records into librdkafka, oldest first, a window at a time, in
        short steps so that send() never waits long for the lock."""
        while True:
            with self._lock:
                if not self._spooling:
                    return
                if self._replay_outstanding == 0 and self.spool.settle():
                    if not self._broker_down:
                        self._spooling = False
                    return
                if self._broker_down and self._replay_outstanding > 0:
                    return  # one window waits as the probe; the rest stays on disk
                for _ in range(64):
                    if self._replay_outstanding >= self.replay_window:
                        return
                    record = self.spool.read()
                    if record is None:
                        return
                    try:
                        self._producer.produce(self.topic, record.value, record.key, timestamp=record.sent_ms,
                                               on_delivery=functools.partial(self._on_replay, record.handle))
                    except BufferError:
                        self.spool.rewind(record)
                        return
                    self._replay_outstanding += 1

    def _sync(self) -> None:
        with self._lock:
            fd = self.spool.writer_fd()
            self.spool.checkpoint()
            self._metrics["spool_bytes"].set(self.spool.bytes)
        self._metrics["queue"].set(len(self._producer))
        if fd is not None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _recreate(self) -> None:
        """A fatal (idempotence) error makes a producer unusable: move what it held to the
        spool and start a new one."""
        self._fatal = False
        old = self._producer
        with self._lock:
            self._producer = Producer(self.config)
            self._spooling = True
            self._rescued = []
        old.purge(in_queue=True, in_flight=True, blocking=True)
        old.poll(0)
        old.flush(0)
        with self._lock:
            rescued, self._rescued = self._rescued, None
            # Replayed records the old producer held are read again from the spool.
            self.spool.restart_reading()
            self._replay_outstanding = 0
            self.spool.prepend(rescued)

    # -- shutdown -------------------------------------------------------------------------

    def pending(self) -> int:
        """Events accepted but not yet acknowledged (queued in memory or spooled)."""
        with self._lock:
            return len(self._producer) + self.spool.pending

    def flush(self, timeout: float = 10.0) -> int:
        """Wait up to ``timeout`` s for every accepted event (spooled ones included) to be
        acknowledged; return how many are still pending."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = self.pending()
            left = deadline - time.monotonic()
            if remaining == 0 or left <= 0:
                return remaining
            self._producer.flush(min(0.1, left))

    def close(self, timeout: float | None = None) -> int:
        """Flush for up to ``timeout`` s, then keep whatever is still undelivered in the
        spool for the next producer; return how many events were left in the spool."""
        if self._closed:
            return self.spool.pending if self.spool else 0
        self.flush(self.close_timeout_s if timeout is None else timeout)
        with self._lock:
            self._closed = True
            self._rescued = []
        self._stop.set()
        self._thread.join(timeout=5)
        # Whatever librdkafka still holds goes back to disk: never sent (queued) is safe;
        # in flight may have reached the broker (a possible duplicate, dropped by event_id).
        self._producer.purge(in_queue=True, in_flight=True, blocking=True)
        self._producer.poll(0)
        self._producer.flush(0)
        with self._lock:
            rescued, self._rescued = self._rescued, None
            kept = self.spool.prepend(rescued)
            if kept < len(rescued):
                DROPPED.labels(topic=self.topic, reason="spool_full").inc(len(rescued) - kept)
                self.counts["dropped"] += len(rescued) - kept
            if kept:
                SPOOLED.labels(topic=self.topic, reason="shutdown").inc(kept)
                self.counts["spooled"] += kept
            self.spool.settle()
            left = self.spool.pending
            self.spool.close()
        if left:
            log.warning("producer closed with %d events spooled in %s; they are sent by the next producer "
                        "using that spool", left, self.spool.directory)
        return left

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- provider usage blocks -> the four token kinds ----------------------------------------

def _int(value) -> int:
    return int(value or 0)


def usage_tokens(usage: dict | None, provider: str = "openai") -> dict[str, int]:
    """A provider's usage block as gatewatch's four token counts, with input_tokens the
    UNCACHED prompt tokens (cache reads and writes apart, never inside input_tokens).

    Providers disagree: OpenAI and Gemini include cached tokens in their prompt count
    (subtract them); Anthropic and Bedrock report them beside it. Unknown providers are
    read as OpenAI-style."""
    usage = usage or {}
    provider = provider.lower()
    if provider == "anthropic":
        return {"input_tokens": _int(usage.get("input_tokens")),
                "output_tokens": _int(usage.get("output_tokens")),
                "cache_read_tokens": _int(usage.get("cache_read_input_tokens")),
                "cache_write_tokens": _int(usage.get("cache_creation_input_tokens"))}
    if provider == "bedrock":
        return {"input_tokens": _int(usage.get("inputTokens")),
                "output_tokens": _int(usage.get("outputTokens")),
                "cache_read_tokens": _int(usage.get("cacheReadInputTokens")),
                "cache_write_tokens": _int(usage.get("cacheWriteInputTokens"))}
    if provider in ("google", "gemini", "vertex"):
        cached = _int(usage.get("cachedContentTokenCount"))
        return {"input_tokens": max(0, _int(usage.get("promptTokenCount")) - cached),
                "output_tokens": _int(usage.get("candidatesTokenCount")) + _int(usage.get("thoughtsTokenCount")),
                "cache_read_tokens": cached, "cache_write_tokens": 0}
    # OpenAI chat completions (prompt_/completion_tokens) or responses API (input_/output_tokens).
    prompt = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    cached = _int(details.get("cached_tokens"))
    return {"input_tokens": max(0, prompt - cached),
            "output_tokens": _int(usage.get("completion_tokens", usage.get("output_tokens"))),
            "cache_read_tokens": cached, "cache_write_tokens": 0}
