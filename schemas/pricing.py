"""What tokens cost: a window total or an event priced from a versioned price table.

Here, in ``schemas/``, rather than in ``sinks/billing.py`` or a package of its own: pricing
is pure domain arithmetic over the token kinds (no I/O, no client), and it is needed
before any sink writes: ``with_cost`` defines an event's cost for Parquet and ClickHouse
(the flow prices whole Arrow blocks with ``sinks.parquet.NanoPrices``, tested equal to it
row by row), the billing sink prices window totals, the demo and replay reconcile with it. A sink owning it made the flow import a sink for arithmetic; a top-level package
for forty lines would add a room nobody needs. The price table itself (``pricing.models``
by model, ``default``, ``version``) is the settings' pricing section, passed in.
"""

from __future__ import annotations

from decimal import Decimal

from schemas.vocabulary import TOKEN_KINDS

MILLION = Decimal(1_000_000)
NANO = Decimal("0.000000001")


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
