"""What tokens cost: a window total or an event priced from a versioned price table.

Here, in ``schemas/``, rather than in ``sinks/billing.py`` or a package of its own: pricing
is pure domain arithmetic over the token kinds (no I/O, no client), and it is needed
before any sink writes: ``with_cost`` defines an event's cost for Parquet and ClickHouse
(the flow prices whole Arrow blocks with ``sinks.parquet.NanoPrices``, tested equal to it
row by row), the billing sink prices window totals, the demo and replay reconcile with it. A sink owning it made the flow import a sink for arithmetic; a top-level package
for a page of arithmetic would add a room nobody needs. The price table itself (``pricing.models``
by model, ``default``, ``version``) is the settings' pricing section, passed in.

``cost_usd`` (Decimal) is the definition; ``NanoPriceTable`` computes the same cost string
with integers for the billing sink (1.4 against 2.8 µs of CPU per window total here,
``str(cost_usd(...))``; tests/test_pricing.py proves them equal), and ``NanoPrices`` in
``sinks.parquet`` a block's costs with numpy, from the same scaled prices.
"""

from __future__ import annotations

from decimal import Decimal
from operator import itemgetter, mul

from schemas.vocabulary import TOKEN_KINDS

MILLION = Decimal(1_000_000)
NANO = Decimal("0.000000001")
NANO_DIGITS = 9


def cost_usd(total: dict, pricing) -> tuple[Decimal, bool]:
    """(cost, priced) of a window total; unpriced models cost 0 unless a default price is set."""
    price = pricing.models.get(total["model"], pricing.default)
    if price is None:
        return Decimal(0), False
    cost = sum((Decimal(total[kind]) * getattr(price, kind) for kind in TOKEN_KINDS), Decimal(0)) / MILLION
    return cost.quantize(NANO), total["model"] in pricing.models


def with_cost(event: dict, pricing) -> dict:
    """The event with its own cost and the price table version that priced it."""
    tokens = {"model": event["model"], **{kind: event[f"{kind}_tokens"] for kind in TOKEN_KINDS}}
    return {**event, "cost_usd": cost_usd(tokens, pricing)[0], "price_version": pricing.version}


def price_decimals(price) -> int:
    """The most decimals any of a model's four prices has (0 for whole prices; the settings
    refuse prices that are not finite numbers)."""
    return max(0, *(-getattr(price, kind).as_tuple().exponent for kind in TOKEN_KINDS))


def scaled_prices(price, decimals: int) -> list[int]:
    """A model's four prices per million tokens times 10**decimals, as integers (exact when
    decimals >= price_decimals(price))."""
    return [int(getattr(price, kind).scaleb(decimals)) for kind in TOKEN_KINDS]


EXACT_BELOW = 10**27
"""Largest scaled sum (exclusive) priced with integers. cost_usd's Decimals hold 28 digits
(the default context) and its coefficients never exceed the scaled sum, so below this it
computes exactly and both give the same nano-dollars; beyond it Decimal rounds or raises,
and the total is priced by cost_usd itself."""


class NanoPriceTable:
    """A price table as integers: per model, its prices in nano-dollars per token times a
    divisor (1 when no price has more than 3 decimals per million tokens: every shipped
    one), so a total's cost is sum(tokens * price) // divisor, rounded half to even like
    cost_usd's quantize. Built once per price table (the billing sink holds one)."""

    def __init__(self, pricing):
        self.pricing = pricing
        self.version = pricing.version
        self.models = {model: self._scaled(price) for model, price in pricing.models.items()}
        self.has_default = pricing.default is not None
        self.default = self._scaled(pricing.default) if self.has_default else None

    @staticmethod
    def _scaled(price) -> tuple[tuple[int, ...], int]:
        """(scaled prices, divisor) of one model: nano-dollars per token = scaled / divisor."""
        decimals = price_decimals(price)
        # Per million tokens to per token in nano-dollars is 10**(9 - 6): three decimals are
        # whole nano-dollars, each further one a factor 10 of the divisor.
        divisor_digits = max(0, decimals - 3)
        return tuple(scaled_prices(price, divisor_digits + 3)), 10**divisor_digits

    def cost(self, total: dict) -> tuple[str, bool]:
        """(str(cost_usd(total)[0]), priced): the cost as the billing event's decimal string."""
        model = total["model"]
        scaled = self.models.get(model, _MISSING)
        priced = scaled is not _MISSING
        if not priced:
            if not self.has_default:
                return "0", False
            scaled = self.default
        prices, divisor = scaled
        units = exact_units(_token_counts(total), prices)
        if units is None:
            return str(cost_usd(total, self.pricing)[0]), priced
        return nano_string(units if divisor == 1 else divided_half_even(units, divisor)), priced


def exact_units(counts: tuple, prices: tuple[int, ...]) -> int | None:
    """sum(counts * prices) when the counts are non-negative integers and the sum is below
    EXACT_BELOW, else None: negative counts round towards their own sign (and may print
    "-0E-9"), other types price as Decimal makes of them; cost_usd says what those cost."""
    try:
        if min(counts) < 0:
            return None
    except TypeError:  # None, text: not counts at all
        return None
    units = sum(map(mul, counts, prices))
    return units if type(units) is int and units < EXACT_BELOW else None


_MISSING = object()
_token_counts = itemgetter(*TOKEN_KINDS)


def divided_half_even(units: int, divisor: int) -> int:
    """units / divisor (a power of ten above 1) rounded half to even, as Decimal.quantize does."""
    quotient, remainder = divmod(units, divisor)
    half = divisor // 2  # exact: the divisor is even
    return quotient + (remainder > half or (remainder == half and quotient & 1))


# str() of a Decimal with 9 decimals uses exponent notation below a micro-dollar ("0E-9",
# "1.5E-8"): those 1,000 strings come from Decimal itself.
_BELOW_MICRO = [str(Decimal(nanos).scaleb(-NANO_DIGITS)) for nanos in range(1000)]


def nano_string(nanos: int) -> str:
    """str(Decimal) of a non-negative number of nano-dollars quantized to NANO."""
    if nanos < 1000:
        return _BELOW_MICRO[nanos]
    digits = str(nanos)
    return f"{digits[:-NANO_DIGITS] or '0'}.{digits[-NANO_DIGITS:].zfill(NANO_DIGITS)}"


def billed_cost(total: dict, prices) -> tuple[str, bool]:
    """(cost as a decimal string, priced) of a window total; prices is a NanoPriceTable, or
    the settings' pricing section itself (priced by cost_usd: building the table per call
    would cost more than it saves)."""
    if isinstance(prices, NanoPriceTable):
        return prices.cost(total)
    cost, priced = cost_usd(total, prices)
    return str(cost), priced
