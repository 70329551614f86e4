"""The ingestion API as a plain ASGI application (no framework: six routes, and the
per-request overhead is what bounds events/s).

Routes: ``POST /v1/traces`` (OTLP/HTTP, protobuf or JSON, gzip/deflate), ``POST /v1/events``
(gateway events as JSON: an object, an array or NDJSON; a W3C ``traceparent`` header gives
its trace and span id to the events that carry none), ``GET /healthz``, ``GET /readyz``,
``GET /metrics``. Every response carries ``X-Request-Id`` (the client's, or a new one).

HTTP semantics: 401 without a known key, 403 for a revoked key, 413 over the body limit
(compressed or not), 415 for an unknown content type, 400 naming the field and the rule
when nothing in a request is valid, 200 with the rejected items listed (OTLP:
``partial_success``) when only some are, 429 with ``Retry-After`` while the producer holds
more than ``max_pending`` unacknowledged events or its spool is nearly full: memory stays
bounded and nothing is accepted that the spool would have to drop. Each rejected item and
each unreadable body also gets a DLQ record (see ``dead_letters``).

What a 2xx means: every accepted event went through ``EventProducer.send_many`` (validated,
Avro-encoded, keyed). With a durable producer (serve's default) it is in the worker's disk
spool before the answer is sent, so it survives a broker outage, a restart and a crash
(SIGKILL, OOM) of ``serve``: the next producer on that spool slot delivers it. Not a power
loss within the spool's fsync interval. A non-durable producer (``api.durable=false``) may
still hold it only in librdkafka's memory: faster, lost if ``serve`` crashes.

A spool that cannot take a request's events (full, disk error: the producer raises
``SpoolFull``) answers 503 with ``Retry-After``, and none of them is stored: the client
retries the whole request.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from google.protobuf.message import DecodeError
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from prometheus_client import REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from connectors.ingest_api import otlp
from connectors.ingest_api.dead_letters import rejection
from connectors.ingest_api.keys import ApiKey, ApiKeyStore, KeyRevoked, KeyStoreUnavailable
from connectors.ingest_api.tracing import end_request_span, start_request_span
from connectors.producer import SpoolFull
from schemas.codec import InvalidEvent

log = logging.getLogger("connectors.ingest_api")

REQUESTS = Counter("gatewatch_api_requests", "HTTP requests answered by the ingestion API", ["route", "status"])
EVENTS = Counter("gatewatch_api_events", "Events (and GenAI spans) by outcome", ["source", "outcome"])
THROTTLED = Counter("gatewatch_api_throttled", "Requests refused with 429 while Kafka is behind")
SPOOL_FULL = Counter("gatewatch_api_spool_full", "Requests refused with 503: the durable spool could not store an event")
SPANS_DROPPED = Counter("gatewatch_api_spans_dropped", "OTLP spans that are not GenAI calls (counted, not stored)")
BAD_TRACEPARENT = Counter("gatewatch_api_bad_traceparent",
                          "Requests whose traceparent header was malformed (ignored, as W3C trace context says)")
ORG_OVERRIDDEN = Counter("gatewatch_api_org_overridden", "Events whose body named another org than the API key's")
REQUEST_SECONDS = Histogram("gatewatch_api_request_seconds", "Time to answer one request", ["route"],
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
MAX_LISTED_REJECTIONS = 100
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_FIELD_IN_REASON = re.compile(r"^(?:required field )?([A-Za-z_][A-Za-z0-9_.\[\]]*)")


@dataclass(frozen=True)
class ApiConfig:
    default_region: str = "us"
    """Region of events whose key has none and whose body names none."""
    max_body_bytes: int = 8 << 20
    max_decompressed_bytes: int = 32 << 20
    max_items_per_request: int = 20_000
    max_pending: int = 200_000
    """Events accepted but not yet acknowledged by Kafka above which requests get 429."""
    spool_high_water: float = 0.9
    """Share of the producer's spool in use above which requests get 429."""
    retry_after_s: int = 1


class HttpError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, headers: tuple = ()):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def _field_of(exc: InvalidEvent) -> str | None:
    match = _FIELD_IN_REASON.match(exc.reason)
    return match.group(1) if match else None


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The body after Content-Encoding, never more than ``limit`` bytes (a gzip bomb is a 413)."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise HttpError(415, f"Content-Encoding {encoding[:20]!r} is not supported (gzip, deflate, identity)")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HttpError(400, f"body is not valid {encoding}: {exc}", field="body") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise HttpError(413, f"decompressed body exceeds {limit} bytes")
    return out


def parse_events(body: bytes) -> list:
    """A JSON object, a JSON array, or NDJSON (one object per line) as a list of items."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as first:
        lines = [line for line in body.split(b"\n") if line.strip()]
        if len(lines) < 2:
            raise HttpError(400, f"body is not JSON: {first}", field="body") from None
        items = []
        for number, line in enumerate(lines, 1):
            try:
                items.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise HttpError(400, f"NDJSON line {number} is not JSON: {exc}", field=f"line {number}") from None
        return items
    return document if isinstance(document, list) else [document]


def parse_traceparent(header: str) -> tuple[str, str] | None:
    """(trace id, parent span id) of a W3C ``traceparent`` header, or None when it is
    malformed: version ff, all-zero ids, or anything after the flags of version 00."""
    match = _TRACEPARENT.match(header.strip().lower())
    if match is None:
        return None
    version, trace_id, span_id, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or not int(trace_id, 16) or not int(span_id, 16):
        return None
    return trace_id, span_id


def schema_defaults(producer) -> dict | None:
    """The default of every field of the producer's event schema that has one (None for a
    producer without an EventCodec)."""
    codec = getattr(producer, "codec", None)
    reader = getattr(codec, "reader", None)
    if reader is None:
        return None
    return {field["name"]: field["default"] for field in reader.parsed["fields"] if "default" in field}


class IngestApp:
    """ASGI app. ``open_producer`` is called once per process at startup (ASGI lifespan,
    or on the first request): it returns an EventProducer-like object with ``send_many``,
    ``pending``, ``spool`` and ``close``. ``open_dead_letters`` (optional) returns a
    DeadLetters for the DLQ records of rejected input."""

    def __init__(self, open_producer: Callable[[], Any], keys: ApiKeyStore, config: ApiConfig = ApiConfig(),
                 open_dead_letters: Callable[[], Any] | None = None):
        self.open_producer = open_producer
        self.open_dead_letters = open_dead_letters
        self.keys = keys
        self.config = config
        self.producer = None
        self.dead_letters = None
        self._span_defaults: dict | None = None
        self.routes = {("POST", "/v1/traces"): self.traces, ("POST", "/v1/events"): self.events,
                       ("GET", "/healthz"): self.healthz, ("GET", "/readyz"): self.readyz,
                       ("GET", "/metrics"): self.metrics}
        self._paths = {path for _method, path in self.routes}

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        path = scope["path"]
        route = path if path in self._paths else "other"
        handler = self.routes.get((scope["method"], path))
        span = start_request_span(scope["method"], route, headers, request_id)
        try:
            if handler is None:
                raise HttpError(405 if path in self._paths else 404,
                                f"{scope['method']} {path[:100]} is not a route of this API")
            status, content_type, body, extra = await handler(headers, receive, request_id)
        except HttpError as exc:
            status, extra = exc.status, exc.headers
            content_type, body = self._error_body(route, headers, exc, request_id)
            log.info("request refused: %s", exc.message, extra={"request_id": request_id, "route": route,
                                                                 "status": status})
        except Exception:  # noqa: BLE001 - a bug must answer 500 and keep serving
            log.exception("request failed", extra={"request_id": request_id, "route": route})
            status, content_type, extra = 500, JSON, ()
            body = orjson.dumps({"error": "internal error", "request_id": request_id})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type.encode()), (b"x-request-id", request_id.encode()),
                                (b"content-length", str(len(body)).encode()),
                                *((k.encode(), v.encode()) for k, v in extra)]})
        await send({"type": "http.response.body", "body": body})
        end_request_span(span, status)
        REQUESTS.labels(route=route, status=str(status)).inc()
        REQUEST_SECONDS.labels(route=route).observe(time.perf_counter() - started)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.start()
                except Exception as exc:  # noqa: BLE001 - reported to the server, which exits
                    log.exception("ingestion API cannot start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def start(self) -> None:
        if self.producer is None:
            self.producer = self.open_producer()
            self._span_defaults = schema_defaults(self.producer)
        if self.dead_letters is None and self.open_dead_letters is not None:
            self.dead_letters = self.open_dead_letters()

    def stop(self) -> None:
        if self.dead_letters is not None:
            self.dead_letters.close()
            self.dead_letters = None
        if self.producer is not None:
            left = self.producer.close()
            log.info("ingestion API stopped; %s events left in the producer's spool", left)
            self.producer = None

    @staticmethod
    def _error_body(route: str, headers: dict, exc: HttpError, request_id: str) -> tuple[str, bytes]:
        if route == "/v1/traces" and headers.get("content-type", "").startswith(PROTOBUF):
            return PROTOBUF, RpcStatus(code=3 if exc.status == 400 else 8, message=exc.message).SerializeToString()
        error = {"error": exc.message, "status": exc.status, "request_id": request_id}
        if exc.field:
            error["field"] = exc.field
        return JSON, orjson.dumps(error)

    # -- shared request steps ------------------------------------------------------------

    def authenticate(self, headers: dict) -> ApiKey:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise HttpError(401, "missing API key: send Authorization: Bearer <key>",
                            headers=(("www-authenticate", "Bearer"),))
        try:
            record = self.keys.authenticate(key.strip())
        except KeyRevoked:
            raise HttpError(403, "this API key was revoked") from None
        except KeyStoreUnavailable:  # 503, not 500: OTLP exporters retry 503 (and honour Retry-After)
            raise HttpError(503, "the API key store cannot answer right now; retry later",
                            headers=(("retry-after", str(self.config.retry_after_s)),)) from None
        if record is None:
            raise HttpError(401, "unknown API key", headers=(("www-authenticate", 'Bearer error="invalid_token"'),))
        return record

    def admit(self) -> None:
        """429 while Kafka is not keeping up: bounded memory, and no spool overflow."""
        if self.producer is None:
            self.start()
        pending = self.producer.pending()
        spool = self.producer.spool
        if pending >= self.config.max_pending or spool.bytes >= self.config.spool_high_water * spool.max_bytes:
            THROTTLED.inc()
            raise HttpError(429, f"{pending} events wait for Kafka; retry later",
                            headers=(("retry-after", str(self.config.retry_after_s)),))

    async def read_body(self, headers: dict, receive) -> bytes:
        limit = self.config.max_body_bytes
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise HttpError(413, f"body of {declared} bytes exceeds {limit} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"body exceeds {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        return decompress(body, headers.get("content-encoding", "").strip().lower(),
                          self.config.max_decompressed_bytes)

    def _check_count(self, count: int) -> None:
        if count > self.config.max_items_per_request:
            raise HttpError(413, f"{count} items in one request; at most {self.config.max_items_per_request}")

    def _send_all(self, events: list[dict]) -> list[InvalidEvent | None]:
        """Each event's problem (None: accepted); 503 when the spool cannot take the batch."""
        try:
            return self.producer.send_many(events)
        except SpoolFull as exc:
            SPOOL_FULL.inc()
            log.error("request refused: %s", exc)
            raise HttpError(503, "the server cannot store events durably right now; retry later",
                            headers=(("retry-after", str(self.config.retry_after_s)),)) from None

    def _dead_letter(self, records: list[dict], org_id: str) -> None:
        if records and self.dead_letters is not None:
            self.dead_letters.send(records, org_id)

    @staticmethod
    def _count(source: str, accepted: int, rejected: int) -> None:
        # Once per request, not per event: a labelled inc() costs as much as a small event.
        if accepted:
            EVENTS.labels(source=source, outcome="accepted").inc(accepted)
        if rejected:
            EVENTS.labels(source=source, outcome="rejected").inc(rejected)

    # -- routes ---------------------------------------------------------------------------

    async def events(self, headers: dict, receive, request_id: str):
        key = self.authenticate(headers)
        self.admit()
        body = await self.read_body(headers, receive)
        with self._dead_lettered(request_id, key.org_id, body):
            items = parse_events(body)
        self._check_count(len(items))
        trace_context = self._trace_context(headers, request_id)
        rejected, letters, candidates = [], [], []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                reason = f"item {index} is {type(item).__name__}, expected an object"
                rejected.append({"index": index, "code": "wrong_type", "field": None, "reason": reason})
                letters.append(rejection(code="wrong_type", reason=reason, request_id=request_id, index=index,
                                         original=orjson.dumps(item), event_id=None))
                continue
            if item.get("org_id") not in (None, key.org_id):
                ORG_OVERRIDDEN.inc()
            item["org_id"] = key.org_id
            if key.region:
                item["region"] = key.region
            elif not item.get("region"):
                item["region"] = self.config.default_region
            if trace_context and item.get("trace_id") is None and item.get("span_id") is None:
                item["trace_id"], item["span_id"] = trace_context
            candidates.append((index, item))
        outcomes = self._send_all([item for _index, item in candidates])
        accepted = outcomes.count(None)
        for (index, item), problem in zip(candidates, outcomes):
            if problem is not None:
                rejected.append({"index": index, "code": problem.code, "field": _field_of(problem),
                                 "reason": problem.reason})
                event_id = item.get("event_id")
                letters.append(rejection(code=problem.code, reason=problem.reason, request_id=request_id,
                                         index=index, original=orjson.dumps(item),
                                         event_id=event_id if isinstance(event_id, str) else None))
        rejected.sort(key=lambda entry: entry["index"])
        self._count("json", accepted, len(rejected))
        self._dead_letter(letters, key.org_id)
        if rejected:
            log.info("%d of %d events rejected", len(rejected), len(items),
                     extra={"request_id": request_id, "org_id": key.org_id, "first_reason": rejected[0]["reason"]})
        if rejected and not accepted:
            first = rejected[0]
            body = {"error": f"no valid event: {first['reason']}", "status": 400, "field": first["field"],
                    "code": first["code"], "rejected": rejected[:MAX_LISTED_REJECTIONS],
                    "request_id": request_id}
            return 400, JSON, orjson.dumps(body), ()
        body = {"accepted": accepted, "rejected_count": len(rejected)}
        if rejected:
            body["rejected"] = rejected[:MAX_LISTED_REJECTIONS]
        return 200, JSON, orjson.dumps(body), ()

    @staticmethod
    def _trace_context(headers: dict, request_id: str) -> tuple[str, str] | None:
        header = headers.get("traceparent")
        if header is None:
            return None
        parsed = parse_traceparent(header)
        if parsed is None:
            BAD_TRACEPARENT.inc()
            log.info("malformed traceparent header ignored (%d characters)", len(header),
                     extra={"request_id": request_id})
        return parsed

    async def traces(self, headers: dict, receive, request_id: str):
        key = self.authenticate(headers)
        self.admit()
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in (PROTOBUF, JSON):
            raise HttpError(415, f"Content-Type must be {PROTOBUF} or {JSON}")
        body = await self.read_body(headers, receive)
        with self._dead_lettered(request_id, key.org_id, body):
            spans = self._decode_traces(body, content_type)
        self._check_count(len(spans))
        region = key.region or self.config.default_region
        dropped, problems, letters, candidates = 0, [], [], []
        for index, span in enumerate(spans):
            try:
                event = otlp.span_to_event(span, key.org_id, region, self._span_defaults)
            except otlp.SpanRejected as exc:
                problems.append(f"span {span.span_id}: {exc.field}: {exc.rule}")
                letters.append(rejection(code="invalid_span", reason=f"{exc.field}: {exc.rule}",
                                         request_id=request_id, index=index, original=None,
                                         event_id=otlp.event_id(span)))
                continue
            if event is None:
                dropped += 1
                continue
            candidates.append((index, span, event))
        outcomes = self._send_all([event for _index, _span, event in candidates])
        accepted = outcomes.count(None)
        for (index, span, event), problem in zip(candidates, outcomes):
            if problem is not None:
                problems.append(f"span {span.span_id}: {problem.reason}")
                letters.append(rejection(code=problem.code, reason=problem.reason, request_id=request_id,
                                         index=index, original=None, event_id=event["event_id"]))
        self._count("otlp", accepted, len(problems))
        self._dead_letter(letters, key.org_id)
        if dropped:
            SPANS_DROPPED.inc(dropped)
        if problems:
            log.info("%d of %d spans rejected", len(problems), len(spans),
                     extra={"request_id": request_id, "org_id": key.org_id, "first_reason": problems[0]})
            if not accepted:
                raise HttpError(400, f"no valid GenAI span: {'; '.join(problems[:5])}")
        response = ExportTraceServiceResponse()
        if problems:
            response.partial_success.rejected_spans = len(problems)
            response.partial_success.error_message = "; ".join(problems[:20])
        if content_type == PROTOBUF:
            return 200, PROTOBUF, response.SerializeToString(), ()
        partial = ({"partialSuccess": {"rejectedSpans": str(len(problems)),
                                       "errorMessage": response.partial_success.error_message}}
                   if problems else {})
        return 200, JSON, orjson.dumps(partial), ()

    @staticmethod
    def _decode_traces(body: bytes, content_type: str):
        try:
            if content_type == PROTOBUF:
                return otlp.spans_from_protobuf(body)
            return list(otlp.spans_of(otlp.request_from_json(orjson.loads(body))))
        except DecodeError as exc:
            raise HttpError(400, f"body is not an OTLP ExportTraceServiceRequest: {exc}", field="body") from None
        except orjson.JSONDecodeError as exc:
            raise HttpError(400, f"body is not JSON: {exc}", field="body") from None
        except otlp.SpanRejected as exc:
            raise HttpError(400, exc.rule, field=exc.field) from None

    @contextlib.contextmanager
    def _dead_lettered(self, request_id: str, org_id: str, body: bytes):
        """A body that cannot be read at all gets one DLQ record (and its 400)."""
        try:
            yield
        except HttpError as exc:
            if exc.status == 400:
                self._dead_letter([rejection(code="bad_body", reason=exc.message, request_id=request_id, index=0,
                                             original=body, event_id=None)], org_id)
            raise

    async def healthz(self, headers: dict, receive, request_id: str):
        return 200, JSON, b'{"status":"ok"}', ()

    async def readyz(self, headers: dict, receive, request_id: str):
        try:
            self.admit()
        except HttpError as exc:
            return 503, JSON, orjson.dumps({"status": "not ready", "reason": exc.message}), ()
        return 200, JSON, b'{"status":"ready"}', ()

    async def metrics(self, headers: dict, receive, request_id: str):
        return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY), ()
