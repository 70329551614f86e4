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

from decimal import Decimal

from schemas.pricing import cost_usd, price_decimals, scaled_prices
from schemas.pricing import with_cost  # noqa: F401 - ops/bench's import path until it moves
from schemas.vocabulary import window_id
from sinks.dlq import DeadLetters, send_all
from sinks.kafka import TopicWriter
from sinks.metrics import count_written
from sinks.retry import Retry


class NanoCosts:
    """cost_usd of window totals as the text a billing event carries, by integer arithmetic:
    each model's four prices per million tokens times 10**decimals (decimals: the most its
    prices have), so a total's cost in nano-dollars is its tokens times those integers,
    scaled by 10**(3 - decimals) and rounded half to even, as Decimal's quantize does
    (~1.5 against 4 µs a total). Totals whose tokens are not plain integers, or whose cost
    would need more digits than Decimal's 28, are priced by cost_usd itself."""

    LARGEST_UNITS = 10**24

    def __init__(self, pricing):
        self.pricing = pricing
        self._by_model: dict[str, tuple[tuple[int, ...], int, bool] | None] = {}

    def scaled(self, model: str) -> tuple[tuple[int, ...], int, bool] | None:
        """(scaled prices, decimals, priced) of a model; None when it has no price."""
        if model not in self._by_model:
            price = self.pricing.models.get(model, self.pricing.default)
            decimals = price_decimals(price) if price is not None else 0
            self._by_model[model] = None if price is None else (
                tuple(scaled_prices(price, decimals)), decimals, model in self.pricing.models)
        return self._by_model[model]

    def __call__(self, total: dict) -> tuple[str, bool]:
        """(cost_usd as text, priced) of a window total."""
        scaled = self.scaled(total["model"])
        if scaled is None:
            return "0", False  # str(Decimal(0)): cost_usd's cost of an unpriced model
        (input_price, output_price, cache_read_price, cache_write_price), decimals, priced = scaled
        try:
            units = (total["input"] * input_price + total["output"] * output_price
                     + total["cache_read"] * cache_read_price + total["cache_write"] * cache_write_price)
        except TypeError:  # tokens as text: Decimal reads them
            units = None
        if type(units) is not int or not 0 <= units < self.LARGEST_UNITS:
            cost, priced = cost_usd(total, self.pricing)
            return str(cost), priced
        if decimals <= 3:
            nanos = units * 10 ** (3 - decimals)
        else:
            divisor = 10 ** (decimals - 3)
            nanos, remainder = divmod(units, divisor)
            if 2 * remainder > divisor or 2 * remainder == divisor and nanos % 2:
                nanos += 1
        if nanos < 1_000:  # below a micro-dollar Decimal writes an exponent: 5E-9, 0E-9
            return str(Decimal(nanos).scaleb(-9)), priced
        dollars, fraction = divmod(nanos, 1_000_000_000)
        return f"{dollars}.{fraction:09d}", priced


def billing_event(total: dict, pricing, costs: NanoCosts | None = None) -> dict:
    """A window total's billing event, priced by costs (made from pricing when not given; a
    writer keeps one: its prices are scaled once)."""
    cost, priced = (costs or NanoCosts(pricing))(total)
    window = window_id(total)
    event_id = total.get("event_id")
    n = total["n"]
    # The fields in TOKEN_KINDS order, spelled out: a dict comprehension per total was a third of its cost.
    return {
        "billing_id": f"{window}/late/{event_id}" if event_id else window,
        "version": n,
        "org_id": total["org_id"],
        "user_id": total["user_id"],
        "model": total["model"],
        "window_start_ms": total["window_start_ms"],
        "window_length_ms": total["window_length_ms"],
        "requests": n,
        "input_tokens": total["input"],
        "output_tokens": total["output"],
        "cache_read_tokens": total["cache_read"],
        "cache_write_tokens": total["cache_write"],
        "cost_usd": cost,
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
        self.costs = NanoCosts(pricing)
        self.retry = retry
        self.dead_letters = dead_letters

    def __call__(self, batches: list[list[dict]]) -> None:
        events = [billing_event(total, self.pricing, self.costs) for batch in batches for total in batch]
        rejected = send_all(self.sink, self.producer, events, self.retry)
        self.dead_letters.send_rejected(self.sink, rejected)
        count_written(self.sink, len(events) - len(rejected))
