"""The integer range each store can hold of an event's integer fields.

An Avro ``int`` or ``long`` is wider than some of the columns it lands in (``schema_version``
is an Avro int in a ClickHouse ``UInt16``), and a negative count does not fit an unsigned
column. ClickHouse does not refuse such a value on every path: chdb's ArrowStream input
wraps it (70000 is stored as 4464), silently. So validation refuses, before any sink, a value
outside the range of any store it reaches (``EventCodec.validate``, code ``out_of_range``).

The types are written as the stores spell them (ClickHouse column types from
ops/migrations, Arrow types of ``sinks.parquet.ARROW_SCHEMA``, Redis and billing counters as
signed 64-bit); tests/test_stored_ranges.py derives the boundary values from the migrated
columns and ARROW_SCHEMA themselves, so a column type changed without this table fails there.
"""

from __future__ import annotations

import re

from schemas.vocabulary import COUNTED_TOKEN_FIELDS

_TOKEN_STORES = {"ClickHouse events": "UInt64", "Parquet": "int64", "Redis quota and billing counters": "Int64"}

STORED_INTEGER_TYPES: dict[str, dict[str, dict[str, str]]] = {
    "gateway_event": {
        "schema_version": {"ClickHouse events": "UInt16", "Parquet": "int32"},
        "status_code": {"ClickHouse events": "UInt16", "Parquet": "int32"},
        "latency_ms": {"ClickHouse events": "UInt32", "Parquet": "int32"},
        "time_to_first_token_ms": {"ClickHouse events": "Nullable(UInt32)", "Parquet": "int32"},
        **{name: _TOKEN_STORES for name in COUNTED_TOKEN_FIELDS},
    },
    # Feedback stores no integer field (schema_version is not a column of feedback).
    "feedback_event": {},
}
"""{record schema name: {field: {store: the store's type of it}}}."""

_INTEGER_TYPE = re.compile(r"(u?)int(8|16|32|64|128|256)", re.IGNORECASE)
_WRAPPERS = re.compile(r"^(?:Nullable|LowCardinality)\((.*)\)$")


def integer_range(type_name: str) -> tuple[int, int]:
    """(lowest, highest) value of an integer type as ClickHouse (``UInt16``,
    ``Nullable(Int64)``) or Arrow (``int32``, ``uint64``) names it; ValueError otherwise."""
    name = type_name.strip()
    while wrapped := _WRAPPERS.match(name):
        name = wrapped.group(1).strip()
    found = _INTEGER_TYPE.fullmatch(name)
    if found is None:
        raise ValueError(f"{type_name} is not an integer type")
    bits = int(found.group(2))
    if found.group(1):
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def stored_range(types_by_store: dict[str, str]) -> tuple[int, int, str]:
    """(lowest, highest, what limits it) of the values every store of a field can hold."""
    ranges = {store: integer_range(type_name) for store, type_name in types_by_store.items()}
    low = max(low for low, _high in ranges.values())
    high = min(high for _low, high in ranges.values())
    narrowest = sorted(store for store, (low_of, high_of) in ranges.items() if low_of == low or high_of == high)
    described = ", ".join(f"{store} {types_by_store[store]}" for store in narrowest)
    return low, high, described


def stored_ranges(schema_name: str, fields: set[str]) -> dict[str, tuple[int, int, str]]:
    """{field: stored_range} of the record's integer fields that have stores."""
    return {name: stored_range(types) for name, types in STORED_INTEGER_TYPES.get(schema_name, {}).items()
            if name in fields}
