"""Synthetic gateway traffic: valid events, exact duplicates and malformed messages.

The generator knows what it produced, so a run can be reconciled against what the sinks
hold: `Expected` is computed from the generated events alone, never from the pipeline.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from schemas.codec import EventCodec
from sinks.quota import TOKEN_KINDS

MODELS = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude-sonnet-4"),
          ("google", "gemini-2.0-flash"), ("meta", "llama-3.3-70b")]
REGIONS = ["us", "eu", "apac"]
FIRST = ["Alice", "Bob", "Carla", "Dmitri", "Emeka", "Fatima", "Giulia", "Hiro", "Ines", "Jonas"]
LAST = ["Smith", "Okafor", "Rossi", "Tanaka", "Novak", "Garcia", "Schmidt", "Dubois"]
TOPICS = ["summarise the quarterly report", "write a SQL query for churn", "translate this paragraph",
          "explain the stack trace", "draft a polite reply to a customer", "refactor this function"]
# Named after the DLQ code each must produce.
BAD_KINDS = ("truncated", "bad_json", "unknown_schema_id", "out_of_range", "unknown_region", "future_timestamp")
# How events spread over users (and so over Kafka partitions, which are keyed by user):
# "pareto" gives user 1 over half of all events whatever the number of users (a hot key, as
# in the tests and the demo); "zipf" gives user k a share proportional to 1/k, so the
# heaviest user's share shrinks as users grow (10% of 10,000 users, 7% of a million).
USER_MIXES = ("pareto", "zipf")


@lru_cache(maxsize=8)
def _zipf_cumulative(users: int) -> list[float]:
    return list(itertools.accumulate(1 / rank for rank in range(1, users + 1)))


def draw_user(rng: random.Random, users: int, mix: str = "pareto") -> int:
    """A user number in 1..users, drawn as the mix says (see USER_MIXES)."""
    if mix == "zipf":
        cumulative = _zipf_cumulative(users)
        return min(bisect.bisect_left(cumulative, rng.random() * cumulative[-1]), users - 1) + 1
    return min(int(rng.paretovariate(1.2)), users)  # a few heavy users, a long tail


@dataclass
class Expected:
    produced: int = 0
    valid: int = 0
    duplicates: int = 0
    bad: int = 0
    tokens: int = 0
    tokens_by_kind: dict[str, int] = field(default_factory=lambda: {k: 0 for k in TOKEN_KINDS})
    pii_values: list[str] = field(default_factory=list)
    bad_kinds: dict[str, int] = field(default_factory=dict)
    events: dict[str, dict] = field(default_factory=dict)
    """The valid events by event_id, when the generator was asked to keep them."""
    late: int = 0
    """Valid events older than their user's newest event by more than the lateness."""
    reasoning_tokens: int = 0
    """Reasoning tokens of the valid (schema v2) events: part of output_tokens, counted apart."""
    v2: int = 0
    """Valid events of schema version 2 (the rest are version 1, without its fields)."""
    quota_tokens: int = 0
    """Tokens of the valid events that are not late: what the quota counters must hold."""
    windows: dict[tuple[str, str, str, int], list[int]] = field(default_factory=dict)
    """(org, user, model, window start) -> [events, *tokens by kind] of the events not late."""
    late_totals: list[dict] = field(default_factory=list)
    """The late events as one-event totals of their own window (what the flow bills as adjustments)."""

    def as_dict(self) -> dict:
        return {"produced": self.produced, "valid": self.valid, "duplicates": self.duplicates,
                "bad": self.bad, "late": self.late, "tokens": self.tokens, "reasoning_tokens": self.reasoning_tokens,
                "v2": self.v2, "quota_tokens": self.quota_tokens,
                "tokens_by_kind": dict(self.tokens_by_kind)}

    def window_totals(self, window_ms: int) -> list[dict]:
        """The final totals the windows must reach, shaped like the flow's window output."""
        return [{"org_id": org, "user_id": user, "model": model, "window_start_ms": start,
                 "window_length_ms": window_ms, "n": counts[0],
                 **{kind: counts[i] for i, kind in enumerate(TOKEN_KINDS, start=1)}}
                for (org, user, model, start), counts in self.windows.items()]


class _PinnedVersion:
    """A registry view whose latest version of a schema is an older one (to write with it)."""

    def __init__(self, registry, entry):
        self._registry = registry
        self._entry = entry

    def latest(self, _name: str) -> tuple[int, dict]:
        return self._entry.schema_id, self._entry.parsed

    def by_id(self, schema_id: int) -> dict:
        return self._registry.by_id(schema_id)


class FleetWire:
    """generate()'s codec for Kafka as a fleet of gateways on different releases writes:
    each event with the writer schema of its own schema_version (a v1 event as v1 Avro), so
    the flow reads old and new writers side by side. A registry that cannot list older
    versions (a Confluent one) gets every event in the latest schema."""

    def __init__(self, registry, validation, name: str = "gateway_event"):
        self._latest = EventCodec(registry, validation)
        older = registry.versions(name)[:-1] if hasattr(registry, "versions") else []
        self._by_version = {entry.version: EventCodec(_PinnedVersion(registry, entry), validation)
                            for entry in older}

    def encode(self, event: dict) -> bytes:
        return self._by_version.get(event.get("schema_version"), self._latest).encode(event)


def _text(rng: random.Random, words: int, phrases: list[str]) -> str:
    parts = [rng.choice(TOPICS)]
    count = len(parts[0].split())
    while count < words:
        topic = rng.choice(TOPICS)
        parts.append(topic)
        count += len(topic.split())
    for phrase in phrases:
        parts.insert(rng.randrange(len(parts) + 1), phrase)
    return ". ".join(parts)


def _words(rng: random.Random, mean: float | None, low: int, high: int) -> int:
    """Text length in words: uniform in [low, high), or lognormal around `mean` (long tail)."""
    if mean is None:
        return rng.randrange(low, high)
    sigma = 0.8
    return max(1, int(rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)))


def make_event(rng: random.Random, now_ms: int, users: int, pii_ratio: float,
               mean_words: tuple[float, float] | None = None, v2_ratio: float = 0.0,
               user_mix: str = "pareto") -> tuple[dict, list[str]]:
    """A valid event; mean_words = (prompt, response) mean lengths draws lognormal lengths.
    A share v2_ratio of them are schema version 2: reasoning tokens within the output and
    the gateway's trace and span ids; the rest are version 1, without those fields."""
    provider, model = rng.choice(MODELS)
    user = draw_user(rng, users, user_mix)
    pii: list[str] = []
    phrases: list[str] = []
    if rng.random() < pii_ratio:
        pii = [f"{rng.choice(FIRST).lower()}.{rng.choice(LAST).lower()}{rng.randrange(10**4)}@example.com",
               f"+1 415 555 {rng.randrange(1000, 9999)}"]
        phrases = [f"my email is {pii[0]}", f"call me on {pii[1]}"]
    cache_read = rng.choice([0, 0, rng.randrange(0, 2000)])
    event = {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "request_id": f"req-{rng.getrandbits(64):016x}",
        "schema_version": 1,
        "event_time": now_ms - rng.randrange(0, 5000),
        "user_id": f"user-{user:05d}",
        "org_id": f"org-{user % 7:02d}",
        "region": REGIONS[user % len(REGIONS)],
        "provider": provider,
        "endpoint": "chat.completions",
        "model": model,
        "model_version": None,
        "status_code": 200 if rng.random() > 0.02 else 429,
        "error_code": None,
        "streaming": rng.random() < 0.6,
        "latency_ms": rng.randrange(80, 9000),
        "time_to_first_token_ms": rng.randrange(50, 800),
        "input_tokens": rng.randrange(5, 3000),
        "output_tokens": rng.randrange(1, 1500),
        "cache_read_tokens": cache_read,
        "cache_write_tokens": rng.choice([0, 0, 0, rng.randrange(0, 1000)]),
        "prompt": _text(rng, _words(rng, mean_words and mean_words[0], 10, 120), phrases),
        "response": _text(rng, _words(rng, mean_words and mean_words[1], 10, 200), []),
        "conversation_id": None,
        "experiment_id": "exp-ranking" if user % 2 else None,
        "variant": ("a" if user % 4 == 1 else "b") if user % 2 else None,
        "safety_decisions": [],
        "policy_flags": [],
    }
    if v2_ratio and rng.random() < v2_ratio:
        event.update(upgrade_to_v2(rng, event))
    return event, pii


def upgrade_to_v2(rng: random.Random, event: dict) -> dict:
    """The schema v2 fields of an event: reasoning tokens (some models spend none) within
    its output tokens, and non-zero W3C trace and span ids."""
    reasoning = rng.choice([0, rng.randrange(0, event["output_tokens"] + 1)])
    return {"schema_version": 2, "reasoning_tokens": reasoning,
            "trace_id": f"{rng.getrandbits(128) | 1:032x}", "span_id": f"{rng.getrandbits(64) | 1:016x}"}


def malformed(kind: str, event: dict, codec) -> bytes:
    """A message that must land in the DLQ with the reason `kind`."""
    if kind == "truncated":
        return codec.encode(event)[:12]
    if kind == "bad_json":
        return b'{"event_id": "' + event["event_id"].encode() + b'", "oops'
    if kind == "unknown_schema_id":
        return b"\x00\x00\x00\x7f\xff" + codec.encode(event)[5:]
    broken = dict(event)
    if kind == "out_of_range":
        broken["output_tokens"] = -5
    elif kind == "unknown_region":
        broken["region"] = "atlantis"
    elif kind == "future_timestamp":
        broken["event_time"] = int(time.time() * 1000) + 86_400_000
    return json.dumps(broken).encode()


def collect(generator) -> tuple[list[tuple[bytes, bytes]], "Expected"]:
    """Every message of a generate() generator, and what it returns."""
    messages = []
    try:
        while True:
            messages.append(next(generator))
    except StopIteration as done:
        return messages, done.value


def generate(codec, count: int, dup_ratio: float = 0.05, bad_ratio: float = 0.02, users: int = 200,
             pii_ratio: float = 0.3, seed: int = 7, now_ms: int | None = None, keep_events: bool = False,
             late_ratio: float = 0.0, lateness_ms: int = 3_600_000, window_ms: int = 60_000,
             clock: Callable[[int], int] | None = None, mean_words: tuple[float, float] | None = None,
             v2_ratio: float = 0.5, user_mix: str = "pareto"):
    """Yield (key, value) messages, `count` in all, and return what a correct pipeline must
    hold afterwards as the generator's return value (StopIteration.value).

    Event times are the wall clock at generation unless now_ms pins them or clock(i) gives
    the time message i will be sent. A late event is dated more than lateness_ms before its
    user's newest event. A share v2_ratio of the events are schema version 2 (see make_event);
    user_mix spreads them over users (see USER_MIXES)."""
    rng = random.Random(seed)
    expected = Expected()
    recent: list[tuple[bytes, bytes]] = []
    watermarks: dict[str, int] = {}
    while expected.produced < count:
        roll = rng.random()
        now = clock(expected.produced) if clock else int(time.time() * 1000) if now_ms is None else now_ms
        if roll < bad_ratio:
            event, pii = make_event(rng, now, users, pii_ratio, mean_words, user_mix=user_mix)
            expected.pii_values.extend(pii)  # must not survive into the DLQ either
            kind = rng.choice(BAD_KINDS)
            key, value = f"{event['org_id']}/{event['user_id']}".encode(), malformed(kind, event, codec)
            expected.bad += 1
            expected.bad_kinds[kind] = expected.bad_kinds.get(kind, 0) + 1
        elif roll < bad_ratio + dup_ratio and recent:
            key, value = rng.choice(recent)
            expected.duplicates += 1
        else:
            event, pii = make_event(rng, now, users, pii_ratio, mean_words, v2_ratio, user_mix)
            user = f"{event['org_id']}/{event['user_id']}"
            watermark = watermarks.get(user)
            if watermark is not None and roll < bad_ratio + dup_ratio + late_ratio:
                event["event_time"] = watermark - lateness_ms - rng.randrange(1, 600_000)
            key, value = user.encode(), codec.encode(event)
            recent = (recent + [(key, value)])[-1000:]
            expected.valid += 1
            expected.pii_values.extend(pii)
            if keep_events:
                expected.events[event["event_id"]] = event
            tokens = [event[f"{kind}_tokens"] for kind in TOKEN_KINDS]
            for kind, amount in zip(TOKEN_KINDS, tokens):
                expected.tokens_by_kind[kind] += amount
            expected.tokens += sum(tokens)
            expected.reasoning_tokens += event.get("reasoning_tokens", 0)
            expected.v2 += event["schema_version"] == 2
            if watermark is not None and event["event_time"] < watermark - lateness_ms:
                expected.late += 1
                expected.late_totals.append({
                    "org_id": event["org_id"], "user_id": event["user_id"], "model": event["model"],
                    "window_start_ms": event["event_time"] - event["event_time"] % window_ms,
                    "window_length_ms": window_ms, "n": 1, "event_id": event["event_id"],
                    **dict(zip(TOKEN_KINDS, tokens))})
            else:
                start = event["event_time"] - event["event_time"] % window_ms
                counts = expected.windows.setdefault((event["org_id"], event["user_id"], event["model"], start),
                                                     [0] * (1 + len(TOKEN_KINDS)))
                counts[0] += 1
                for i, amount in enumerate(tokens, start=1):
                    counts[i] += amount
                expected.quota_tokens += sum(tokens)
                watermarks[user] = max(event["event_time"], watermark or event["event_time"])
        expected.produced += 1
        yield key, value
    return expected


def schedule(count: int, rate: float, burst_factor: float = 1.0, burst_every_s: float = 0.0,
             burst_seconds: float = 5.0) -> list[float]:
    """Send offsets (seconds from the start) of `count` messages at `rate` per second, with
    bursts of burst_factor x rate lasting burst_seconds every burst_every_s seconds (the
    first burst starts at burst_every_s)."""
    offsets = []
    t = 0.0
    for _ in range(count):
        offsets.append(t)
        in_burst = burst_every_s > 0 and t >= burst_every_s and (t % burst_every_s) < burst_seconds
        t += 1.0 / (rate * (burst_factor if in_burst else 1.0))
    return offsets


def messages_in(duration_s: float, rate: float, burst_factor: float = 1.0, burst_every_s: float = 0.0,
                burst_seconds: float = 5.0) -> int:
    """How many messages schedule() sends in duration_s."""
    bursts = 0.0
    if burst_every_s > 0:
        started = int(duration_s // burst_every_s)
        bursts = sum(min(burst_seconds, duration_s - k * burst_every_s) for k in range(1, started + 1))
    return int(rate * (duration_s + (burst_factor - 1) * bursts))
