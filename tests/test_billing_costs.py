"""The billing sink prices window totals by integer arithmetic (NanoCosts): the same text,
character for character, as str(cost_usd(...)), whatever the prices' decimals and the tokens."""

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from ops.settings import ModelPrice, PricingSettings
from schemas.pricing import cost_usd
from sinks.billing import NanoCosts, billing_event

KINDS = ("input", "output", "cache_read", "cache_write")
prices = st.decimals(min_value=0, max_value=10**6, places=None, allow_nan=False, allow_infinity=False).map(
    lambda price: price.quantize(Decimal(1).scaleb(-min(9, max(0, -price.as_tuple().exponent)))))
model_prices = st.builds(ModelPrice, input=prices, output=prices, cache_read=prices, cache_write=prices)
tokens = st.one_of(st.integers(0, 2_000), st.integers(0, 10**13), st.just(0))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["m1", "m2", "m3"]), model_prices, min_size=1),
       st.one_of(st.none(), model_prices), st.sampled_from(["m1", "m2", "m3", "unlisted"]),
       st.tuples(tokens, tokens, tokens, tokens))
def test_nano_costs_write_what_cost_usd_computes(models, default, model, counts):
    pricing = PricingSettings(models=models, default=default)
    total = {"model": model, **dict(zip(KINDS, counts))}
    cost, priced = cost_usd(total, pricing)
    assert NanoCosts(pricing)(total) == (str(cost), priced)


def test_costs_below_a_micro_dollar_and_odd_tokens_are_written_as_decimal_writes_them():
    pricing = PricingSettings()
    costs = NanoCosts(pricing)
    cases = [dict(zip(KINDS, counts), model=model) for model, counts in [
        ("gpt-4o-mini", (3, 0, 0, 0)), ("gpt-4o-mini", (0, 0, 1, 0)), ("gpt-4o", (0, 0, 0, 0)),
        ("gemini-2.0-flash", (0, 0, 1, 0)), ("gpt-4o", (10**20, 1, 0, 0)), ("gpt-4o", (10**23, 1, 0, 0)),
        ("gpt-4o", ("12", 1, 0, 0)), ("gpt-4o", (1.5, 0, 0, 0)), ("nobody-prices-me", (5, 5, 5, 5))]]
    for total in cases:
        cost, priced = cost_usd(total, pricing)
        assert costs(total) == (str(cost), priced)
    assert [costs(total)[0] for total in cases[:4]] == ["4.50E-7", "7.5E-8", "0E-9", "2.5E-8"]


def test_a_billing_event_is_the_same_with_or_without_a_writers_costs():
    pricing = PricingSettings()
    total = {"org_id": "o1", "user_id": "u1", "model": "claude-sonnet-4", "window_start_ms": 60_000,
             "window_length_ms": 60_000, "n": 3, "input": 1_234, "output": 567, "cache_read": 89, "cache_write": 1,
             "event_id": "e-1"}
    event = billing_event(total, pricing, NanoCosts(pricing))
    assert event == billing_event(total, pricing)
    assert list(event) == ["billing_id", "version", "org_id", "user_id", "model", "window_start_ms", "window_length_ms",
                           "requests", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                           "cost_usd", "price_version", "priced"]
    assert (event["billing_id"], event["cost_usd"], event["priced"]) == (
        "o1/u1/claude-sonnet-4/60000/late/e-1", str(cost_usd(total, pricing)[0]), True)


def test_half_a_nano_dollar_rounds_to_the_even_one():
    price = ModelPrice(input=Decimal("0.0005"), output=Decimal(0), cache_read=Decimal(0), cache_write=Decimal(0))
    costs = NanoCosts(PricingSettings(models={"m": price}))
    written = [costs({"model": "m", "input": count, "output": 0, "cache_read": 0, "cache_write": 0})[0]
               for count in (1, 3, 5, 2_001)]
    assert written == ["0E-9", "2E-9", "2E-9", "0.000001000"]  # 0.5, 1.5, 2.5, 1000.5 nano-dollars
