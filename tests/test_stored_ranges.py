"""Integers that pass Avro but not their column: chdb's ArrowStream input wrapped them
(schema_version 70000 was stored as 4464). Validation refuses every value outside what a
store holds, with out_of_range naming the field; the boundary values come from the migrated
ClickHouse columns and sinks.parquet.ARROW_SCHEMA, not from a list here, so a column type
changed by a later migration is covered by the same tests."""

from __future__ import annotations

import json
import time

import pytest

from ops.settings import PricingSettings, ValidationSettings
from schemas.codec import EventCodec, InvalidEvent
from schemas.compiler import INT_RANGE, LONG_RANGE
from schemas.pricing import with_cost
from schemas.registry import LocalRegistry
from schemas.stored_ranges import STORED_INTEGER_TYPES, integer_range
from sinks.clickhouse import ClickHouse, close_chdb
from sinks.parquet import ARROW_SCHEMA, to_table
from tests.test_codec import event

AVRO_RANGES = {"int": INT_RANGE, "long": LONG_RANGE}
NOW = int(time.time() * 1000)
"""Wall-clock now: events stored in ClickHouse must be newer than its raw retention (30 days)."""
PERMISSIVE = ValidationSettings(max_tokens=2**63 - 1, max_latency_ms=2**31 - 1)
"""Rules that allow every Avro value, so that what refuses a value is its stores' range."""


def avro_integer_fields(schema: dict) -> dict[str, tuple[int, int]]:
    """{field: the Avro range of its type} of a record's int and long fields (nullable or not)."""
    out = {}
    for field in schema["fields"]:
        branches = field["type"] if isinstance(field["type"], list) else [field["type"]]
        for branch in branches:
            kind = branch.get("type") if isinstance(branch, dict) else branch
            if kind in AVRO_RANGES and not (isinstance(branch, dict) and branch.get("logicalType")):
                out[field["name"]] = AVRO_RANGES[kind]
    return out


def column_types(client: ClickHouse, table: str) -> dict[str, str]:
    return dict(client.rows(f"SELECT name, type FROM system.columns WHERE database = '{client.database}' "
                            f"AND table = '{table}'"))


def stored_bounds(columns: dict[str, str]) -> dict[str, tuple[int, int]]:
    """{field: (low, high)} of every Avro integer field of gateway_event stored in an
    integer column: the range both its ClickHouse column and its Arrow (Parquet) type hold."""
    out = {}
    for name in avro_integer_fields(LocalRegistry().latest("gateway_event")[1]):
        if name not in columns:
            continue
        ranges = [integer_range(columns[name]), integer_range(str(ARROW_SCHEMA.field(name).type))]
        out[name] = (max(low for low, _ in ranges), min(high for _, high in ranges))
    return out


def outside_values(columns: dict[str, str]) -> list[tuple[str, int]]:
    """(field, value) just outside each stored range that Avro can still carry."""
    avro = avro_integer_fields(LocalRegistry().latest("gateway_event")[1])
    return [(name, value) for name, (low, high) in stored_bounds(columns).items()
            for value in (low - 1, high + 1) if avro[name][0] <= value <= avro[name][1]]


def event_with(name: str, value: int, **changes) -> dict:
    """The test event with one integer field set; output_tokens follows reasoning_tokens
    (which may not exceed it), so the field is the only one off."""
    extra = {"output_tokens": max(value, 0)} if name == "reasoning_tokens" else {}
    return event(**{"event_time": NOW - 1000, name: value, **extra, **changes})


@pytest.fixture(scope="module")
def chdb(tmp_path_factory):
    client = ClickHouse(f"chdb://{tmp_path_factory.mktemp('ranges')}", "ranges")
    client.migrate()
    yield client
    close_chdb()


@pytest.fixture(scope="module")
def events_columns(chdb) -> dict[str, str]:
    return column_types(chdb, "events")


def test_every_stored_integer_field_is_checked_against_its_real_column(events_columns):
    declared = STORED_INTEGER_TYPES["gateway_event"]
    bounds = stored_bounds(events_columns)
    assert {"schema_version", "status_code", "latency_ms", "input_tokens"} <= set(bounds)
    assert set(bounds) == set(declared), "an integer column of events has no entry in STORED_INTEGER_TYPES"
    for name in bounds:
        assert declared[name]["ClickHouse events"] == events_columns[name], name
        assert declared[name]["Parquet"] == str(ARROW_SCHEMA.field(name).type), name


@pytest.mark.parametrize("settings", [ValidationSettings(), PERMISSIVE], ids=["default rules", "permissive rules"])
@pytest.mark.parametrize("encoding", ["avro", "json"])
def test_a_value_outside_its_column_is_out_of_range_naming_the_field(events_columns, settings, encoding):
    codec = EventCodec(LocalRegistry(), settings)
    poison = outside_values(events_columns)
    assert ("schema_version", 65536) in poison and ("status_code", -1) in poison
    for name, value in poison:
        record = event_with(name, value)
        message = codec.encode(record) if encoding == "avro" else json.dumps(record).encode()
        with pytest.raises(InvalidEvent) as refused:
            codec.decode(message, NOW)
        assert refused.value.code == "out_of_range", (name, value, refused.value)
        assert refused.value.reason.startswith(f"{name} is {value}"), refused.value.reason
        with pytest.raises(InvalidEvent):
            codec.check(record, NOW)  # a producer refuses it too


def test_the_edge_values_a_store_holds_are_stored_exactly(chdb, events_columns):
    """Of an unpriced model: 2**63 - 1 tokens at a real price cost more than cost_usd's
    Decimal(18, 9) holds (Arrow refuses that row at the sink; validation.max_tokens keeps
    real counts far below)."""
    codec = EventCodec(LocalRegistry(), PERMISSIVE)
    stored = []
    for number, (name, (low, high)) in enumerate(stored_bounds(events_columns).items()):
        for side, value in enumerate((low, high)):
            try:
                decoded = codec.decode(codec.encode(event_with(name, value, event_id=f"edge-{number}-{side}", model="unpriced")), NOW)
            except InvalidEvent as exc:  # another rule (status 100-599, versions from 1) is narrower
                assert exc.code == "out_of_range" and exc.reason.startswith(name), exc.reason
                continue
            stored.append((decoded["event_id"], name, value))
            row = with_cost({**decoded, "classification": "public", "pii_entity_counts": {},
                             "source_partition": 0, "source_offset": number}, PricingSettings())
            assert to_table([row]).column(name).to_pylist() == [value], name
            chdb.insert_events([row])
    assert {("schema_version", 65535), ("latency_ms", 2**31 - 1), ("input_tokens", 2**63 - 1)} <= \
        {(name, value) for _id, name, value in stored}
    for event_id, name, value in stored:
        (got,), = chdb.rows(f"SELECT {name} FROM ranges.events FINAL WHERE event_id = '{event_id}'")
        assert got == value, (name, value, got)
