"""The ClickHouse TTLs that follow the retention settings, and the ALTERs that bring a
database's TTLs to the settings.

A migration writes its TTLs with the days configured when it ran, and runs once. An operator
who later shortens ``retention.raw_days`` expects stored prompts to go sooner, so every
``migrate`` (each flow start on chdb, ``gatewatch migrate``, ``retention apply``) reads the
TTLs the tables have and modifies those that differ from the settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RAW = "raw"
AGGREGATE = "aggregate"

TTL_SETTING: dict[tuple[str, str | None], str] = {
    # The aggregates keep the year, so raw rows go with their text (migration 050).
    ("events", None): RAW,
    ("events", "prompt"): RAW,
    ("events", "response"): RAW,
    ("feedback", None): AGGREGATE,
    ("feedback", "comment"): RAW,
    ("audit_log", None): AGGREGATE,
    ("usage_hourly", None): AGGREGATE,
    ("usage_daily", None): AGGREGATE,
    ("usage_daily_by_user", None): AGGREGATE,
    ("usage_model_daily", None): AGGREGATE,
    ("usage_model_monthly", None): AGGREGATE,
}
"""(table, column) -> the retention setting its TTL follows; column None is the TTL of the
table's rows. tests/test_clickhouse_ttl.py holds it to every TTL a migrated database has."""

# In system.tables.create_table_query: columns are `quoted` before ") ENGINE = ", the table's
# own TTL after it; the server prints INTERVAL n DAY as toIntervalDay(n).
_COLUMN_TTL = re.compile(r"`(?P<column>\w+)` [^`]*?\bTTL (?P<base>.+?) \+ toIntervalDay\((?P<days>\d+)\)")
_TABLE_TTL = re.compile(r"\bTTL (?P<base>.+?) \+ toIntervalDay\((?P<days>\d+)\)")
_ENGINE = ") ENGINE = "


@dataclass(frozen=True)
class Ttl:
    table: str
    column: str | None
    base: str
    """The expression the days are added to, as the server prints it."""
    days: int

    @property
    def target(self) -> str:
        return self.table if self.column is None else f"{self.table}.{self.column}"


@dataclass(frozen=True)
class TtlChange:
    ttl: Ttl
    days: int

    def __str__(self) -> str:
        return f"TTL of {self.ttl.target}: {self.ttl.days} -> {self.days} days"


def ttls_of(table: str, create_query: str) -> list[Ttl]:
    """The day-interval TTLs of one table: its columns' and its rows'."""
    columns, _, engine = create_query.partition(_ENGINE)
    found = [Ttl(table, m["column"], m["base"], int(m["days"])) for m in _COLUMN_TTL.finditer(columns)]
    row_ttl = _TABLE_TTL.search(engine)
    if row_ttl:
        found.append(Ttl(table, None, row_ttl["base"], int(row_ttl["days"])))
    return found


def ttl_changes(ttls: list[Ttl], raw_days: int, aggregate_days: int) -> list[TtlChange]:
    """The TTLs whose days differ from their setting's; TTLs of tables gatewatch does not own
    are left alone."""
    days_of = {RAW: raw_days, AGGREGATE: aggregate_days}
    changes = []
    for ttl in ttls:
        setting = TTL_SETTING.get((ttl.table, ttl.column))
        if setting and ttl.days != days_of[setting]:
            changes.append(TtlChange(ttl, days_of[setting]))
    return changes


def alter_statements(database: str, changes: list[TtlChange]) -> list[str]:
    """One ALTER per table: each ALTER that changes a TTL starts a mutation that rewrites the
    table's parts (materialize_ttl_after_modify), so a table's TTLs change together."""
    clauses: dict[str, list[str]] = {}
    for change in changes:
        interval = f"{change.ttl.base} + INTERVAL {change.days} DAY"
        clauses.setdefault(change.ttl.table, []).append(
            f"MODIFY TTL {interval}" if change.ttl.column is None
            else f"MODIFY COLUMN {change.ttl.column} TTL {interval}")
    return [f"ALTER TABLE {database}.{table} {', '.join(parts)}" for table, parts in clauses.items()]
