"""The pre-21 ClickHouse variant of a migration, derived from the modern file.

Servers older than 21.x (Debian ships 18.16) have no DateTime64, LowCardinality, Bool, Map,
column codecs or TTL. A legacy migration is the modern one with exactly these rewrites:

- ``DateTime64(p, tz)`` -> ``DateTime(tz)`` and ``now64(p)`` -> ``now()`` (second precision);
- ``LowCardinality(T)`` -> ``T`` (same values, plain storage);
- ``Bool`` -> ``UInt8`` (what Bool stores anyway);
- ``CODEC(...)`` and column/table ``TTL ...`` clauses are dropped (legacy data never expires
  on its own; ``gatewatch forget`` and retention jobs still delete);
- expressions leave a table's sort key (``ORDER BY (org_id, toDate(event_time), ...)`` ->
  ``ORDER BY (org_id, ...)``): 18.16 rejects them ("Column 'toDate(event_time)' already exists");
- ``ADD COLUMN IF NOT EXISTS`` -> ``ADD COLUMN`` (18.16 has no IF NOT EXISTS there; the
  migration table already keeps a migration from running twice);
- ``Map`` columns are dropped, with their names in the same file's SELECT lists: their data
  (e.g. pii_entity_counts) is not written to legacy servers, inserts skip missing columns.

Where SQL itself differs (18.16 cannot join with ``ON`` over an aliased ``FINAL`` table),
``ops/migrations/legacy/<name>.sql`` holds only the replacement statements; each replaces the
generated statement that creates the same object. Migrations listed in LEGACY_SKIPPED have no
legacy variant at all."""
import re

_AGGREGATES = ("usage aggregates need AggregateFunction states and Map sums (ClickHouse 21 or newer); this "
               "server keeps the views over raw events")
LEGACY_SKIPPED = {
    "050_usage_aggregates": _AGGREGATES,
    "060_model_daily": _AGGREGATES,
    "090_model_monthly": _AGGREGATES,
    "071_usage_reasoning": _AGGREGATES,
    "120_usage_daily_by_user": _AGGREGATES,
    "080_events_trace_index": ("bloom_filter skip indexes need ClickHouse 19.8 or newer; trace id look-ups scan "
                               "the events table on this server"),
    "100_events_compact_parts": ("compact parts need ClickHouse 20.3 or newer; this server writes every part "
                                 "wide"),
    "110_events_vertical_merges": ("part format settings need ClickHouse 20.3 or newer; this server merges "
                                   "as it always has"),
}
"""Migrations a legacy server cannot run, with the reason logged when one is skipped."""

_CREATED_OBJECT = re.compile(
    r"CREATE\s+(?:MATERIALIZED\s+)?(?:TABLE|VIEW)\s+(?:IF\s+NOT\s+EXISTS\s+)?(\S+)", re.IGNORECASE)


def _unwrap(sql: str, name: str, keep_argument: bool) -> str:
    """Replace every ``name(...)`` (balanced parentheses) by its argument, or by nothing."""
    pattern = re.compile(rf"\s*\b{name}\(" if not keep_argument else rf"\b{name}\(")
    while match := pattern.search(sql):
        depth, end = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(sql[end], 0)
            end += 1
        sql = sql[:match.start()] + (sql[match.end():end - 1] if keep_argument else "") + sql[end:]
    return sql


def _drop_map_columns(sql: str) -> str:
    names = re.findall(r"^\s*(\w+)\s+Map\(.*$", sql, flags=re.MULTILINE)
    sql = re.sub(r"^\s*\w+\s+Map\(.*\n", "", sql, flags=re.MULTILINE)
    for name in names:
        sql = re.sub(rf",\s*\b{name}\b", "", sql)
    return sql


def _plain_sort_key(match: re.Match) -> str:
    columns = [c.strip() for c in match.group(1).split(",")]
    return "ORDER BY (" + ", ".join(c for c in columns if "(" not in c and ")" not in c) + ")"


def to_legacy(sql: str) -> str:
    """The pre-21 form of one modern migration's SQL (placeholders such as {db} untouched)."""
    sql = _drop_map_columns(sql)
    sql = re.sub(r"DateTime64\(\d+,\s*('[^']*')\)", r"DateTime(\1)", sql)
    sql = re.sub(r"\bnow64\(\d*\)", "now()", sql)
    sql = re.sub(r"\bBool\b", "UInt8", sql)
    sql = re.sub(r"\bADD COLUMN IF NOT EXISTS\b", "ADD COLUMN", sql)
    # Only a table's own ORDER BY clause starts a line; a view's ORDER BY stays.
    sql = re.sub(r"^ORDER BY \(([^\n]*)\)", _plain_sort_key, sql, flags=re.MULTILINE)
    sql = _unwrap(sql, "LowCardinality", keep_argument=True)
    sql = _unwrap(sql, "CODEC", keep_argument=False)
    # Column TTL ends at the next comma/CODEC; table TTL is the statement's last clause.
    sql = re.sub(r"\s+TTL\s+[^,\n;]*?DAY\b", "", sql)
    return sql


def created_object(statement: str) -> str | None:
    match = _CREATED_OBJECT.search(statement)
    return match.group(1) if match else None


def with_overrides(statements: list[str], overrides: list[str]) -> list[str]:
    """The generated statements with each override in place of the one creating the same object."""
    by_object = {created_object(s): s for s in overrides}
    unknown = set(by_object) - {created_object(s) for s in statements}
    if unknown:
        raise ValueError(f"legacy overrides create objects the modern migration does not: {sorted(unknown)}")
    return [by_object.get(created_object(s), s) for s in statements]
