"""`gatewatch demo --via-api`: the generated traffic sent the way a gateway without Kafka
sends it, through `gatewatch serve`.

Most events go to POST /v1/events as JSON batches; a share of them go to POST /v1/traces
as OpenTelemetry GenAI spans (built as the SDK's ReadableSpan and encoded by the OTLP
exporter's own protobuf encoder, gzip-compressed). The messages the generator makes
malformed stay malformed: a cut-short or garbled body is sent alone and must get a 400, a
rule-breaking event must be rejected in its batch (a 400, a `rejected_count`, or an OTLP
`partial_success`). Each rejection is counted, so the demo reconciles them against what
the generator made bad.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ops.dev.loadgen import REGIONS

JSON_BATCH = 200
OTLP_BATCH = 100
MAX_ATTEMPTS = 30
"""Tries of one request answered 429/503 (each waits its Retry-After) before the demo gives up."""


class JsonWire:
    """generate()'s codec for the API: an event as the JSON a gateway posts. The malformed
    messages generate() derives from it are garbled JSON (unreadable bodies) or events
    that break a rule, as they are for Kafka."""

    @staticmethod
    def encode(event: dict) -> bytes:
        return json.dumps(event).encode()


@dataclass
class FeedCounts:
    requests: int = 0
    json_events: int = 0
    otlp_spans: int = 0
    accepted: int = 0
    rejected: int = 0
    """Items the API refused: a whole request's with 400, or those listed in a 2xx."""
    retries: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"requests": self.requests, "json_events": self.json_events, "otlp_spans": self.otlp_spans,
                "accepted": self.accepted, "rejected": self.rejected, "retries": self.retries,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())}}


class ServeProcess:
    """`python -m ops.cli serve` in its own process group, its log in a file."""

    def __init__(self, root: Path, bootstrap: str, port: int, timeout_s: float = 120,
                 env: dict[str, str] | None = None):
        root.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{port}"
        self.keys_path = root / "keys.sqlite"
        self.log_path = root / "serve.log"
        env = {**os.environ, "GATEWATCH_KAFKA__BOOTSTRAP": bootstrap,
               "GATEWATCH_API__KEYS_PATH": str(self.keys_path), "GATEWATCH_API__SPOOL_DIR": str(root / "spool"), **(env or {})}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "serve", "--port", str(port)], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gatewatch serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gatewatch serve did not get ready within {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM: the server flushes its producers, so every accepted event is in Kafka."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def create_keys(keys_path: Path, orgs: list[str]) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """One key per org for JSON (the event's own region, so a bad region is refused) and one
    per (org, region) for OTLP, whose spans carry no region of their own."""
    from connectors.ingest_api.keys import ApiKeyStore

    store = ApiKeyStore(str(keys_path))
    json_keys = {org: store.create(org)[0] for org in orgs}
    otlp_keys = {(org, region): store.create(org, region)[0] for org in orgs for region in REGIONS}
    return json_keys, otlp_keys


def goes_by_otlp(event: dict, share: float) -> bool:
    """Fixed per event id (a duplicate takes its original's way); only events of a region
    an OTLP key can stand for."""
    return event.get("region") in REGIONS and zlib.crc32(str(event.get("event_id")).encode()) % 1000 < share * 1000


def span_ids(event: dict) -> tuple[int, int]:
    """The event's own trace and span id (schema v2), else ids derived from its event_id."""
    if event.get("trace_id") and event.get("span_id"):
        return int(event["trace_id"], 16), int(event["span_id"], 16)
    digest = hashlib.sha256(str(event["event_id"]).encode()).digest()
    return int.from_bytes(digest[:16], "big") or 1, int.from_bytes(digest[16:24], "big") or 1


def _messages(role: str, text: str) -> str:
    """One message in the JSON shape of gen_ai.input.messages / gen_ai.output.messages."""
    return json.dumps([{"role": role, "parts": [{"type": "text", "content": text}]}])


def genai_span(event: dict):
    """The event as the GenAI client span an instrumented gateway exports (OpenTelemetry
    semantic conventions: input_tokens include the cached parts, output the reasoning)."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    trace_id, span_id = span_ids(event)
    start_ns = event["event_time"] * 1_000_000
    attributes = {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": event["provider"],
        "gen_ai.request.model": event["model"], "gen_ai.request.stream": event["streaming"],
        "gen_ai.usage.input_tokens": event["input_tokens"] + event["cache_read_tokens"] + event["cache_write_tokens"],
        "gen_ai.usage.output_tokens": event["output_tokens"],
        "gen_ai.usage.cache_read.input_tokens": event["cache_read_tokens"],
        "gen_ai.usage.cache_creation.input_tokens": event["cache_write_tokens"],
        "gen_ai.usage.reasoning.output_tokens": event.get("reasoning_tokens", 0),
        "user.id": event["user_id"], "gatewatch.request_id": event["request_id"],
        "http.response.status_code": event["status_code"],
        "gen_ai.input.messages": _messages("user", event["prompt"]),
        "gen_ai.output.messages": _messages("assistant", event["response"]),
    }
    failed = event["status_code"] >= 400
    return ReadableSpan(f"chat {event['model']}", context=SpanContext(trace_id, span_id, False, TraceFlags(1)),
                        attributes=attributes, kind=SpanKind.CLIENT, start_time=start_ns,
                        end_time=start_ns + event["latency_ms"] * 1_000_000,
                        status=Status(StatusCode.ERROR if failed else StatusCode.UNSET))


def otlp_body(events: list[dict]) -> bytes:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    return gzip.compress(encode_spans([genai_span(event) for event in events]).SerializeToString())


class ApiClient:
    def __init__(self, url: str, counts: FeedCounts):
        self.url = url
        self.counts = counts

    def post(self, path: str, body: bytes, key: str, content_type: str, gzipped: bool = False) -> tuple[int, bytes]:
        """The answer to one request, retried while the server says it is behind (429/503)."""
        headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type,
                   **({"Content-Encoding": "gzip"} if gzipped else {})}
        for _attempt in range(MAX_ATTEMPTS):
            request = urllib.request.Request(f"{self.url}{path}", data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    status, payload, retry_after = answer.status, answer.read(), None
            except urllib.error.HTTPError as error:
                status, payload, retry_after = error.code, error.read(), error.headers.get("Retry-After")
            self.counts.requests += 1
            self.counts.statuses[status] = self.counts.statuses.get(status, 0) + 1
            if status not in (429, 503):
                return status, payload
            self.counts.retries += 1
            time.sleep(float(retry_after or 1))
        raise RuntimeError(f"POST {path} was refused {MAX_ATTEMPTS} times in a row ({status}): {payload[:300]!r}")

    def tally(self, items: int, rejected: int) -> None:
        self.counts.accepted += items - rejected
        self.counts.rejected += rejected

    def send_json(self, body: bytes, items: int, key: str) -> None:
        status, payload = self.post("/v1/events", body, key, "application/json")
        if status == 400:
            self.tally(items, items)
        elif status == 200:
            self.tally(items, json.loads(payload).get("rejected_count", 0))
        else:
            raise RuntimeError(f"POST /v1/events answered {status}: {payload[:300]!r}")

    def send_spans(self, events: list[dict], key: str) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        status, payload = self.post("/v1/traces", otlp_body(events), key, "application/x-protobuf", gzipped=True)
        if status == 400:
            self.tally(len(events), len(events))
        elif status == 200:
            answer = ExportTraceServiceResponse()
            answer.ParseFromString(payload)
            self.tally(len(events), answer.partial_success.rejected_spans)
        else:
            raise RuntimeError(f"POST /v1/traces answered {status}: {payload[:300]!r}")


def feed(url: str, messages: list[tuple[bytes, bytes]], json_keys: dict[str, str],
         otlp_keys: dict[tuple[str, str], str], otlp_share: float, progress=None) -> FeedCounts:
    """Send every generated message through the API; per user in the order generated (a
    user's pending batch on the other route is sent first), so lateness stays what the
    generator made it. That order costs batch size: a heavy user switching routes cuts
    batches short (about 2.4 events per request in the default demo; remembering which
    batch must precede which instead saved under 2% of the requests, so it was left out)."""
    counts = FeedCounts()
    client = ApiClient(url, counts)
    batches: dict[tuple, list[dict]] = {}
    pending_in: dict[str, tuple] = {}
    any_key = next(iter(json_keys.values()))

    def flush(route: tuple) -> None:
        events = batches.pop(route, [])
        if not events:
            return
        if route[0] == "otlp":
            counts.otlp_spans += len(events)
            client.send_spans(events, otlp_keys[route[1:]])
        else:
            counts.json_events += len(events)
            client.send_json(json.dumps(events).encode(), len(events), json_keys[route[1]])

    for sent, (key, value) in enumerate(messages, 1):
        try:
            event = json.loads(value)
        except ValueError:
            event = None
        if not isinstance(event, dict) or event.get("org_id") not in json_keys:
            # Unreadable: alone in its request, or it would take its batch down with it.
            counts.json_events += 1
            client.send_json(value, 1, json_keys.get(key.decode().split("/", 1)[0], any_key))
            continue
        by_otlp = goes_by_otlp(event, otlp_share)
        route = ("otlp", event["org_id"], event["region"]) if by_otlp else ("json", event["org_id"])
        user = key.decode()
        if pending_in.get(user, route) != route:
            flush(pending_in[user])
        pending_in[user] = route
        batches.setdefault(route, []).append(event)
        if len(batches[route]) >= (OTLP_BATCH if by_otlp else JSON_BATCH):
            flush(route)
        if progress and sent % 500 == 0:
            progress(sent)
    for route in list(batches):
        flush(route)
    return counts
