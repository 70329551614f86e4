"""Billing events: per user, model and window, the cost of its tokens from a versioned price
table (``schemas.pricing``), sent to the billing topic.

A window's billing event is re-emitted with a higher `version` (the number of events it
covers) whenever events within the allowed lateness add to it; `billing_id` is
deterministic, so a consumer keeps the highest version per id and never bills a token twice.
An event later than that is billed as an adjustment of its own event-time window, with the
id `<window id>/late/<event_id>`: a redelivery or replay of it carries the same id and
version, so it is billed once whatever its lateness.
"""

from __future__ import annotations

from schemas.pricing import cost_usd, with_cost  # noqa: F401 - with_cost: ops/bench's import path until it moves
from schemas.vocabulary import TOKEN_KINDS, window_id
from sinks.dlq import DeadLetters, send_all
from sinks.kafka import TopicWriter
from sinks.metrics import count_written
from sinks.retry import Retry


def billing_event(total: dict, pricing) -> dict:
    cost, priced = cost_usd(total, pricing)
    window = window_id(total)
    return {
        "billing_id": f"{window}/late/{total['event_id']}" if total.get("event_id") else window,
        "version": total["n"],
        "org_id": total["org_id"],
        "user_id": total["user_id"],
        "model": total["model"],
        "window_start_ms": total["window_start_ms"],
        "window_length_ms": total["window_length_ms"],
        "requests": total["n"],
        **{f"{kind}_tokens": total[kind] for kind in TOKEN_KINDS},
        "cost_usd": str(cost),
        "price_version": pricing.version,
        "priced": priced,
    }


def latest_versions(events: list[dict]) -> dict[str, dict]:
    """What a billing consumer keeps: the highest version of every billing_id."""
    latest: dict[str, dict] = {}
    for event in events:
        kept = latest.get(event["billing_id"])
        if kept is None or event["version"] > kept["version"]:
            latest[event["billing_id"]] = event
    return latest


class BillingWriter:
    """The billing sink's writer: one billing event per window total to the billing topic;
    events the broker refuses for good go to the DLQ."""

    sink = "billing"

    def __init__(self, producer: TopicWriter, pricing, retry: Retry, dead_letters: DeadLetters):
        self.producer = producer
        self.pricing = pricing
        self.retry = retry
        self.dead_letters = dead_letters

    def __call__(self, batches: list[list[dict]]) -> None:
        events = [billing_event(total, self.pricing) for batch in batches for total in batch]
        rejected = send_all(self.sink, self.producer, events, self.retry)
        self.dead_letters.send_rejected(self.sink, rejected)
        count_written(self.sink, len(events) - len(rejected))
