"""ClickHouse for analytics: embedded chdb (chdb://PATH), one chdb shared by the processes of a
machine through a chdb host (chdb+unix:///path/to/host.sock, sinks.chdb_host) or a server
(clickhouse://host:port).

Rows go in as one columnar insert per batch. The events table is a ReplacingMergeTree keyed
by event_id, so a batch written twice changes no query that reads it FINAL. Raw rows expire
after raw_days; what lives aggregate_days is usage_hourly and usage_daily, recomputed by
refresh_aggregates as absolute totals of the touched hours (see there why that is exactly
once), and every view reads those.
"""

from __future__ import annotations

import functools
import logging
import re
import struct
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager
from urllib.parse import unquote, urlparse

import pyarrow as pa

from sinks.chdb_host import HOST_SCHEME, HostGone, HostSession, host_session, host_socket
from sinks.chdb_session import chdb_location, chdb_session, close_chdb, insert_turn, migration_lock  # noqa: F401 (close_chdb re-exported)
from sinks.clickhouse_ttl import TtlChange, alter_statements, ttl_changes, ttls_of
from sinks.metrics import count_written, observe_freshness, observe_refresh
from sinks.legacy_sql import LEGACY_SKIPPED, to_legacy, with_overrides
from sinks.parquet import TableRows, blocks_and_events, to_table
from sinks.retry import Retry, row_error, write_isolating

if TYPE_CHECKING:
    from sinks.dlq import DeadLetters

FEEDBACK_SCHEMA = pa.schema([
    ("event_id", pa.string()),
    ("request_id", pa.string()),
    ("event_time", pa.timestamp("ms", tz="UTC")),
    ("user_id", pa.string()),
    ("org_id", pa.string()),
    ("region", pa.string()),
    ("rating", pa.string()),
    ("comment", pa.string()),
    ("conversation_id", pa.string()),
    ("experiment_id", pa.string()),
    ("variant", pa.string()),
    ("policy_flags", pa.list_(pa.string())),
    ("classification", pa.string()),
])
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "ops" / "migrations"
log = logging.getLogger(__name__)

EMBEDDED_INSERT_SETTINGS = "optimize_on_insert = 0"
"""Settings of every embedded insert. optimize_on_insert = 0: a ReplacingMergeTree otherwise
collapses each inserted block's duplicates as it writes it (a sort-and-compare pass over the
block, and a level-1 part that FINAL may skip), work that the merges and every FINAL reader
repeat anyway; the flow's blocks hold no duplicates (it dedupes before the sinks), so that
pass found nothing and cost 15-25% of chdb's insert CPU (ops/bench/FINDINGS.md, issue 17).
Every reader of events, feedback and audit_log reads FINAL (sinks.clickhouse, the views,
the API), so results are the same. Not sent to servers: 18.16 (the legacy path) rejects a
setting it does not know."""


_VARYING_DEFAULT = re.compile(r"now|today|rand|uuid", re.IGNORECASE)
"""DEFAULT expressions whose value differs between calls."""


class ClickHouse:
    """The few operations gatewatch needs, the same on chdb and on a server."""

    def __init__(self, url: str, database: str = "gatewatch", label: str = ""):
        self.url = url
        self.database = database
        self.prefix = f"/* {label} */ " if label else ""
        """Starts every statement: says who runs it to readers of system.processes (refresh_label)."""
        parsed = urlparse(url)
        # chdb's statements and Arrow transport, in this process or in the machine's chdb host
        self.embedded = parsed.scheme in ("chdb", HOST_SCHEME)
        self._column_types: dict[str, dict[str, ColumnType]] = {}
        self._defaults: dict[tuple[str, str], object] = {}
        # The calling thread's chdb handle or host connection, looked up per statement: a
        # client is often made on one thread and used on another (a Bytewax worker's).
        self._session: Callable[[], Any]
        self._exclusive: Callable[[], ContextManager]
        """Gives what is held around a migration: no other migration runs in between."""
        self._insert_turn: ContextManager = nullcontext()
        """Held around an insert (chdb in this process; the host takes turns itself)."""
        if parsed.scheme == "chdb":
            location = chdb_location(url)
            self._session = lambda: chdb_session(*location)
            self._exclusive = lambda: migration_lock
            self._insert_turn = insert_turn
        elif parsed.scheme == HOST_SCHEME:
            socket_path = host_socket(url)
            self._session = lambda: host_session(socket_path)
            self._exclusive = lambda: host_session(socket_path).exclusive()
        else:
            from clickhouse_driver import Client

            self._client = Client(
                host=parsed.hostname or "127.0.0.1", port=parsed.port or 9000,
                user=unquote(parsed.username or "default"), password=unquote(parsed.password or ""),
                secure=parsed.scheme == "clickhouses", connect_timeout=5, send_receive_timeout=60,
            )

    def execute(self, sql: str) -> None:
        sql = self.prefix + sql
        if self.embedded:
            self._session().query(sql)
        else:
            self._client.execute(sql)

    def rows(self, sql: str) -> list[tuple]:
        sql = self.prefix + sql
        if self.embedded:
            data = self._session().query(sql, "Arrow").bytes()
            import pyarrow.ipc as ipc

            if not data:
                return []
            result = ipc.open_file(pa.py_buffer(data)).read_all()
            return [tuple(row.values()) for row in result.to_pylist()]
        return self._client.execute(sql)

    def columns(self, table: str) -> tuple[str, ...]:
        return tuple(self.column_types(table))

    def column_types(self, table: str) -> dict[str, ColumnType]:
        """{column: its type and default} of database.table, read once."""
        if table not in self._column_types:
            self._column_types[table] = {name: ColumnType(kind, default_kind == "DEFAULT", default) for name, kind, default_kind,
                                         default in self.rows(
                f"SELECT name, type, default_kind, default_expression FROM system.columns "
                f"WHERE database = '{self.database}' AND table = '{table}'")}
        return self._column_types[table]

    def default_value(self, table: str, column: str):
        """The value of a column's DEFAULT expression, as the driver sends it (read once, unless
        it changes from call to call, like now64())."""
        key = (table, column)
        if key in self._defaults:
            return self._defaults[key]
        kind = self.column_types(table)[column]
        (value,), = self.rows(f"SELECT CAST(({kind.default}) AS {kind.type})")
        if not _VARYING_DEFAULT.search(kind.default):
            self._defaults[key] = value
        return value

    @functools.cached_property
    def legacy(self) -> bool:
        """A server from before DateTime64, Map and TTL (Debian's 18.16)."""
        (version,), = self.rows("SELECT version()")
        return int(str(version).split(".")[0]) < 21

    def insert(self, table: str, rows: pa.Table) -> None:
        """One columnar insert of an Arrow table into database.table; columns the table
        does not have (an older schema) are left out."""
        known = self.column_types(table)
        rows = rows.select([name for name in rows.column_names if name in known])
        refuse_nulls_in_required_columns(table, rows, known)
        columns = ", ".join(rows.column_names)
        if self.embedded:
            # Arrow IPC bytes that ClickHouse parses itself. The Python(rows) table function it
            # replaces had chdb's own threads take the GIL to read the table: a deadlock once
            # Bytewax runs workers on threads (ops/bench/FINDINGS.md), and no cheaper in CPU.
            sql = f"INSERT INTO {self.database}.{table} ({columns}) SETTINGS {EMBEDDED_INSERT_SETTINGS}"
            session = self._session()
            with self._insert_turn:
                if isinstance(session, HostSession):
                    session.insert(sql, arrow_stream_size(rows), partial(write_arrow_stream, rows))
                    return
                with session.send_insert(sql, "ArrowStream") as stream:
                    write_arrow_stream(rows, stream.append)
                    stream.finish()
        else:
            # Rows travel as parameters: a server parses them natively and old servers hang on literal VALUES.
            self._client.execute(f"INSERT INTO {self.database}.{table} ({columns}) VALUES",
                                 [_driver_values(rows.column(c), known[c], partial(self.default_value, table, c))
                                  for c in rows.column_names], columnar=True)

    def insert_events(self, events: list[dict]) -> None:
        self.insert("events", to_table(events))

    def insert_feedback(self, feedback: list[dict]) -> None:
        self.insert("feedback", pa.Table.from_pylist(
            [{name: item.get(name) for name in FEEDBACK_SCHEMA.names} for item in feedback], FEEDBACK_SCHEMA))

    def events_without_audit(self) -> int:
        """Events stored without their audit row (should always be 0)."""
        (missing,), = self.rows(f"SELECT count() FROM {self.database}.events FINAL "
                                f"WHERE event_id NOT IN (SELECT event_id FROM {self.database}.audit_log)")
        return int(missing)

    def migrate(self, raw_ttl_days: int = 30, aggregate_ttl_days: int = 365) -> list[str]:
        """Apply ops/migrations/*.sql not yet recorded; return the names applied now.
        On chdb a migration runs alone among migrations (sinks.chdb_session.migration_lock;
        through a chdb host, the host's exclusive block): every worker of a process migrates its
        databases when it starts (nobody else can reach them), and the second one then finds
        every migration recorded instead of creating the same tables again."""
        if self.embedded:
            with self._exclusive():
                return self._migrate(raw_ttl_days, aggregate_ttl_days)
        return self._migrate(raw_ttl_days, aggregate_ttl_days)

    def _migrate(self, raw_ttl_days: int, aggregate_ttl_days: int) -> list[str]:
        self.execute(f"CREATE DATABASE IF NOT EXISTS {self.database}")
        self.execute(f"CREATE TABLE IF NOT EXISTS {self.database}.schema_migrations "
                     "(name String, applied_at DateTime DEFAULT now()) ENGINE = MergeTree ORDER BY name")
        done = {r[0] for r in self.rows(f"SELECT name FROM {self.database}.schema_migrations")}
        applied = []
        for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
            if path.stem in done:
                continue
            if self.legacy and path.stem in LEGACY_SKIPPED:
                log.warning("migration %s skipped: %s", path.stem, LEGACY_SKIPPED[path.stem])
                continue
            for statement in migration_statements(path, self.legacy):
                self.execute(statement.format(db=self.database, raw_ttl_days=raw_ttl_days,
                                              aggregate_ttl_days=aggregate_ttl_days))
            self.execute(f"INSERT INTO {self.database}.schema_migrations (name) SELECT '{path.stem}'")
            applied.append(path.stem)
        self._column_types.clear()
        return applied

    def apply_retention(self, raw_days: int, aggregate_days: int, dry_run: bool = False) -> list[TtlChange]:
        """Bring the TTLs of a migrated database to the retention settings; return the changes
        (made, or only found with dry_run). A migration writes the days configured when it
        runs, once. The server rewrites each changed table's parts in the background
        (system.mutations), deleting what the new TTL has expired."""
        if self.embedded:
            with self._exclusive():
                return self._apply_retention(raw_days, aggregate_days, dry_run)
        return self._apply_retention(raw_days, aggregate_days, dry_run)

    def _apply_retention(self, raw_days: int, aggregate_days: int, dry_run: bool) -> list[TtlChange]:
        if self.legacy:  # 18.16 has no TTL (sinks.legacy_sql)
            return []
        tables = self.rows(f"SELECT name, create_table_query FROM system.tables WHERE database = "
                           f"{sql_string(self.database)} AND create_table_query LIKE '%TTL%'")
        changes = ttl_changes([ttl for table, query in tables for ttl in ttls_of(table, query)],
                              raw_days, aggregate_days)
        if not dry_run:
            for statement in alter_statements(self.database, changes):
                self.execute(statement)
            for change in changes:
                log.warning("ClickHouse TTL changed to follow the retention settings",
                            extra={"database": self.database, "target": change.ttl.target,
                                   "from_days": change.ttl.days, "to_days": change.days})
        return changes


# Absolute totals of every aggregate key of the given (org, hour) pairs, from the distinct
# raw events. Inserted by position into named columns, so no aggregate needs an alias equal
# to its argument, and a column a later migration adds (with a default) breaks no insert.
_AGGREGATE_COLUMNS = ("org_id, user_id, model, region, experiment_id, variant, requests, errors, input_tokens, "
                      "output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, latency_ms_sum, "
                      "latency_quantiles, classifications, policy_flags, computed_at, reasoning_tokens")
_HOURLY_FROM_EVENTS = """
INSERT INTO {db}.usage_hourly (hour, {columns})
SELECT toStartOfHour(event_time), org_id, user_id, model, region, ifNull(experiment_id, ''), ifNull(variant, ''),
    count(), countIf(status_code >= 400), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
    sum(cache_write_tokens), sum(cost_usd), sum(latency_ms), quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms),
    sumMap(map(toString(classification), toUInt64(1))),
    sumMap(CAST((arrayMap(f -> concat(toString(classification), '/', toString(f)), policy_flags),
                 arrayMap(f -> toUInt64(1), policy_flags)), 'Map(String, UInt64)')),
    now64(3), sum(reasoning_tokens)
FROM {db}.events FINAL
WHERE org_id IN ({orgs}) AND event_time >= toDateTime64({low}, 3, 'UTC') AND event_time < toDateTime64({high}, 3, 'UTC')
  AND (org_id, toUnixTimestamp(toStartOfHour(event_time)), user_id) IN ({keys})
GROUP BY toStartOfHour(event_time), org_id, user_id, model, region, ifNull(experiment_id, ''), ifNull(variant, '')
"""

_DAILY_FROM_HOURLY = """
INSERT INTO {db}.usage_daily (day, {columns})
SELECT toDate(hour), org_id, user_id, model, region, experiment_id, variant, sum(requests), sum(errors),
    sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_usd),
    sum(latency_ms_sum), quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_quantiles), sumMap(classifications),
    sumMap(policy_flags), now64(3), sum(reasoning_tokens)
FROM {db}.usage_hourly FINAL
WHERE org_id IN ({orgs}) AND hour >= toDateTime({low}, 'UTC') AND hour < toDateTime({high}, 'UTC')
  AND (org_id, toUnixTimestamp(toStartOfDay(hour)), user_id) IN ({keys})
GROUP BY toDate(hour), org_id, user_id, model, region, experiment_id, variant
"""

_MODEL_DAILY_FROM_DAILY = """
INSERT INTO {db}.usage_model_daily
SELECT day, org_id, model, uniqExact(user_id), sum(requests), sum(errors), sum(input_tokens), sum(output_tokens),
    sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_usd), sum(latency_ms_sum),
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_quantiles), now64(3)
FROM {db}.usage_daily FINAL
WHERE org_id IN ({orgs}) AND day >= toDate(toDateTime({low}, 'UTC')) AND day <= toDate(toDateTime({high}, 'UTC'))
  AND (org_id, day) IN ({keys})
GROUP BY day, org_id, model
"""

# Reads at most one row per (day, org, model) of each month, about 30 per key it writes.
_MODEL_MONTHLY_FROM_DAILY = """
INSERT INTO {db}.usage_model_monthly
SELECT toStartOfMonth(day), org_id, model, sum(requests), sum(errors), sum(input_tokens), sum(output_tokens),
    sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_usd), sum(latency_ms_sum),
    quantilesTDigestMergeState(0.5, 0.95, 0.99)(latency_quantiles), now64(3)
FROM {db}.usage_model_daily FINAL
WHERE org_id IN ({orgs}) AND day >= toDate(toDateTime({low}, 'UTC')) AND day <= toLastDayOfMonth(toDateTime({high}, 'UTC'))
  AND (org_id, toStartOfMonth(day)) IN ({keys})
GROUP BY toStartOfMonth(day), org_id, model
"""

AGGREGATE_KEYS = {
    "usage_hourly": ("org_id", "hour", "model", "user_id", "region", "experiment_id", "variant"),
    "usage_daily": ("org_id", "day", "model", "user_id", "region", "experiment_id", "variant"),
    "usage_daily_by_user": ("org_id", "user_id", "day", "model", "region", "experiment_id", "variant"),
    "usage_model_daily": ("day", "org_id", "model"),
    "usage_model_monthly": ("month", "org_id", "model"),
}
"""The sorting key of each aggregate table: one row per key once its versions are merged."""


def latest_rows(db: str, table: str, columns: tuple[str, ...], where: str) -> str:
    """A subquery of the latest version of each aggregate row matching where (what FINAL
    returns), with its key and columns, by argMax over computed_at.

    For point lookups (one user's month, one org's day): refresh_aggregates writes a new
    version of a key every few seconds, and FINAL pays for every part of the range it reads;
    one user's month to date took 20 ms with 8 unmerged parts against 7 ms merged (chdb
    26.9), so its latency followed the merge backlog. Grouping by the key: 11 and 10 ms, same
    results. Scans of whole ranges (the Grafana panels) are cheaper with FINAL."""
    key = AGGREGATE_KEYS[table]
    latest = ", ".join(f"argMax({column}, computed_at) AS {column}" for column in columns if column not in key)
    return f"(SELECT {', '.join(key)}, {latest} FROM {db}.{table} WHERE {where} GROUP BY {', '.join(key)})"


REFRESH_MARGIN_S = 5
"""How far before the previous refresh's watermark each refresh reads (recomputing a key
twice changes nothing): room for clocks read in milliseconds and an insert between its
query's start and the process list."""

REFRESH_LOOK_BACK_S = 60
"""The watermark's distance from now when the process list cannot be read (no grant on
system.processes): the fixed look-back every refresh used before the watermark."""


def refresh_aggregates(client: "ClickHouse", raw_days: int = 30, chunk: int = 2000,
                       unless_within_s: float | None = None) -> int:
    """Recompute the hourly and daily aggregates of every (org, hour, user) that received raw
    rows since the last refresh; return how many (org, hour, user) keys were recomputed.
    With unless_within_s, nothing is done (0) when any writer's refresh stored a watermark that
    recent (refresh_watermark; at most an insert's duration before its start):
    a refresh covers every writer's rows, so writers sharing a database (a chdb host, a server)
    would otherwise each redo the others' keys (one running now: ClickHouseWriter, refresh_running).

    Exactly once by construction: an aggregate row is the absolute total of the distinct
    events of its key (events read FINAL, restricted to the touched orgs' hours) and
    replaces the older row of the same key. Progress is kept in aggregate_progress, so a
    crash between an insert and its refresh is caught up by the next refresh; the first
    refresh of an existing deployment recomputes its whole history. Hours older than the
    raw retention are left alone: their raw rows are gone, their aggregates are final.
    Keys include the user, so a refresh rewrites rows in proportion to the users active
    since the previous one, not to everything the org did that day. The per-model rollups
    follow: each touched org day from its users' daily rows, then each touched org month from
    its days (at most 31 rows per org and model).
    Servers older than 21 (legacy migrations) have no aggregates and keep their views."""
    if client.legacy:
        return 0
    db = client.database
    started, through = refresh_watermark(client)
    (since,), = client.rows(f"SELECT toUnixTimestamp64Milli(max(through)) FROM {db}.aggregate_progress")
    if since and unless_within_s is not None and int(started) - int(since) < unless_within_s * 1000:
        return 0
    since_ms = max(0, int(since or 0) - REFRESH_MARGIN_S * 1000) if since else 0
    oldest_s = int(started) // 1000 - (raw_days - 1) * 86400
    touched = client.rows(
        f"SELECT DISTINCT org_id, toUnixTimestamp(toStartOfHour(event_time)), user_id FROM {db}.events "
        f"WHERE ingested_at >= fromUnixTimestamp64Milli(toInt64({since_ms}), 'UTC') "
        f"AND event_time >= toDateTime({oldest_s}, 'UTC') ORDER BY 1, 2, 3")
    for at in range(0, len(touched), chunk):
        _recompute(client, _HOURLY_FROM_EVENTS, [(org, int(hour), user) for org, hour, user in touched[at:at + chunk]],
                   3600)
    days = sorted({(org, int(hour) // 86400 * 86400, user) for org, hour, user in touched})
    for at in range(0, len(days), chunk):
        _recompute(client, _DAILY_FROM_HOURLY, days[at:at + chunk], 86400)
    org_days = sorted({(org, day) for org, day, _user in days})
    for at in range(0, len(org_days), chunk):
        recompute_model_days(client, org_days[at:at + chunk])
    org_months = org_months_of(org_days)
    for at in range(0, len(org_months), chunk):
        recompute_model_months(client, org_months[at:at + chunk])
    client.execute(f"INSERT INTO {db}.aggregate_progress (name, through) "
                   f"SELECT 'usage', fromUnixTimestamp64Milli(toInt64({through}), 'UTC')")
    return len(touched)


def refresh_watermark(client: "ClickHouse") -> tuple[int, int]:
    """(now, watermark) in epoch ms: every row ingested before the watermark is visible now.
    A row of an insert still running is not visible yet, and its ingested_at is its query's
    time, so the watermark is the start of the oldest insert into events that is running.
    The next refresh reads from there (less REFRESH_MARGIN_S), not from a fixed minute
    before: at the brief's rate, one minute more of traffic doubled the keys it recomputed
    (`gatewatch bench refresh`). It needs one server: inserts through another (replicas) are
    not in this one's process list, nor are async_insert's buffered rows. Without the grant
    to read system.processes, the watermark is REFRESH_LOOK_BACK_S before now."""
    try:
        (now, oldest), = client.rows(
            "SELECT toUnixTimestamp64Milli(now64(3)) AS now_ms, now_ms - toInt64(1000 * max(elapsed)) "
            f"FROM system.processes WHERE match(query, {sql_string(events_insert_pattern(client.database))})")
    except Exception as exc:  # noqa: BLE001 - a refresh with the old look-back beats none
        log.warning("running inserts not readable, refresh looks back a fixed minute",
                    extra={"database": client.database, "error": str(exc)[:300]})
        (now,), = client.rows("SELECT toUnixTimestamp64Milli(now64(3))")
        return int(now), int(now) - REFRESH_LOOK_BACK_S * 1000
    return int(now), min(int(now), int(oldest))


def refresh_label(database: str) -> str:
    """The label of the writers' refresh clients (ClickHouse(label=...)), the comment that starts
    each of their statements: what refresh_running looks for."""
    return f"gatewatch aggregate refresh of {database}"


_RUNNING_CHECK = "SELECT count() AS refreshes_running FROM system.processes"


def refresh_running(client: "ClickHouse") -> bool:
    """Whether a statement of a refresh of client's database is running, other than this check
    (two writers checking at the same moment would both step aside). Two flow processes
    started together refreshed together, both recomputing every key (ops/bench/FINDINGS.md).
    Nothing is seen running where system.processes cannot be read (refresh_watermark logs it)."""
    label = f"/* {refresh_label(client.database)} */"
    try:
        (running,), = client.rows(
            f"{_RUNNING_CHECK} WHERE startsWith(query, {sql_string(label)}) "
            f"AND NOT startsWith(query, {sql_string(f'{label} {_RUNNING_CHECK}')})")
    except Exception:  # noqa: BLE001 - a refresh beside another costs CPU, not correctness
        return False
    return running > 0


def events_insert_pattern(database: str) -> str:
    """The RE2 pattern of the statements that insert into database.events, and no others: a
    refresh's own INSERT ... SELECT FROM events, or gw_us.events seen from us, would hold the
    watermark back for nothing."""
    return rf"(?i)^\s*INSERT\s+INTO\s+{re.escape(database)}\.events\b"


def _recompute(client: "ClickHouse", template: str, keys: list[tuple[str, int, str]], span_s: int) -> None:
    # Period starts are compared as epoch seconds: a list of literal tuples is parsed once,
    # where a toDateTime() call per key was analyzed one by one, 3x the CPU of the whole
    # refresh (`gatewatch bench refresh`, ops/bench/FINDINGS.md).
    starts = [start for _org, start, _user in keys]
    key_sql = ", ".join(f"({sql_string(org)}, {start}, {sql_string(user)})" for org, start, user in keys)
    orgs = ", ".join(sorted({sql_string(org) for org, _start, _user in keys}))
    client.execute(template.format(db=client.database, columns=_AGGREGATE_COLUMNS, orgs=orgs, low=min(starts),
                                   high=max(starts) + span_s, keys=key_sql))


def recompute_model_days(client: "ClickHouse", org_days: list[tuple[str, int]]) -> None:
    """The per-model rollup of whole org days: after their users' daily rows were recomputed."""
    _roll_up(client, _MODEL_DAILY_FROM_DAILY, org_days)


def org_months_of(org_days: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """(org, first day of the month, epoch s) of each (org, day epoch s), once each."""
    return sorted({(org, int(datetime.fromtimestamp(day, timezone.utc).replace(day=1).timestamp()))
                   for org, day in org_days})


def recompute_model_months(client: "ClickHouse", org_months: list[tuple[str, int]]) -> None:
    """The per-model rollup of whole org months (org_months_of): after their days were rolled up."""
    _roll_up(client, _MODEL_MONTHLY_FROM_DAILY, org_months)


def _roll_up(client: "ClickHouse", template: str, org_periods: list[tuple[str, int]]) -> None:
    """Insert template's rows of the (org, period start epoch s) pairs."""
    starts = [start for _org, start in org_periods]
    client.execute(template.format(
        db=client.database, orgs=", ".join(sorted({sql_string(org) for org, _start in org_periods})),
        low=min(starts), high=max(starts), keys=period_keys(org_periods)))


def period_keys(org_periods: list[tuple[str, int]]) -> str:
    """(org, period start epoch s) pairs as an SQL list of (org, Date) tuples."""
    return ", ".join(f"({sql_string(org)}, toDate(toDateTime({start}, 'UTC')))" for org, start in org_periods)


USAGE_KINDS = {"requests": "requests", "input": "input_tokens", "output": "output_tokens",
               "cache_read": "cache_read_tokens", "cache_write": "cache_write_tokens"}
"""The month bases' names of the daily aggregates' columns."""


def month_usage_before(client: "ClickHouse", users: list[tuple[str, str]], month: str,
                       cutoff: str) -> dict[tuple[str, str], dict[str, int]]:
    """Requests and tokens by kind of each (org, user) over the days of month (YYYYMM) before
    cutoff (YYYYMMDD), from the daily aggregates: the month bases of sinks.quota."""
    if not users:
        return {}
    return {(org, user): dict(zip(USAGE_KINDS, map(int, values)))
            for org, user, *values in client.rows(month_usage_sql(client.database, users, month, cutoff))}


def month_usage_sql(db: str, users: list[tuple[str, str]], month: str, cutoff: str) -> str:
    """The query of month_usage_before. It reads usage_daily_by_user (migration 120), sorted by
    (org, user, day): the granules of the users asked, not every user's rows of their orgs'
    days of the month as usage_daily would. The latest version of each row by argMax
    (latest_rows), as a look-up under FINAL pays for every unmerged part."""
    where = (f"org_id IN ({', '.join(sorted({sql_string(org) for org, _user in users}))}) "
             f"AND (org_id, user_id) IN ({', '.join(f'({sql_string(o)}, {sql_string(u)})' for o, u in users)}) "
             f"AND day >= toDate('{month[:4]}-{month[4:]}-01') "
             f"AND day < toDate('{cutoff[:4]}-{cutoff[4:6]}-{cutoff[6:]}')")
    sums = ", ".join(f"sum({column})" for column in USAGE_KINDS.values())
    latest = latest_rows(db, "usage_daily_by_user", tuple(USAGE_KINDS.values()), where)
    return f"SELECT org_id, user_id, {sums} FROM {latest} GROUP BY org_id, user_id"


def usage_before_time(client: "ClickHouse", first: str, last: str, before_ms: int) -> list[tuple]:
    """(org, user, YYYYMMDD, requests, input, output, cache_read, cache_write) of the days first..last
    (YYYYMMDD) from the raw events dated before before_ms: the part of a day that is still open
    which a replay restates in the quota (sinks.quota.QuotaStore.restate_open_day)."""
    rows = client.rows(
        f"SELECT org_id, user_id, toString(toYYYYMMDD(event_time)), count(), sum(input_tokens), sum(output_tokens), "
        f"sum(cache_read_tokens), sum(cache_write_tokens) FROM {client.database}.events FINAL "
        f"WHERE event_time >= toDateTime64('{first[:4]}-{first[4:6]}-{first[6:]} 00:00:00', 3, 'UTC') "
        f"AND event_time < fromUnixTimestamp64Milli(toInt64({int(before_ms)}), 'UTC') "
        f"AND toYYYYMMDD(event_time) <= {int(last)} GROUP BY org_id, user_id, toYYYYMMDD(event_time)")
    return [(org, user, day, *map(int, values)) for org, user, day, *values in rows]


def org_month_usage_before(client: "ClickHouse", orgs: list[str], month: str, cutoff: str) -> dict[str, dict[str, int]]:
    """Requests and tokens by kind of each org over the days of month (YYYYMM) before cutoff
    (YYYYMMDD), from the daily aggregates: the closed part of an org's month in sinks.quota."""
    if not orgs:
        return {}
    rows = client.rows(
        f"SELECT org_id, sum(requests), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), "
        f"sum(cache_write_tokens) FROM {client.database}.usage_daily FINAL "
        f"WHERE org_id IN ({', '.join(sorted({sql_string(org) for org in orgs}))}) "
        f"AND day >= toDate('{month[:4]}-{month[4:]}-01') AND day < toDate('{cutoff[:4]}-{cutoff[4:6]}-{cutoff[6:]}') "
        "GROUP BY org_id")
    return {org: dict(zip(("requests", "input", "output", "cache_read", "cache_write"), map(int, values)))
            for org, *values in rows}


def sql_string(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def arrow_stream_bytes(table: pa.Table) -> bytes:
    """The table in Arrow's IPC stream format (ClickHouse's ArrowStream input)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def arrow_stream_size(table: pa.Table) -> int:
    """The length of arrow_stream_bytes(table), counted without writing a byte."""
    counter = pa.MockOutputStream()
    with pa.ipc.new_stream(counter, table.schema) as writer:
        writer.write_table(table)
    return counter.size()


def write_arrow_stream(table: pa.Table, write: Callable[[memoryview], object]) -> None:
    """arrow_stream_bytes(table), passed to write in pieces and never held whole: an insert's
    ~25 MB at 6,000 events, built in a growing buffer and copied into bytes, was three copies
    on fresh pages (~4.5 µs per event in a flow process, ops/bench/FINDINGS.md, issue 17)."""
    pieces = _Pieces(write)
    with pa.ipc.new_stream(pa.PythonFile(pieces, mode="w"), table.schema) as writer:
        writer.write_table(table)
    pieces.flush()


class _Pieces:
    """A file for Arrow's IPC writer: the column buffers it writes go on as they are (Arrow
    hands a file its buffers without a copy); its small writes (lengths, metadata, padding)
    are gathered until PIECE bytes or the next large buffer."""

    PIECE = 65536

    def __init__(self, write: Callable[[memoryview], object]):
        self._write = write
        self._small = bytearray()
        self.closed = False  # read by pa.PythonFile

    def write(self, data) -> int:
        view = memoryview(data)
        if view.nbytes < self.PIECE:
            self._small += view
            if len(self._small) >= self.PIECE:
                self.flush()
        else:
            self.flush()
            self._write(view)
        return view.nbytes

    def flush(self) -> None:
        if self._small:
            self._write(memoryview(bytes(self._small)))
            self._small.clear()


@dataclass(frozen=True)
class ColumnType:
    """A column's ClickHouse type, and its DEFAULT expression when it has one."""

    type: str
    has_default: bool
    default: str

    @property
    def nullable(self) -> bool:
        return self.type.startswith(("Nullable(", "LowCardinality(Nullable("))

    @property
    def takes_null(self) -> bool:
        """Whether a NULL can be given for it: a Nullable column stores it; a column with a
        DEFAULT stores that instead (chdb's ArrowStream input does it, and _driver_values
        for a server); a Map takes it as an empty map. Any other column cannot hold it."""
        return self.nullable or self.has_default or self.type.startswith("Map(")


class NullInRequiredColumn(TypeError):
    """Rows hold NULL in a column that is not Nullable. A server's driver fails on it with an
    AttributeError ('NoneType' object has no attribute 'encode'), which looked like an outage
    and was retried forever; chdb stores the column's default instead ('' for a string, 0 for
    a token count, 1970 for a time), silently. A TypeError, so the sinks refuse the rows for
    good (sinks.retry.PERMANENT_ROW_ERRORS): write_isolating finds them and the DLQ gets
    them with ``safe_reason``, which names the table and columns, never a value."""

    def __init__(self, table: str, columns: list[str]):
        self.safe_reason = f"NULL in {table}.{', '.join(columns)}, which {'is' if len(columns) == 1 else 'are'} " \
                           "not Nullable"
        super().__init__(self.safe_reason)


def refuse_nulls_in_required_columns(table: str, rows: pa.Table, column_types: dict[str, ColumnType]) -> None:
    """Raise NullInRequiredColumn when a column of rows holds a NULL its ClickHouse column
    cannot take (ColumnType.takes_null); a table without NULLs costs one null count per column."""
    refused = [name for name in rows.column_names
               if rows.column(name).null_count and not column_types[name].takes_null]
    if refused:
        raise NullInRequiredColumn(table, refused)


def _driver_values(column: pa.ChunkedArray, column_type: ColumnType, default: Callable[[], object]) -> list:
    """A column's values as clickhouse-driver sends them: a NULL map as an empty one, and a
    NULL in a column that is not Nullable (refuse_nulls_in_required_columns leaves only those
    with a DEFAULT) as default(), what a server's own input formats and chdb store (the
    driver cannot send a NULL there: it raised AttributeError)."""
    values = column.to_pylist()
    if pa.types.is_map(column.type):
        return [dict(v or ()) for v in values]
    if column.null_count and not column_type.nullable:
        filled = default()
        return [filled if value is None else value for value in values]
    return values


def migration_statements(path: Path, legacy: bool) -> list[str]:
    """The statements of one migration file, for a pre-21 server when legacy: generated from
    the modern file, with the overrides of ops/migrations/legacy/<same name> (sinks.legacy_sql)."""
    if not legacy:
        return _statements(path.read_text())
    override = path.parent / "legacy" / path.name
    return with_overrides(_statements(to_legacy(path.read_text())),
                          _statements(override.read_text()) if override.exists() else [])


def _statements(sql: str) -> list[str]:
    without_comments = re.sub(r"--[^\n]*", "", sql)
    return [s.strip() for s in without_comments.split(";") if s.strip()]


# ClickHouse error codes of rows the table cannot hold: the same rows fail again however long
# one waits, so they go to the DLQ. The driver's own checks before sending (a value that does
# not pack into its column, a string too long for a FixedString) raise with these codes too.
# Every other code (a network error, MEMORY_LIMIT_EXCEEDED 241, TOO_MANY_PARTS 252, a table
# not migrated yet, UNKNOWN_TABLE 60) is an outage and is retried.
BAD_DATA_CODES = frozenset({
    6,    # CANNOT_PARSE_TEXT
    25,   # CANNOT_PARSE_ESCAPE_SEQUENCE
    26,   # CANNOT_PARSE_QUOTED_STRING
    27,   # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,   # CANNOT_PARSE_DATE
    41,   # CANNOT_PARSE_DATETIME
    53,   # TYPE_MISMATCH
    69,   # ARGUMENT_OUT_OF_BOUND
    70,   # CANNOT_CONVERT_TYPE
    72,   # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA
    128,  # TOO_LARGE_ARRAY_SIZE
    131,  # TOO_LARGE_STRING_SIZE
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    376,  # CANNOT_PARSE_UUID
    407,  # DECIMAL_OVERFLOW
    441,  # CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING
    469,  # VIOLATED_CONSTRAINT
})


def refused_for_good(exc: BaseException) -> bool:
    """True when the rows themselves caused exc (see BAD_DATA_CODES), so retrying cannot help."""
    if row_error(exc) or isinstance(exc, struct.error):
        return True
    try:
        from clickhouse_driver.errors import Error as DriverError
    except ImportError:  # pragma: no cover - the driver is a dependency
        return False
    return isinstance(exc, DriverError) and getattr(exc, "code", None) in BAD_DATA_CODES


def freshness_seconds(events: list[dict], now: float | None = None) -> list[float]:
    now = time.time() if now is None else now
    return [max(0.0, now - e["event_time"] / 1000) for e in events]


def insert_rows(client: ClickHouse, rows: TableRows) -> None:
    client.insert("events", rows.table)


def migrate_embedded(client: ClickHouse, retry: Retry, raw_days: int, aggregate_days: int) -> None:
    """Migrate an embedded database, which nobody else can reach to migrate, and keep its
    TTLs to the retention settings. A chdb host that is down is waited for like a server
    outage; any other failure (a migration chdb refuses) stops the caller at start."""
    def migrate() -> None:
        client.migrate(raw_days, aggregate_days)
        client.apply_retention(raw_days, aggregate_days)

    if client.embedded:
        retry("clickhouse", migrate, give_up_on=lambda exc: not isinstance(exc, HostGone))


class ClickHouseWriter:
    """The ClickHouse sink's writer: batches keyed by database, one insert each into
    ``table`` (events or feedback); rows the server refuses for good go to the DLQ. After
    events it recomputes the usage aggregates of the hours written, at most once per
    ``aggregate_interval_s`` on a thread of its own, and once more when the flow ends
    (``close``), on the caller's."""

    def __init__(self, url: str, retry: Retry, dead_letters: DeadLetters, *, raw_days: int, aggregate_days: int,
                 aggregate_interval_s: float, lateness_s: float, table: str = "events"):
        self.url = url
        self.retry = retry
        self.dead_letters = dead_letters
        self.raw_days = raw_days
        self.aggregate_days = aggregate_days
        self.aggregate_interval_s = aggregate_interval_s
        self.lateness_s = lateness_s
        self.table = table
        self.sink = "clickhouse" if table == "events" else f"clickhouse_{table}"
        self.clients: dict[str, ClickHouse] = {}
        self.refreshed_at = time.monotonic()
        self.refresher: threading.Thread | None = None
        """Runs the periodic refreshes, one at a time, started with the first one."""
        self.refresh_due = threading.Event()
        self.refresh_idle = threading.Event()
        self.refresh_idle.set()
        self.refresh_again = False
        """A periodic refresh was asked for while one ran: run one more once it ends."""
        self.refresh_turn = threading.Lock()
        """Held while refresh_again and refresh_idle are read or set together."""
        self.pending: list[str] = []
        """The databases of the periodic refresh due."""
        self.refresh_clients: dict[str, ClickHouse] = {}
        """The refreshes' own clients: a clickhouse-driver Client serves one thread at a time."""

    def client_of(self, database: str) -> ClickHouse:
        if database not in self.clients:
            client = self.retry("clickhouse", lambda: ClickHouse(self.url, database))
            migrate_embedded(client, self.retry, self.raw_days, self.aggregate_days)
            self.clients[database] = client
        return self.clients[database]

    def refresh(self, force: bool = False) -> None:
        """Recompute the usage aggregates of the hours written since the last refresh (anyone's:
        a periodic refresh is skipped when another writer of the database did one this interval,
        keys 0 in its log line, or is doing one, and then tried half an interval later).
        A periodic refresh runs on the refresher thread, beside the inserts: it takes seconds with
        thousands of users, and the flow's events waited behind it (ops/bench/FINDINGS.md). One
        asked for while it runs follows it at once. A forced one waits for it, then runs on the
        caller's thread."""
        if self.table != "events" or not (force or time.monotonic() - self.refreshed_at >= self.aggregate_interval_s):
            return
        self.refreshed_at = time.monotonic()  # before the refresher may move it (refresh_databases)
        if force:
            self.refresh_idle.wait()
            self.refresh_databases(list(self.clients), unless_within_s=None)
            return
        self.pending = list(self.clients)  # a running refresh keeps the list it was given
        with self.refresh_turn:
            if not self.refresh_idle.is_set():
                # The running refresh may have read the rows before this call's: one more follows it,
                # as this call may be a quiet stream's last (Batcher's tick).
                self.refresh_again = True
                return
            self.refresh_idle.clear()
        if self.refresher is None:
            self.refresher = threading.Thread(target=self.refresh_periodically, name="clickhouse-refresh", daemon=True)
            self.refresher.start()
        self.refresh_due.set()

    def refresh_periodically(self) -> None:
        while True:
            self.refresh_due.wait()
            self.refresh_due.clear()
            unless_within_s: float | None = self.aggregate_interval_s
            try:
                while True:
                    self.refresh_databases(self.pending, unless_within_s=unless_within_s)
                    with self.refresh_turn:
                        if not self.refresh_again:
                            break
                        self.refresh_again = False
                    # Not skipped for a refresh done this interval: that one is the refresh just ended.
                    unless_within_s = None
            finally:
                with self.refresh_turn:
                    self.refresh_idle.set()

    def refresh_databases(self, databases: list[str], unless_within_s: float | None) -> None:
        for database in databases:
            if database not in self.refresh_clients:
                self.refresh_clients[database] = self.retry(
                    "clickhouse", lambda: ClickHouse(self.url, database, label=refresh_label(database)))
            client = self.refresh_clients[database]
            if unless_within_s is not None and refresh_running(client):
                # That refresh covers every writer's rows up to its watermark. Ours comes half an
                # interval later, where its watermark is recent: the writers' clocks, each started
                # by a batch within a second of the other's, stop running in step.
                self.refreshed_at = time.monotonic() - self.aggregate_interval_s / 2
                log.info("aggregate refresh left to another writer's, running", extra={"database": database})
                continue

            def refresh_once() -> tuple[int, float]:  # timed per attempt: no retry's backoff in it
                started = time.monotonic()
                return (refresh_aggregates(client, self.raw_days, unless_within_s=unless_within_s),
                        time.monotonic() - started)

            keys, seconds = self.retry("clickhouse_aggregates", refresh_once)
            if keys:
                observe_refresh(keys, seconds)
            log.info("aggregates refreshed", extra={"database": database, "keys": keys, "seconds": round(seconds, 3)})

    def __call__(self, batches: list[tuple[str, list]]) -> None:
        """Batches keyed by database: of EventBlocks (events, each block's table shared with
        the Parquet sink), or of dicts (feedback; events from a snapshot taken before blocks,
        from a caller, or rows Arrow refused). An empty batch says the database's events went
        quiet (Batcher's tick): a refresh then due has no later batch to start it."""
        for database, items in batches:
            client = self.client_of(database)
            if not items:
                continue
            if self.table != "events":
                self.write_rows(items, client.insert_feedback, [row["event_time"] for row in items])
                continue
            rows, events = blocks_and_events(items, one_chunk=True)
            if rows is not None:
                self.write_rows(rows, partial(insert_rows, client),
                                rows.table.column("event_time").cast(pa.int64()).to_pylist())
            if events:
                self.write_rows(events, client.insert_events, [row["event_time"] for row in events])
        self.refresh()

    def write_rows(self, rows: TableRows | list[dict], insert: Callable, event_times_ms: list[int]) -> None:
        rejected = write_isolating(self.sink, insert, rows, self.retry, permanent=refused_for_good)
        self.dead_letters.send_refused_rows(self.sink, rejected)
        count_written(self.sink, len(rows) - len(rejected))
        observe_freshness(self.sink, event_times_ms, self.lateness_s)

    def close(self) -> None:
        self.refresh(force=True)
