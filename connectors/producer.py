"""EventProducer: what an inference gateway calls once per request.

``send(event)`` validates and Avro-encodes the event (Confluent wire format, registered
schema id) and hands it to librdkafka without waiting: it never blocks the request path.
Messages are keyed ``org_id/user_id`` (murmur2 partitioner, as Java clients hash), so one
user's events stay ordered in one partition; the producer is idempotent with acks=all.

When the broker is down (librdkafka reports all brokers down) or the local queue is full
(``BufferError``), events go to a bounded on-disk spool (connectors.spool) instead; a
background thread replays the spool, oldest first, once the broker takes messages again,
and deletes spool segments only after every record in them was acknowledged. While
anything is spooled, new events are spooled behind it, so a user's events keep their
order. The spool survives a process restart (it is replayed by the next EventProducer with
the same ``spool_dir``). When the spool is full, new events are dropped and counted.

Every event handed to librdkafka is also kept in the producer's own in-flight record until
its delivery report, so nothing depends on librdkafka giving messages back:
- a send that fails with a retryable error waits until no older send is in flight, then
  goes to the spool's HEAD with the other failures, in send order (never behind newer
  events); a failed replay is read again from its place in the spool;
- a fatal error (an idempotent producer whose sequence state the broker lost raises
  OUT_OF_ORDER_SEQUENCE_NUMBER from poll()/flush(), and confluent-kafka never passes fatal
  errors to ``error_cb``) replaces the producer and re-sends every undelivered event, the
  in-flight ones first, then the spool.

``send_many(events)`` does the same for a batch at a lower cost per event (one lock, one
metrics update, in durable mode one spool write).

``durable=True``: send() appends the event to the spool before returning (and raises
SpoolFull instead of dropping when it cannot), and the background thread produces from the
spool; an event send() accepted survives a crash of the process (one unbuffered write() per
event; the kernel has it). It produces in flights of up to ``replay_window`` records with a
longer linger (bigger produce requests); librdkafka reports only failures, and a flight's
records are acknowledged in the spool together once librdkafka holds nothing more (a
per-message delivery report, with the GIL taken and a Message built per event, was a third
of the background thread's CPU). Power loss: the spool is fsynced every ``fsync_interval_s``, or
before each send() returns with ``fsync_each_send=True`` (much slower).

Delivery guarantees: every event accepted by ``send`` is delivered at least once unless
the spool overflows (counted in ``gatewatch_producer_dropped_total``) or, in the default
mode, the process dies with events only in memory. Duplicates are possible where a broker
may have stored a message whose acknowledgement never came (purged in flight at shutdown,
a fatal error, a crash between delivery and the spool's ack checkpoint); the pipeline
drops them by event_id.

Metrics (prometheus_client, default registry; labels are the topic and bounded codes,
never user ids): gatewatch_producer_{sent,delivered,spooled,replayed,dropped,invalid,
delivery_errors,recreated}_total, gatewatch_producer_spool_bytes,
gatewatch_producer_queue_messages, gatewatch_producer_send_seconds,
gatewatch_producer_delivery_seconds.
"""

from __future__ import annotations

import bisect
import collections
import functools
import itertools
import logging
import os
import threading
import time

from confluent_kafka import KafkaError, KafkaException, Producer
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily

from connectors.spool import DiskSpool, SpoolRecord
from schemas.codec import EventCodec, InvalidEvent
from schemas.vocabulary import user_key

__all__ = ["DiskSpool", "EventProducer", "SpoolFull", "SpoolRecord"]

log = logging.getLogger("gatewatch.producer")

SENT = Counter("gatewatch_producer_sent", "Events accepted by EventProducer.send", ["topic"])
INVALID = Counter("gatewatch_producer_invalid", "Events rejected by validation in send()", ["topic", "code"])
DELIVERED = Counter("gatewatch_producer_delivered", "Events acknowledged by the broker", ["topic"])
SPOOLED = Counter("gatewatch_producer_spooled", "Events written to the disk spool", ["topic", "reason"])
REPLAYED = Counter("gatewatch_producer_replayed", "Spooled events acknowledged by the broker", ["topic"])
DROPPED = Counter("gatewatch_producer_dropped", "Events lost (spool full, permanent delivery error)",
                  ["topic", "reason"])
DELIVERY_ERRORS = Counter("gatewatch_producer_delivery_errors", "Delivery reports with an error", ["topic", "code"])
RECREATED = Counter("gatewatch_producer_recreated", "Producers replaced after a fatal librdkafka error",
                    ["topic"])
SPOOL_BYTES = Gauge("gatewatch_producer_spool_bytes", "Bytes in the disk spool", ["topic"])
QUEUE_MESSAGES = Gauge("gatewatch_producer_queue_messages", "Messages in librdkafka's queue", ["topic"])
SEND_SECONDS = Histogram("gatewatch_producer_send_seconds", "Time spent inside send() (validate, encode, enqueue)",
                         ["topic"], buckets=(2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1))
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 300, 3600)
DELIVERY_BUCKETS_MS = tuple(bound * 1000 for bound in DELIVERY_BUCKETS)
REPLAY_WINDOW = 1000
"""Spooled records handed to librdkafka and not yet acknowledged, at most."""
DURABLE_LINGER_MS = 50
DURABLE_REPLAY_WINDOW = 20_000
"""A durable producer's events are on disk before librdkafka sees them, so it can wait
longer to fill a batch: with linger.ms 5, the API under load sent many small produce
requests and librdkafka's broker thread cost 4-9 us per event, 2-3 with 50 ms (bench api,
JSON). The window must then hold more than a linger's worth of events (20,000 = 28 MB
of typical events, within queue.buffering.max.kbytes) or it caps the rate."""


class DeliveryLatency:
    """``gatewatch_producer_delivery_seconds`` (a histogram per topic), fed in batches.

    prometheus_client's ``Histogram.observe`` takes two locks and loops over the buckets in
    Python: once per delivered message it was a fifth of a durable producer's delivery
    thread. Producers count into a plain list under their own lock and add it here once
    per loop of their background thread."""

    name = "gatewatch_producer_delivery_seconds"

    def __init__(self):
        self._lock = threading.Lock()
        self._totals: dict[str, tuple[list[int], float]] = {}

    def add(self, topic: str, counts: list[int], seconds: float) -> None:
        """``counts``: per bucket of DELIVERY_BUCKETS (not cumulative), the last one +Inf."""
        with self._lock:
            totals, total_seconds = self._totals.get(topic) or ([0] * len(counts), 0.0)
            self._totals[topic] = ([a + b for a, b in zip(totals, counts)], total_seconds + seconds)

    def collect(self):
        family = HistogramMetricFamily(self.name, "From send() to the broker's acknowledgement", labels=["topic"])
        with self._lock:
            totals = dict(self._totals)
        for topic, (counts, seconds) in sorted(totals.items()):
            cumulative = list(itertools.accumulate(counts))
            bounds = [str(float(bound)) for bound in DELIVERY_BUCKETS] + ["+Inf"]
            family.add_metric([topic], list(zip(bounds, cumulative)), sum_value=seconds)
        yield family


DELIVERY_SECONDS = DeliveryLatency()
REGISTRY.register(DELIVERY_SECONDS)

# Delivery errors after which a message is not worth retrying: it can never be stored.
PERMANENT_ERRORS = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD, KafkaError.INVALID_MSG, KafkaError._INVALID_ARG,
})


# -- the producer -----------------------------------------------------------------------

class SpoolFull(RuntimeError):
    """A durable EventProducer could not write the event to its spool (full, or the disk
    failed): the event was NOT accepted, and the caller should refuse the request."""


def is_fatal(exc: BaseException) -> bool:
    """True for the KafkaException librdkafka raises once the producer is unusable."""
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return isinstance(error, KafkaError) and (error.fatal() or error.code() == KafkaError._FATAL)


class EventProducer:
    """Asynchronous, spooling, idempotent producer of gateway events (see the module doc).

    ``registry`` is a schemas.registry registry (LocalRegistry or ConfluentRegistry);
    ``validation`` the validation settings section (schemas.rules.EventRules when None)."""

    def __init__(self, bootstrap: str, topic: str, registry, spool_dir: str | os.PathLike, *,
                 max_spool_bytes: int = 256 << 20, extra_config: dict | None = None, validation=None,
                 schema: str = "gateway_event", replay_window: int | None = None, fsync_interval_s: float = 1.0,
                 close_timeout_s: float = 10.0, durable: bool = False, fsync_each_send: bool = False):
        self.topic = topic
        self.codec = EventCodec(registry, validation, schema=schema)
        self._encode = self.codec.writer() or self.codec.encode_canonical
        self.replay_window = replay_window or (DURABLE_REPLAY_WINDOW if durable else REPLAY_WINDOW)
        self.fsync_interval_s = fsync_interval_s
        self.close_timeout_s = close_timeout_s
        self.durable = durable
        self.fsync_each_send = fsync_each_send
        self.config = {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": DURABLE_LINGER_MS if durable else 5,
            "partitioner": "murmur2_random",
            # Keep messages until the broker takes them; the spool bounds what waits.
            "message.timeout.ms": 0,
            "queue.buffering.max.messages": 100_000,
            "queue.buffering.max.kbytes": 65_536,
            "reconnect.backoff.max.ms": 2000,
            **(extra_config or {}),
            "error_cb": self._on_error,
        }
        if durable:
            # Flights (see _fly): librdkafka reports only failures, so a delivered event costs
            # no Python callback (confluent-kafka builds a Message, copying the value, per report).
            self.config["delivery.report.only.error"] = True
        self._producer_number = 0
        self._flight: list[SpoolRecord] = []
        """Durable mode: the spooled records handed to the current producer, not yet landed."""
        self._flight_errors: dict[tuple[bytes | None, bytes], KafkaError] = {}
        """Failed deliveries of the current flight, by (key, value) (the only reports asked for)."""
        self.spool = DiskSpool(spool_dir, max_spool_bytes)
        try:
            self._producer = self._new_producer()
        except Exception:
            self.spool.close()
            raise
        self._lock = threading.RLock()
        self._spooling = durable or bool(self.spool)
        self._broker_down = False
        self._fatal = False
        self._generation = 0
        """Bumped when the producer is replaced or closed: older delivery reports are ignored
        (their events were re-spooled)."""
        self._send_order = itertools.count()
        self._inflight: dict[int, tuple[bytes | None, bytes, int]] = {}
        """Direct sends not yet acknowledged: send order -> (key, value, send time ms)."""
        self._failed: list[tuple[int, bytes | None, bytes, int]] = []
        """Direct sends that failed, waiting for the older ones in flight before going to the spool."""
        self._replay_outstanding = 0
        self._replay_failed = False
        self._replay_reports: collections.deque = collections.deque()
        """(generation, spool handle, error, message) of replays librdkafka reported, settled
        in one go after each poll (see _settle_replays)."""
        self._closed = False
        self._stop = threading.Event()
        # Durable mode produces from the spool only, so the thread looks at it more often.
        self._poll_s = 0.005 if durable else 0.05
        self.counts = collections.Counter()
        self._published = collections.Counter()
        """The part of ``counts`` already added to the Prometheus counters (see _publish)."""
        """Per-instance totals: sent, delivered, spooled, replayed, dropped, invalid, delivery_errors,
        recreated."""
        self._metrics = {name: metric.labels(topic=topic) for name, metric in
                         (("sent", SENT), ("delivered", DELIVERED), ("replayed", REPLAYED),
                          ("send_seconds", SEND_SECONDS),
                          ("spool_bytes", SPOOL_BYTES), ("queue", QUEUE_MESSAGES))}
        self._metrics["durable"] = SPOOLED.labels(topic=topic, reason="durable")
        self._latency_counts = [0] * (len(DELIVERY_BUCKETS) + 1)
        self._latency_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=f"gatewatch-producer-{topic}", daemon=True)
        self._thread.start()

    # -- the request path ----------------------------------------------------------------

    def send(self, event: dict) -> None:
        """Validate, encode and enqueue one event; never waits for the broker (nor, unless
        durable, for the disk).

        Raises InvalidEvent (with .code and .reason) for an event that breaks the schema or
        the validation rules, and in durable mode SpoolFull when the event could not be
        stored; nothing is sent then."""
        problem = self.send_many([event])[0]
        if problem is not None:
            raise problem

    def send_many(self, events: list[dict]) -> list[InvalidEvent | None]:
        """``send`` for a batch, at a lower cost per event: one lock, one metrics update and,
        when durable, one spool write for the whole batch. Returns, per event, None when it
        was accepted or the InvalidEvent that rejected it (the others are still sent).

        Durable mode: the batch's valid events are all stored, or none is and SpoolFull is
        raised. ``gatewatch_producer_send_seconds`` observes the mean time per event once
        per batch."""
        started = time.perf_counter()
        now_ms = int(time.time() * 1000)
        check, encode = self.codec.check, self._encode
        outcomes: list[InvalidEvent | None] = []
        records: list[tuple[bytes, bytes, int]] = []
        for event in events:
            try:
                canonical = check(event, now_ms)
            except InvalidEvent as exc:
                INVALID.labels(topic=self.topic, code=exc.code).inc()
                self.counts["invalid"] += 1
                outcomes.append(exc)
                continue
            records.append((user_key(canonical["org_id"], canonical["user_id"]).encode(), encode(canonical), now_ms))
            outcomes.append(None)
        if not records:
            return outcomes
        with self._lock:
            if self._closed:
                raise RuntimeError("EventProducer is closed")
            if self.durable:
                self._persist_many(records)
            elif self._spooling:
                reason = "broker_down" if self._broker_down else "backlog"
                for record in records:
                    self._spool(*record, reason)
            else:
                for record in records:
                    self._produce_direct(*record)
            self.counts["sent"] += len(records)
        self._metrics["sent"].inc(len(records))
        self._metrics["send_seconds"].observe((time.perf_counter() - started) / len(records))
        return outcomes

    def _produce_direct(self, key: bytes, value: bytes, sent_ms: int) -> None:
        order = next(self._send_order)
        try:
            self._producer.produce(self.topic, value, key, timestamp=sent_ms,
                                   on_delivery=functools.partial(self._on_direct, self._generation, order))
        except BufferError:
            self._spooling = True
            self._spool(key, value, sent_ms, "queue_full")
        except KafkaException as exc:
            if not is_fatal(exc):
                raise
            # Until the background thread replaces the producer, events wait on disk.
            self._fatal = self._spooling = True
            self._spool(key, value, sent_ms, "fatal_error")
        else:
            self._inflight[order] = (key, value, sent_ms)

    def _persist_many(self, records: list[tuple[bytes, bytes, int]]) -> None:
        """Durable mode: the events are in the spool (the kernel's page cache, or the disk
        with fsync_each_send) when this returns, or none is and SpoolFull is raised."""
        try:
            stored = self.spool.append_many(records)
            if stored and self.fsync_each_send:
                self.spool.sync()
        except OSError as exc:
            raise SpoolFull(f"producer spool {self.spool.directory} cannot be written: {exc}") from exc
        if not stored:
            raise SpoolFull(f"producer spool {self.spool.directory} is full ({self.spool.max_bytes} bytes)")
        self._metrics["durable"].inc(len(records))
        self.counts["spooled"] += len(records)

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
        self._count_dropped(why)
        return False

    def _spool_first(self, records: list[tuple[int, bytes | None, bytes, int]], reason: str) -> None:
        """Write undelivered events, in send order, before everything already spooled
        (caller holds the lock); what does not fit is counted as dropped."""
        if not records:
            return
        records.sort(key=lambda record: record[0])
        try:
            kept = self.spool.prepend([(key, value, sent_ms) for _order, key, value, sent_ms in records])
        except OSError as exc:
            log.error("producer spool %s cannot be written: %s", self.spool.directory, exc)
            kept = 0
        if kept:
            SPOOLED.labels(topic=self.topic, reason=reason).inc(kept)
            self.counts["spooled"] += kept
        if kept < len(records):
            self._count_dropped("spool_full", len(records) - kept)

    def _count_dropped(self, why: str, count: int = 1) -> None:
        DROPPED.labels(topic=self.topic, reason=why).inc(count)
        before = self.counts["dropped"]
        self.counts["dropped"] += count
        if before == 0 or before // 1000 != self.counts["dropped"] // 1000:
            log.error("producer spool %s (at most %d bytes): %d events dropped so far (%s)",
                      self.spool.directory, self.spool.max_bytes, self.counts["dropped"], why)

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
        elif err.fatal() or code == KafkaError._FATAL:
            self._fatal = True
        else:
            log.debug("producer error: %s", err.str())

    def _delivered(self, msg) -> None:
        """Count a delivery (caller holds the lock)."""
        self._delivered_many([msg.timestamp()[1]])

    def _delivered_many(self, sent_times_ms: list[int]) -> None:
        """Count deliveries and their latency from their send times (caller holds the lock)."""
        if not sent_times_ms:
            return
        self.counts["delivered"] += len(sent_times_ms)
        if self._broker_down:
            log.info("broker of %s is back", self.config["bootstrap.servers"])
            self._broker_down = False
        now_ms, counts, total_ms = time.time() * 1000, self._latency_counts, 0.0
        bucket_of, bounds_ms = bisect.bisect_left, DELIVERY_BUCKETS_MS
        for sent_ms in sent_times_ms:
            if sent_ms > 0:
                took_ms = now_ms - sent_ms if now_ms > sent_ms else 0.0
                counts[bucket_of(bounds_ms, took_ms)] += 1
                total_ms += took_ms
        self._latency_seconds += total_ms / 1000

    def _retryable(self, err: KafkaError) -> bool:
        """Count a delivery error (caller holds the lock); True when the message is worth
        another try."""
        DELIVERY_ERRORS.labels(topic=self.topic, code=err.name()).inc()
        self.counts["delivery_errors"] += 1
        if err.fatal():
            self._fatal = True
        return err.code() not in PERMANENT_ERRORS

    def _drop_permanently(self, err: KafkaError, msg) -> None:
        self._count_dropped("permanent_error")
        log.error("event dropped: %s (%d bytes)", err.str(), len(msg.value() or b""))

    def _on_direct(self, generation: int, order: int, err, msg) -> None:
        with self._lock:
            if generation != self._generation:
                return  # a replaced producer's report: the event was re-spooled
            record = self._inflight.pop(order, None)
            if record is None:
                return
            if err is None:
                self._delivered(msg)
            elif self._retryable(err):
                self._failed.append((order, *record))
                self._spooling = True
            else:
                self._drop_permanently(err, msg)

    def _on_replay(self, generation: int, handle, err, msg) -> None:
        # Only noted here: confluent-kafka takes the GIL for every report, and the work of
        # a report (lock, spool ack, counters, latency) costs less done for all at once.
        self._replay_reports.append((generation, handle, err, msg))

    def _settle_replays(self) -> None:
        """Apply the replay reports of the last poll: acknowledge the delivered records in
        the spool; a retryable failure leaves its record unacknowledged, read again from its
        place (a report of a replaced producer is ignored: its record stays unacknowledged)."""
        reports = self._replay_reports
        if not reports:
            return
        delivered, acknowledged = [], []
        with self._lock:
            generation = self._generation
            while reports:
                report_generation, handle, err, msg = reports.popleft()
                if report_generation != generation:
                    continue
                self._replay_outstanding -= 1
                if err is None:
                    acknowledged.append(handle)
                    delivered.append(msg)
                elif self._retryable(err):
                    self._replay_failed = True
                else:
                    acknowledged.append(handle)
                    self._drop_permanently(err, msg)
            self.spool.ack_many(acknowledged)
            self.counts["replayed"] += len(delivered)
            self._delivered_many([msg.timestamp()[1] for msg in delivered])

    # -- the background thread -------------------------------------------------------------

    def _run(self) -> None:
        last_sync = time.monotonic()
        while not self._stop.is_set():
            try:
                self._poll(self._poll_s)
                self._publish()
                if self._fatal:
                    self._recreate()
                self._fly() if self.durable else self._pump()
                now = time.monotonic()
                if now - last_sync >= self.fsync_interval_s:
                    last_sync = now
                    self._sync()
            except Exception:
                log.exception("producer background thread error")
                time.sleep(0.5)

    def _poll(self, timeout: float, *, flushing: bool = False) -> None:
        """Serve delivery reports (``flushing``: sending what lingers right away); a fatal
        error raised here marks the producer for replacement."""
        producer = self._producer
        try:
            producer.flush(timeout) if flushing else producer.poll(timeout)
        except KafkaException as exc:
            if not is_fatal(exc):
                raise
            if producer is not self._producer:
                return  # already replaced (flush() raced with the background thread)
            if not self._fatal:
                log.error("fatal producer error (%s): replacing the producer", exc.args[0].str())
            self._fatal = True
        finally:
            self._settle_replays()

    def _publish(self) -> None:
        """Add deliveries to the Prometheus counters once per loop: a labelled inc() per
        message costs as much as the rest of its delivery report."""
        for name in ("delivered", "replayed"):
            new = self.counts[name] - self._published[name]
            if new:
                self._metrics[name].inc(new)
                self._published[name] += new
        if self._latency_seconds or any(self._latency_counts):
            with self._lock:
                counts, seconds = self._latency_counts, self._latency_seconds
                self._latency_counts, self._latency_seconds = [0] * len(counts), 0.0
            DELIVERY_SECONDS.add(self.topic, counts, seconds)

    def _pump(self) -> None:
        """Move spooled records into librdkafka, oldest first, a window at a time, in
        short steps so that send() never waits long for the lock."""
        while True:
            with self._lock:
                if not self._spooling:
                    return
                if self._failed:
                    if self._inflight or self._replay_outstanding:
                        # Newer events still queued must not overtake the failed ones: librdkafka
                        # hands them back (as failures, re-sent in order); in-flight ones finish.
                        self._producer.purge(in_queue=True, in_flight=False, blocking=False)
                        return
                    failed, self._failed = self._failed, []
                    self._spool_first(failed, "delivery_error")
                if self._replay_failed:
                    if self._replay_outstanding:
                        return
                    self._replay_failed = False
                    self.spool.restart_reading()
                if self._replay_outstanding == 0 and not self.durable and self.spool.settle():
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
                    if not self._produce_replay(record):
                        return

    def _produce_replay(self, record: SpoolRecord) -> bool:
        """Hand one spooled record to librdkafka (caller holds the lock); False when it
        does not take it now."""
        try:
            self._producer.produce(self.topic, record.value, record.key, timestamp=record.sent_ms,
                                   on_delivery=functools.partial(self._on_replay, self._generation, record.handle))
        except (BufferError, KafkaException) as exc:
            self._not_taken(record, exc)
            return False
        self._replay_outstanding += 1
        return True

    def _not_taken(self, record: SpoolRecord, exc: BufferError | KafkaException) -> None:
        """librdkafka refused a spooled record (caller holds the lock): it is read again from
        its place; a fatal error marks the producer for replacement, any other is raised."""
        self.spool.rewind(record)
        if isinstance(exc, KafkaException):
            if not is_fatal(exc):
                raise exc
            self._fatal = True

    def _new_producer(self) -> Producer:
        """A librdkafka producer; a durable one reports only failed deliveries, tagged with
        its number so that a replaced producer's reports are ignored."""
        self._producer_number += 1
        if not self.durable:
            return Producer(self.config)
        return Producer({**self.config,
                         "on_delivery": functools.partial(self._on_flight_error, self._producer_number)})

    def _on_flight_error(self, producer_number: int, err, msg) -> None:
        if producer_number == self._producer_number:
            self._flight_errors[(msg.key(), msg.value())] = err

    def _fly(self) -> None:
        """Durable mode: hand the spool's records to librdkafka one flight at a time, up to
        ``replay_window`` records. A flight has landed when librdkafka holds nothing (no
        message and no unserved report): its records are acknowledged in the spool, except
        those that failed (read again from their place when retryable). While the broker is
        down the flight waits in librdkafka as the probe and the rest stays on disk."""
        with self._lock:
            if self._flight:
                if len(self._producer):
                    return
                self._land()
        budget = self.replay_window
        while budget > 0:
            with self._lock:  # in short steps, so that send_many never waits long for the lock
                for _ in range(min(256, budget)):
                    record = self.spool.read()
                    if record is None:
                        return
                    try:
                        self._producer.produce(self.topic, record.value, record.key, timestamp=record.sent_ms)
                    except (BufferError, KafkaException) as exc:
                        self._not_taken(record, exc)
                        return
                    self._flight.append(record)
                    budget -= 1

    def _land(self) -> None:
        """Acknowledge a landed flight (caller holds the lock)."""
        flight, errors = self._flight, self._flight_errors
        self._flight, self._flight_errors = [], {}
        if not errors:
            self.spool.ack_many([record.handle for record in flight])
            delivered = flight
        else:
            delivered, acknowledged = [], []
            for record in flight:
                err = errors.get((record.key, record.value))
                if err is None:
                    delivered.append(record)
                    acknowledged.append(record.handle)
                elif self._retryable(err):
                    self._replay_failed = True
                else:
                    acknowledged.append(record.handle)
                    self._count_dropped("permanent_error")
                    log.error("event dropped: %s (%d bytes)", err.str(), len(record.value))
            self.spool.ack_many(acknowledged)
            if self._replay_failed:
                self._replay_failed = False
                self.spool.restart_reading()
        self.counts["replayed"] += len(delivered)
        self._delivered_many([record.sent_ms for record in delivered])

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

    def _take_undelivered(self) -> list[tuple[int, bytes | None, bytes, int]]:
        """Detach the current producer's reports and return every direct send it has not
        acknowledged (caller holds the lock); replays stay unacknowledged in the spool."""
        self._generation += 1
        undelivered = self._failed + [(order, *record) for order, record in self._inflight.items()]
        self._failed, self._inflight = [], {}
        self._replay_outstanding = 0
        self._replay_failed = False
        self._flight, self._flight_errors = [], {}
        self.spool.restart_reading()
        return undelivered

    @staticmethod
    def _discard(producer: Producer) -> None:
        """Drop what a producer still holds (its reports are ignored by then)."""
        try:
            producer.purge(in_queue=True, in_flight=True, blocking=True)
            producer.poll(0)
            producer.flush(0)
        except KafkaException:
            pass  # a fatal producer refuses to do more; its events are in our records

    def _recreate(self) -> None:
        """A fatal error makes a producer unusable: start a new one, and re-send every event
        the old one did not acknowledge, in send order, before what was spooled."""
        with self._lock:
            self._fatal = False
            old, self._producer = self._producer, self._new_producer()
            self._spool_first(self._take_undelivered(), "fatal_error")
            self._spooling = True
            self.counts["recreated"] += 1
        RECREATED.labels(topic=self.topic).inc()
        log.warning("producer of %s replaced after a fatal error; %d events spooled for re-sending",
                    self.topic, self.spool.pending)
        self._discard(old)

    # -- shutdown -------------------------------------------------------------------------

    def pending(self) -> int:
        """Events accepted but not yet acknowledged (in flight, failed or spooled)."""
        with self._lock:
            return len(self._inflight) + len(self._failed) + self.spool.pending

    def flush(self, timeout: float = 10.0) -> int:
        """Wait up to ``timeout`` s for every accepted event (spooled ones included) to be
        acknowledged; return how many are still pending."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = self.pending()
            left = deadline - time.monotonic()
            if remaining == 0 or left <= 0:
                return remaining
            self._poll(min(0.1, left), flushing=True)
            if self._fatal:
                time.sleep(min(0.05, max(left, 0)))  # the background thread replaces the producer

    def close(self, timeout: float | None = None) -> int:
        """Flush for up to ``timeout`` s, then keep whatever is still undelivered in the
        spool for the next producer; return how many events were left in the spool."""
        if self._closed:
            return self.spool.pending if self.spool else 0
        self.flush(self.close_timeout_s if timeout is None else timeout)
        with self._lock:
            self._closed = True
        self._stop.set()
        self._thread.join(timeout=5)
        # Whatever librdkafka still holds goes back to disk: never sent (queued) is safe;
        # in flight may have reached the broker (a possible duplicate, dropped by event_id).
        with self._lock:
            undelivered = self._take_undelivered()
        self._discard(self._producer)
        self._publish()
        with self._lock:
            self._spool_first(undelivered, "shutdown")
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
