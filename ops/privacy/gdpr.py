"""GDPR: find, export and forget everything stored about one user, in every region's
Parquet and ClickHouse database, in Redis, in the flows' recovery snapshots and in the
vault (whose records are made unreadable by destroying the user's data keys).

Org-level counters keep their totals (they hold usage, not the person); Kafka topics age
out by their own retention.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis

from ops import recovery
from ops.privacy import vault
from sinks.audit_log import user_hash
from sinks.clickhouse import (ClickHouse, org_months_of, period_keys, recompute_model_days, recompute_model_months,
                              sql_string)
from sinks.parquet import ParquetStore
from sinks.quota import PENDING_ALERTS_KEY, RECENT_PREFIX, RESTATE_KEY, recent_member_subject

USER_TABLES = ("events", "audit_log", "feedback")
"""Tables with a user_id column; every view is computed from events or the aggregates. All
are ReplacingMergeTrees: they are read FINAL, or a replay's unmerged copies count twice."""
AGGREGATE_TABLES = ("usage_hourly", "usage_daily", "usage_daily_by_user")
"""Per-user aggregates: forgotten with the user, not exported (they are derived from events).
usage_daily_by_user is usage_daily's copy for the month bases (migration 120): a delete from
usage_daily does not reach it through its materialized view."""
ROLLUP_TABLE = "usage_model_daily"
"""Per (day, org, model), no user_id: the org days the user was in are rolled up again without it."""
MONTHLY_ROLLUP_TABLE = "usage_model_monthly"
"""Per (month, org, model), summed from ROLLUP_TABLE: the org months of those days are summed again."""


@dataclass(frozen=True)
class Subject:
    user_id: str
    org_id: str | None = None

    def sql(self) -> str:
        condition = f"user_id = {sql_string(self.user_id)}"
        if self.org_id is not None:
            condition += f" AND org_id = {sql_string(self.org_id)}"
        return condition

    def mask(self, table: pa.Table) -> pa.Array:
        mask = pc.equal(table.column("user_id"), self.user_id)
        if self.org_id is not None:
            mask = pc.and_(mask, pc.equal(table.column("org_id"), self.org_id))
        return pc.fill_null(mask, False)

    def redis_patterns(self) -> list[str]:
        ident = f"{glob_escape(self.org_id) if self.org_id is not None else '*'}/{glob_escape(self.user_id)}"
        return [f"gw:usage:user:{ident}:*", f"gw:win:{ident}:*", f"gw:late:{ident}:*", f"gw:tier:user:{ident}",
                f"gw:limits:user:{ident}"]

    def pseudonym(self, key: bytes) -> str:
        """What the access audit records instead of the user id it must not keep."""
        return user_hash(key, self.org_id, self.user_id)

    def is_subject(self, quota_subject: str) -> bool:
        org, _, user = quota_subject.partition("/")
        return self.holds(org, user)

    def holds(self, org_id: str | None, user_id: str | None) -> bool:
        return user_id == self.user_id and self.org_id in (None, org_id)


def glob_escape(value: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in value)


@dataclass
class Found:
    clickhouse: dict[str, int] = field(default_factory=dict)
    """{"database.table": rows}"""
    parquet: dict[str, int] = field(default_factory=dict)
    """{file path: rows of the user}"""
    redis_keys: list[str] = field(default_factory=list)
    pending_alerts: int = 0
    restate_marks: int = 0
    """The user's month bases due for a recomputation (gw:bases:due members)."""
    recent_windows: int = 0
    """The user's entries in their org's recent-window index (gw:recent:<org> members)."""
    recovery: dict[str, int] = field(default_factory=dict)
    """{recovery partition file: snapshots holding the user}"""
    vault_keys: int = 0
    """The user's data keys in the vault's key store (one per org)."""

    def summary(self) -> dict:
        return {"clickhouse_rows": self.clickhouse, "parquet_files": len(self.parquet),
                "parquet_rows": sum(self.parquet.values()), "redis_keys": len(self.redis_keys),
                "pending_alerts": self.pending_alerts, "restate_marks": self.restate_marks,
                "recent_windows": self.recent_windows,
                "recovery_snapshots": sum(self.recovery.values()),
                "vault_keys": self.vault_keys}

    @property
    def empty(self) -> bool:
        return not (any(self.clickhouse.values()) or self.parquet or self.redis_keys or self.pending_alerts
                    or self.restate_marks or self.recent_windows or any(self.recovery.values()) or self.vault_keys)


# -- ClickHouse ---------------------------------------------------------------------------

def clickhouse_tables(client: ClickHouse) -> list[str]:
    return [table for table in USER_TABLES if "user_id" in client.columns(table)]


def clickhouse_rows(client: ClickHouse, table: str, subject: Subject) -> list[dict]:
    columns = client.columns(table)
    rows = client.rows(f"SELECT {', '.join(columns)} FROM {client.database}.{table} FINAL WHERE {subject.sql()}")
    return [dict(zip(columns, row)) for row in rows]


def clickhouse_count(client: ClickHouse, table: str, subject: Subject) -> int:
    (count,), = client.rows(f"SELECT count() FROM {client.database}.{table} FINAL WHERE {subject.sql()}")
    return int(count)


def forget_clickhouse(client: ClickHouse, subject: Subject, timeout_s: float = 120) -> dict[str, int]:
    """Delete the subject's rows from every user table and wait until the deletes are done;
    then roll the org days it was in, and their months, up again without it."""
    removed = {}
    aggregates = [table for table in AGGREGATE_TABLES if "user_id" in client.columns(table)]
    org_days = rolled_up_days(client, subject) if "usage_daily" in aggregates and client.columns(ROLLUP_TABLE) else []
    for table in [*clickhouse_tables(client), *aggregates]:
        count = clickhouse_count(client, table, subject)
        if count:
            client.execute(f"ALTER TABLE {client.database}.{table} DELETE WHERE {subject.sql()}")
        removed[f"{client.database}.{table}"] = count
    wait_for_mutations(client, timeout_s)
    if org_days:
        # A key whose only user was the subject gets no new row from the rollup: its old row goes first.
        org_months = org_months_of(org_days) if client.columns(MONTHLY_ROLLUP_TABLE) else []
        client.execute(f"ALTER TABLE {client.database}.{ROLLUP_TABLE} DELETE WHERE (org_id, day) IN "
                       f"({period_keys(org_days)})")
        if org_months:
            client.execute(f"ALTER TABLE {client.database}.{MONTHLY_ROLLUP_TABLE} DELETE WHERE (org_id, month) IN "
                           f"({period_keys(org_months)})")
        wait_for_mutations(client, timeout_s)
        recompute_model_days(client, org_days)
        if org_months:
            recompute_model_months(client, org_months)
    return removed


def rolled_up_days(client: ClickHouse, subject: Subject) -> list[tuple[str, int]]:
    """(org, day midnight epoch s) of the subject's daily aggregates."""
    return [(org, int(day)) for org, day in client.rows(
        f"SELECT DISTINCT org_id, toUnixTimestamp(toDateTime(day, 'UTC')) FROM {client.database}.usage_daily "
        f"WHERE {subject.sql()} ORDER BY 1, 2")]


def wait_for_mutations(client: ClickHouse, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    # Mutations run in the background on every version; pre-21 servers have no mutations_sync.
    while client.rows(f"SELECT count() FROM system.mutations WHERE database = {sql_string(client.database)} "
                      "AND is_done = 0")[0][0]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ClickHouse deletes in {client.database} did not finish in {timeout_s:.0f} s")
        time.sleep(0.2)


# -- Parquet ------------------------------------------------------------------------------

def parquet_holdings(store: ParquetStore, subject: Subject) -> dict[str, int]:
    """{file: rows of the subject}, reading only the id columns of each file."""
    held = {}
    for path in store.files():
        with store.fs.open(path, "rb") as handle:
            ids = pq.read_table(handle, columns=["user_id", "org_id"])
        rows = pc.sum(subject.mask(ids).cast(pa.int64())).as_py() or 0
        if rows:
            held[path] = rows
    return held


def forget_parquet(store: ParquetStore, paths: list[str], subject: Subject) -> None:
    """Rewrite each file without the subject's rows (a file left empty is deleted)."""
    for path in paths:
        table = store.read_file(path)
        kept = table.filter(pc.invert(subject.mask(table)))
        if kept.num_rows:
            store.put(path, kept)
        else:
            store.fs.rm(path)


# -- Redis --------------------------------------------------------------------------------

def redis_keys(client: redis.Redis, subject: Subject) -> list[str]:
    keys = set()
    for pattern in subject.redis_patterns():
        keys.update(k.decode() for k in client.scan_iter(match=pattern, count=1000))
    return sorted(keys)


def restate_marks_of(client: redis.Redis, subject: Subject) -> list[str]:
    """The subject's members ('org/user|YYYYMM') of the month bases due for a recomputation."""
    return [member.decode() for member, _score in client.zscan_iter(RESTATE_KEY, count=1000)
            if subject.is_subject(member.decode().rsplit("|", 1)[0])]


def recent_windows_of(client: redis.Redis, subject: Subject) -> dict[str, list[str]]:
    """{org's recent-window index: the subject's members} (members name the user; they expire
    with the window records, ~22 minutes, but a forget does not wait for that)."""
    org = glob_escape(subject.org_id) if subject.org_id is not None else "*"
    found = {}
    for key in client.scan_iter(match=f"{RECENT_PREFIX}{org}", count=1000):
        members = [member.decode() for member, _score in client.zscan_iter(key, count=1000)
                   if subject.is_subject(recent_member_subject(member.decode()))]
        if members:
            found[key.decode()] = members
    return found


def forget_redis(client: redis.Redis, subject: Subject, keys: list[str]) -> None:
    """Delete the subject's keys (found by redis_keys), pending alerts, restate marks and
    entries in the orgs' recent-window indexes."""
    if keys:
        client.delete(*keys)
    alerts = pending_alerts_of(client, subject)
    if alerts:
        client.hdel(PENDING_ALERTS_KEY, *alerts)
    marks = restate_marks_of(client, subject)
    if marks:
        client.zrem(RESTATE_KEY, *marks)
    for key, members in recent_windows_of(client, subject).items():
        client.zrem(key, *members)


def pending_alerts_of(client: redis.Redis, subject: Subject) -> dict[str, dict]:
    alerts = {k.decode(): json.loads(v) for k, v in client.hgetall(PENDING_ALERTS_KEY).items()}
    return {alert_id: alert for alert_id, alert in alerts.items() if subject.is_subject(alert["subject"])}


def redis_export(client: redis.Redis, keys: list[str]) -> dict[str, dict]:
    out = {}
    for key in keys:
        kind = client.type(key).decode()
        value = client.hgetall(key) if kind == "hash" else client.get(key) if kind == "string" else None
        if kind == "set":  # late-event ids, as 12-byte hashes
            value = sorted(member.decode() for member in client.smembers(key))
        elif isinstance(value, dict):
            value = {k.decode(): v.decode() for k, v in value.items()}
        elif isinstance(value, bytes):
            value = value.decode()
        out[key] = {"type": kind, "value": value}
    return out


# -- the whole subject --------------------------------------------------------------------

def recovery_dirs(settings, extra: tuple[str, ...] = ()) -> list[str]:
    """The recovery directories that exist: settings.recovery.dir and any given."""
    return [d for d in dict.fromkeys((settings.recovery.dir, *extra)) if recovery.recovery_files(d)]


def find(settings, subject: Subject, recovery_extra: tuple[str, ...] = ()) -> Found:
    found = Found()
    for storage in settings.storages():
        client = ClickHouse(settings.clickhouse.url, storage.clickhouse_database)
        for table in clickhouse_tables(client):
            found.clickhouse[f"{client.database}.{table}"] = clickhouse_count(client, table, subject)
        found.parquet.update(parquet_holdings(settings.parquet.store(storage.parquet_root), subject))
    client = redis.Redis.from_url(settings.redis.url)
    found.redis_keys = redis_keys(client, subject)
    found.pending_alerts = len(pending_alerts_of(client, subject))
    found.restate_marks = len(restate_marks_of(client, subject))
    found.recent_windows = sum(map(len, recent_windows_of(client, subject).values()))
    for directory in recovery_dirs(settings, recovery_extra):
        found.recovery.update(recovery.snapshots_holding(directory, subject.holds))
    if vault.vault_configured(settings):
        found.vault_keys = vault.count_user_keys(settings, subject.user_id, subject.org_id)
    return found


def forget(settings, subject: Subject, recovery_extra: tuple[str, ...] = ()) -> Found:
    """Delete the subject everywhere; return what was found (and is now gone)."""
    found = find(settings, subject, recovery_extra)
    for storage in settings.storages():
        forget_clickhouse(ClickHouse(settings.clickhouse.url, storage.clickhouse_database), subject)
        store = settings.parquet.store(storage.parquet_root)
        forget_parquet(store, [path for path in found.parquet if path.startswith(store.root)], subject)
    forget_redis(redis.Redis.from_url(settings.redis.url), subject, found.redis_keys)
    for directory in recovery_dirs(settings, recovery_extra):
        recovery.scrub(directory, subject.holds)
    if found.vault_keys:
        vault.shred_user(settings, subject.user_id, subject.org_id)
    return found


def export(settings, subject: Subject, out: Path) -> dict[str, int]:
    """Write everything held about the subject under out/; return {file name: records}."""
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}

    def dump(name: str, records: list[dict]) -> None:
        with open(out / name, "w") as handle:
            for record in records:
                handle.write(json.dumps(record, default=str, sort_keys=True) + "\n")
        written[name] = len(records)

    for storage in settings.storages():
        client = ClickHouse(settings.clickhouse.url, storage.clickhouse_database)
        for table in clickhouse_tables(client):
            dump(f"clickhouse.{client.database}.{table}.jsonl", clickhouse_rows(client, table, subject))
        store = settings.parquet.store(storage.parquet_root)
        rows = []
        for path in parquet_holdings(store, subject):
            table = store.read_file(path)
            rows += [{**row, "_file": path} for row in table.filter(subject.mask(table)).to_pylist()]
        dump(f"parquet.{storage.clickhouse_database}.jsonl", rows)
    client = redis.Redis.from_url(settings.redis.url)
    redis_state = redis_export(client, redis_keys(client, subject))
    redis_state["pending_alerts"] = pending_alerts_of(client, subject)
    (out / "redis.json").write_text(json.dumps(redis_state, indent=1, sort_keys=True))
    written["redis.json"] = len(redis_state) - 1
    if vault.vault_configured(settings):
        if vault.role_of(settings) in vault.READER_ROLES:
            dump("vault.jsonl", vault.export_user(settings, subject.user_id, subject.org_id))
        else:
            written["vault.jsonl (withheld: the actor has no vault reader role)"] = 0
    return written
