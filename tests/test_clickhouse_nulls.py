"""A NULL where a ClickHouse column cannot hold one. Through clickhouse-driver it raised
AttributeError ('NoneType' object has no attribute 'encode'), which the sink took for an
outage and retried forever (the flow stalled); chdb stored the column's default instead
('' for an id, 0 tokens, a 1970 event time), silently. Now a NULL in a column with a DEFAULT
is stored as that default on both (cost_usd 0, price_version ''), and a row with a NULL in
any other non-Nullable column goes to the DLQ naming the column, while the rest of the batch
is written. The columns come from the migrated tables, on chdb and on the fixtures' server
(Debian's 18.16: the legacy migrations)."""

from __future__ import annotations

import uuid

import pytest

from dataflows.outputs import clickhouse_writer
from schemas.dlq import decode_dlq
from sinks.clickhouse import FEEDBACK_SCHEMA, ClickHouse
from sinks.kafka import read_topic
from sinks.parquet import ARROW_SCHEMA
from tests.test_sink_poison import _server_events, _settings, _within

pytestmark = pytest.mark.integration


@pytest.fixture(params=["chdb", "server"])
def target(request, kafka_bootstrap, topic_factory, tmp_path):
    """(settings writing to the DLQ topic and the ClickHouse of the param, a migrated client)."""
    settings = _settings(kafka_bootstrap, topic_factory, tmp_path)
    if request.param == "chdb":
        url, database = f"chdb://{tmp_path / 'chdb'}", "nulls"
    else:
        url, database = request.getfixturevalue("clickhouse_url"), f"nulls_{uuid.uuid4().hex[:8]}"
    settings = settings.model_copy(update={"clickhouse": settings.clickhouse.model_copy(update={"url": url})})
    client = ClickHouse(url, database)
    client.migrate()
    yield settings, client
    if not client.embedded:
        client.execute(f"DROP DATABASE {database}")


def _defaults_of_non_nullable(client: ClickHouse, table: str) -> dict[str, str | None]:
    """{column: its DEFAULT expression or None} of the table's columns that cannot hold a
    NULL (Maps aside: a NULL map is an empty one), as the server describes them."""
    return {name: expression if kind == "DEFAULT" else None for name, type_name, kind, expression in client.rows(
        f"SELECT name, type, default_kind, default_expression FROM system.columns "
        f"WHERE database = '{client.database}' AND table = '{table}'")
        if not type_name.startswith(("Nullable(", "LowCardinality(Nullable(", "Map("))}


def _nulled(rows: list[dict], schema_names: list[str], client: ClickHouse, table: str
            ) -> tuple[dict[str, str], dict[str, str]]:
    """Set one column to None in each row, for every non-Nullable column of the table the
    sink writes; ({event_id: column} of columns with a DEFAULT, of those without)."""
    defaults = _defaults_of_non_nullable(client, table)
    required = [name for name in schema_names if name in defaults]
    assert len(rows) > len(required)
    defaulted, refused = {}, {}
    for row, name in zip(rows, required):
        (defaulted if defaults[name] else refused)[row["event_id"]] = name
        row[name] = None
    return defaulted, refused


def _dead_letters(settings) -> list[dict]:
    return [record for _p, _o, record in read_topic(settings.kafka.bootstrap, settings.kafka.dlq_topic, decode_dlq,
                                                     timeout_s=20)]


def _assert_refused_by_column(settings, refused: dict[str, str], table: str) -> None:
    dead = _dead_letters(settings)
    assert len(dead) == len(refused)
    assert all(record["code"] == "sink_rejected" and record["stage"] == "sink" for record in dead)
    reasons = sorted(record["reason"] for record in dead)
    assert all(any(f"NULL in {table}.{name}," in reason for reason in reasons) for name in refused.values()), reasons


def test_events_with_a_null_in_a_column_that_cannot_hold_it(target):
    settings, client = target
    rows = _server_events(settings, 40)
    defaulted, refused = _nulled(rows, ARROW_SCHEMA.names, client, "events")
    assert {"cost_usd", "price_version"} <= set(defaulted.values())
    assert {"event_id", "user_id", "classification", "input_tokens", "event_time"} <= set(refused.values())
    _within(60, lambda: clickhouse_writer(settings)([(client.database, rows)]))
    stored = {event_id for (event_id,) in client.rows(f"SELECT event_id FROM {client.database}.events")}
    assert stored == {row["event_id"] for row in rows} - set(refused) - {None}
    defaults = _defaults_of_non_nullable(client, "events")
    for event_id, name in defaulted.items():
        (is_default,), = client.rows(f"SELECT {name} = ({defaults[name]}) FROM {client.database}.events "
                                     f"WHERE event_id = '{event_id}'")
        assert is_default, name
    _assert_refused_by_column(settings, refused, "events")


def test_feedback_with_a_null_in_a_column_that_cannot_hold_it(target):
    settings, client = target
    now_ms = _server_events(settings, 1)[0]["event_time"]
    rows = [{"event_id": f"f-{n}", "request_id": f"r-{n}", "event_time": now_ms, "user_id": "u-1", "org_id": "o-1",
             "region": "eu", "rating": "THUMBS_UP", "comment": None, "conversation_id": None, "experiment_id": None,
             "variant": None, "policy_flags": [], "classification": "public"} for n in range(20)]
    defaulted, refused = _nulled(rows, FEEDBACK_SCHEMA.names, client, "feedback")
    assert not defaulted and {"rating", "classification", "user_id"} <= set(refused.values())
    _within(60, lambda: clickhouse_writer(settings, "feedback")([(client.database, rows)]))
    stored = {event_id for (event_id,) in client.rows(f"SELECT event_id FROM {client.database}.feedback")}
    assert stored == {row["event_id"] for row in rows} - set(refused) - {None}
    _assert_refused_by_column(settings, refused, "feedback")
