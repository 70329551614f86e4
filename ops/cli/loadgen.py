"""`gatewatch loadgen`: realistic gateway traffic at a steady rate, with bursts."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from confluent_kafka import Producer

from ops.cli.options import config_option, settings_from
from ops.dev.loadgen import USER_MIXES, FleetWire, collect, generate, messages_in, schedule
from schemas.registry import registry_from_settings
from sinks.kafka import produce_when_room


def write_status(path: Path | None, sent: int, done: bool = False) -> None:
    if path is not None:
        path.with_suffix(".tmp").write_text(json.dumps({"sent": sent, "done": done}))
        path.with_suffix(".tmp").replace(path)


def send_paced(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], offsets: list[float],
               start: float, extra: dict | None = None, report_every_s: float = 2.0,
               status_file: Path | None = None) -> dict:
    """Send message i at start + offsets[i] (monotonic clock); return what happened.

    status_file, when given, always holds {"sent": n, "done": bool}: how far the run is,
    for a benchmark that cannot trust the broker's watermarks."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10, "batch.num.messages": 10000,
                         "compression.type": "lz4", "queue.buffering.max.messages": 1_000_000,
                         "partitioner": "murmur2_random", **(extra or {})})
    failures: list[str] = []
    behind_max = 0.0
    next_report = start + report_every_s
    reported = 0
    for i, (key, value) in enumerate(messages):
        due = start + offsets[i]
        now = time.monotonic()
        if due > now + 0.002:
            time.sleep(due - now)
        else:
            behind_max = max(behind_max, now - due)
        produce_when_room(producer, topic, value, key, lambda err, _m: err and failures.append(str(err)),
                          wait_s=0.01)
        if i % 500 == 0:
            producer.poll(0)
            write_status(status_file, i)
        now = time.monotonic()
        if now >= next_report:
            rate = (i + 1 - reported) / (now - next_report + report_every_s)
            print(f"loadgen  {now - start:6.1f} s  sent {i + 1:>9,}/{len(messages):,}  {rate:9,.0f}/s", file=sys.stderr,
                  flush=True)
            reported, next_report = i + 1, now + report_every_s
    remaining = producer.flush(60)
    seconds = time.monotonic() - start
    print(f"loadgen  {seconds:6.1f} s  sent {len(messages):>9,}/{len(messages):,}  {len(messages) / seconds:9,.0f}/s"
          " on average", file=sys.stderr, flush=True)
    write_status(status_file, len(messages), done=True)
    if failures or remaining:
        raise click.ClickException(f"{len(failures) + remaining} messages were not delivered: {failures[:3]}")
    return {"sent": len(messages), "seconds": round(seconds, 2), "events_per_s": round(len(messages) / seconds, 1),
            "max_behind_schedule_s": round(behind_max, 3)}


@click.command()
@click.option("--rate", default=1000.0, show_default=True, type=click.FloatRange(min=1), help="Average events/s.")
@click.option("--duration", default=60.0, show_default=True, type=click.FloatRange(min=1), help="Seconds.")
@click.option("--burst-factor", default=1.0, show_default=True, type=click.FloatRange(min=1),
              help="Rate multiplier during a burst.")
@click.option("--burst-every", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between burst starts (0: no bursts).")
@click.option("--burst-seconds", default=5.0, show_default=True, type=click.FloatRange(min=0.1))
@click.option("--users", default=10_000, show_default=True, type=click.IntRange(1), help="Distinct users.")
@click.option("--user-mix", type=click.Choice(USER_MIXES), default="zipf", show_default=True,
              help="How events spread over users, and so over partitions (keyed by user): zipf gives user k a "
                   "share proportional to 1/k (the heaviest 10%% of 10,000 users); pareto gives one user over half "
                   "of all events, a hot key no partitioning can spread.")
@click.option("--pii-ratio", default=0.3, show_default=True, type=click.FloatRange(0, 1))
@click.option("--dup-ratio", default=0.02, show_default=True, type=click.FloatRange(0, 0.9))
@click.option("--bad-ratio", default=0.005, show_default=True, type=click.FloatRange(0, 0.9))
@click.option("--prompt-words", default=150.0, show_default=True, type=click.FloatRange(min=1),
              help="Mean prompt length (lognormal).")
@click.option("--response-words", default=250.0, show_default=True, type=click.FloatRange(min=1),
              help="Mean response length (lognormal).")
@click.option("--v2-ratio", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Share of events of schema version 2 (reasoning tokens, trace and span ids); the rest are v1.")
@click.option("--seed", default=7, show_default=True, type=int)
@click.option("--topic", help="Default: kafka.events_topic.")
@click.option("--status-file", type=click.Path(dir_okay=False, path_type=Path),
              help='Keep {"sent": n, "done": bool} in this file while sending.')
@config_option
def loadgen(rate, duration, burst_factor, burst_every, burst_seconds, users, user_mix, pii_ratio, dup_ratio, bad_ratio,
            prompt_words, response_words, v2_ratio, seed, topic, status_file, config) -> None:
    """Produce realistic gateway events to Kafka at --rate per second for --duration seconds.

    Messages are generated before the clock starts, each dated with the time it is due to
    be sent, so generating them costs the timed run nothing."""
    settings = settings_from(config)
    topic = topic or settings.kafka.events_topic
    count = messages_in(duration, rate, burst_factor, burst_every, burst_seconds)
    offsets = schedule(count, rate, burst_factor, burst_every, burst_seconds)
    codec = FleetWire(registry_from_settings(settings.schemas), settings.validation)
    # Every message is dated with the time it is due, so generating them all must end before
    # the first is due: time a sample, and leave half as much again.
    sample_started = time.monotonic()
    for _message in generate(codec, 300, seed=seed + 1, mean_words=(prompt_words, response_words)):
        pass
    per_message = (time.monotonic() - sample_started) / 300
    start = time.monotonic() + 1 + 1.5 * count * per_message
    start_ms = time.time() * 1000 + (start - time.monotonic()) * 1000
    generator = generate(codec, count, dup_ratio, bad_ratio, users=users, pii_ratio=pii_ratio, seed=seed,
                         clock=lambda i: int(start_ms + offsets[i] * 1000),
                         mean_words=(prompt_words, response_words), v2_ratio=v2_ratio, user_mix=user_mix)
    messages, expected = collect(generator)
    print(f"loadgen  {count:,} messages generated; sending {rate:,.0f}/s for {duration:g} s"
          + (f", bursts of {burst_factor:g}x for {burst_seconds:g} s every {burst_every:g} s" if burst_every else ""),
          file=sys.stderr, flush=True)
    if time.monotonic() > start:
        print(f"loadgen  generating overran its estimate by {time.monotonic() - start:.1f} s: events are dated that much early",
              file=sys.stderr, flush=True)
        start = time.monotonic()
    result = send_paced(settings.kafka.bootstrap, topic, messages, offsets, start, settings.kafka.extra,
                        status_file=status_file)
    print(json.dumps({**result, "target_events_per_s": round(count / duration, 1), "valid": expected.valid,
                      "duplicates": expected.duplicates, "bad": expected.bad, "tokens": expected.tokens,
                      "reasoning_tokens": expected.reasoning_tokens, "v2": expected.v2}))
