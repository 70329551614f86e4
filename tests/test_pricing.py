"""Integer pricing (schemas.pricing.NanoPriceTable) against its definition, the Decimal
cost_usd: the same cost string and priced flag for every price of the shipped table and for
price tables with many decimals, on generated token counts; the billing events built with
either give the same Avro bytes."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ops.settings import ModelPrice, PricingSettings
from schemas.pricing import EXACT_BELOW, NanoPriceTable, billed_cost, cost_usd, nano_string
from schemas.records import encode_billing_event
from schemas.vocabulary import TOKEN_KINDS
from sinks.billing import billing_event

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHIPPED = PricingSettings()
UNPRICED = "model-without-price"

counts = st.one_of(
    st.integers(0, 9), st.integers(0, 100_000), st.integers(0, 10**12),
    st.integers(0, 10**21), st.integers(10**22, 10**26),  # near and beyond EXACT_BELOW: cost_usd's rounding
)
totals = st.fixed_dictionaries({
    "org_id": st.sampled_from(["acme", "globex"]), "user_id": st.text(min_size=1, max_size=8),
    "window_start_ms": st.integers(0, 2**42), "window_length_ms": st.sampled_from([60_000, 3_600_000]),
    "n": st.integers(1, 10**6), **{kind: counts for kind in TOKEN_KINDS},
}, optional={"event_id": st.text(min_size=1, max_size=8)})


def amounts(max_decimals: int) -> st.SearchStrategy[Decimal]:
    """Prices per million tokens: whole to max_decimals decimals, with exact half nano-dollars
    (5 at the decimal after the nano) and trailing zeros kept (Decimal("2.50"))."""
    return st.one_of(
        st.builds(lambda digits, places: Decimal(digits).scaleb(-places),
                  st.integers(0, 10**12), st.integers(0, max_decimals)),
        st.builds(lambda k, places: Decimal(k * 10 + 5).scaleb(-places), st.integers(0, 99), st.integers(4, 12)),
        st.sampled_from([Decimal("0"), Decimal("2.50"), Decimal("10.00"), Decimal("1E+2"), Decimal("0.0000005")]),
    )


def model_prices(max_decimals: int = 15) -> st.SearchStrategy[ModelPrice]:
    return st.builds(ModelPrice, **{kind: amounts(max_decimals) for kind in TOKEN_KINDS})


price_tables = st.builds(
    lambda models, default: PricingSettings(version="generated", models=models, default=default),
    st.dictionaries(st.sampled_from(list(SHIPPED.models)), model_prices(), min_size=1, max_size=3),
    st.none() | model_prices())


def outcome(price, total: dict, pricing) -> tuple:
    """What a pricing function gives, or the exception type it raises (beyond 28 digits
    Decimal's quantize refuses: both must)."""
    try:
        return price(total, pricing)
    except InvalidOperation as exc:
        return type(exc)


def decimal_cost(total: dict, pricing) -> tuple[str, bool]:
    """The billing event's cost before integer pricing: str of cost_usd."""
    cost, priced = cost_usd(total, pricing)
    return str(cost), priced


def table_cost(total: dict, pricing) -> tuple[str, bool]:
    return NanoPriceTable(pricing).cost(total)


@PROPERTY
@given(model=st.sampled_from([*SHIPPED.models, UNPRICED]), total=totals)
@example(model="gpt-4o", total={"org_id": "a", "user_id": "u", "window_start_ms": 0, "window_length_ms": 60_000,
                                "n": 1, "input": 0, "output": 0, "cache_read": 0, "cache_write": 0})
def test_every_shipped_price_costs_what_the_decimal_path_costs(model, total):
    total = {**total, "model": model}
    assert outcome(table_cost, total, SHIPPED) == outcome(decimal_cost, total, SHIPPED)


@PROPERTY
@given(pricing=price_tables, model=st.sampled_from([*SHIPPED.models, UNPRICED]), total=totals)
def test_prices_with_many_decimals_and_a_default_cost_what_the_decimal_path_costs(pricing, model, total):
    total = {**total, "model": model}
    assert outcome(table_cost, total, pricing) == outcome(decimal_cost, total, pricing)


@pytest.mark.parametrize("places", [4, 5, 9, 12])
def test_exact_half_nano_dollars_round_to_even_as_decimal_does(places):
    half_nano = Decimal(5).scaleb(-places)  # per million tokens: half of 10**(3 - places) nano-dollars
    pricing = PricingSettings(models={"gpt-4o": ModelPrice(input=half_nano, output=0, cache_read=0, cache_write=0)})
    table = NanoPriceTable(pricing)
    step = 10 ** (places - 4)  # the input count whose cost is exactly half a nano-dollar
    for input_tokens in range(step, 40 * step, step):
        total = {"model": "gpt-4o", "input": input_tokens, "output": 0, "cache_read": 0, "cache_write": 0}
        assert table.cost(total) == decimal_cost(total, pricing), input_tokens
    assert table.cost({**total, "input": step})[0] == "0E-9"  # 0.5 rounds to the even 0
    assert table.cost({**total, "input": 3 * step})[0] == "2E-9"  # 1.5 to 2


@PROPERTY
@given(nanos=st.one_of(st.integers(0, 2_000), st.integers(0, 10**27)))
@example(nanos=999)
@example(nanos=1000)
@example(nanos=10**9 - 1)
@example(nanos=10**9)
def test_nano_strings_are_decimals_str_of_the_quantized_cost(nanos):
    assert nano_string(nanos) == str(Decimal(nanos).scaleb(-9).quantize(Decimal("0.000000001")))


@pytest.mark.parametrize("odd", [-1, 2.5, Decimal(7), True], ids=["negative", "float", "decimal", "bool"])
def test_counts_that_are_not_natural_numbers_are_priced_by_the_decimal_path(odd):
    total = {"model": "gpt-4o-mini", "input": odd, "output": 3, "cache_read": 0, "cache_write": 1}
    assert NanoPriceTable(SHIPPED).cost(total) == decimal_cost(total, SHIPPED)
    with pytest.raises(TypeError):  # as before: no number of tokens at all
        NanoPriceTable(SHIPPED).cost({**total, "input": None})


def test_a_sum_beyond_28_digits_is_refused_as_decimal_refuses_it():
    total = {"model": "gpt-4o", "input": 10**27, "output": 0, "cache_read": 0, "cache_write": 0}
    assert 10**27 * 2500 >= EXACT_BELOW
    with pytest.raises(InvalidOperation):
        NanoPriceTable(SHIPPED).cost(total)
    with pytest.raises(InvalidOperation):
        cost_usd(total, SHIPPED)


@PROPERTY
@given(pricing=st.one_of(st.just(SHIPPED), price_tables), model=st.sampled_from([*SHIPPED.models, UNPRICED]),
       total=totals.filter(lambda t: max(t[kind] for kind in TOKEN_KINDS) < 10**12))
def test_billing_events_encode_to_the_same_bytes_with_either_price_table(pricing, model, total):
    total = {**total, "model": model}
    with_integers = billing_event(total, NanoPriceTable(pricing))
    with_decimals = billing_event(total, pricing)
    assert with_integers == with_decimals
    assert encode_billing_event(with_integers) == encode_billing_event(with_decimals)
    assert billed_cost(total, pricing) == decimal_cost(total, pricing)
