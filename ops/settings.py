"""All gatewatch configuration in one pydantic model.

Values come, lowest precedence first, from the defaults below, the addresses that
`gatewatch services up` recorded, a TOML file (`--config` or GATEWATCH_CONFIG), and
GATEWATCH_<SECTION>__<FIELD> environment variables. Every value remembers where it came
from so that a bad one is reported with its origin.
"""

from __future__ import annotations

import base64
import json
import os
import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator

from redaction import RedactionSettings
# One section base and one comma-list type for every settings section: redaction's, the
# lowest package with settings of its own (it may not import ops; ops may import it).
from redaction.settings import CsvList, Section, split_csv
from sinks.text_cipher import decode_key

ENV_PREFIX = "GATEWATCH_"
# GATEWATCH_* variables that are not settings: the config file path, the state directory of
# `gatewatch services`, who the access audit records, and the test suite's server overrides.
NOT_SETTINGS = ("GATEWATCH_CONFIG", "GATEWATCH_STATE_DIR", "GATEWATCH_ACTOR", "GATEWATCH_TEST_")
SINK_NAMES = ("parquet", "clickhouse", "quota", "billing", "dlq", "audit")
DEFAULT_SINKS = SINK_NAMES[:5]
"""The audit log sink is on where it is asked for (`sinks`), as the demo does."""
_HOST_PORT = re.compile(r"^[A-Za-z0-9_.\-]+:\d{1,5}$")


class KafkaSettings(Section):
    bootstrap: str = "127.0.0.1:9092"
    events_topic: str = "gateway-events"
    dlq_topic: str = "gateway-events-dlq"
    billing_topic: str = "billing-events"
    quota_alerts_topic: str = "quota-alerts"
    feedback_topic: str = "gateway-feedback"
    partitions: int = Field(3, ge=1)
    batch_size: int = Field(1000, ge=1, le=100_000)
    starting_offset: Literal["earliest", "latest"] = "earliest"
    only_partitions: list[int] | None = None
    """Consume just these partitions of the events topic: independent flow processes, each
    with its own share, scale out without a Bytewax cluster (events are keyed by user, so all
    of a user's state lives in one process)."""
    idle_wait_s: float = Field(0.05, ge=0, le=5)
    """How long a caught-up partition rests before polling again (0: poll in a tight loop)."""
    tail: bool = True
    extra: dict[str, str] = {}

    @field_validator("only_partitions", mode="before")
    @classmethod
    def _partition_list(cls, value: Any) -> Any:
        return split_csv(value) if isinstance(value, str) else value

    @field_validator("bootstrap")
    @classmethod
    def _brokers_are_host_port(cls, value: str) -> str:
        brokers = [b.strip() for b in value.split(",") if b.strip()]
        bad = [b for b in brokers if not _HOST_PORT.match(b) or not 0 < int(b.rsplit(":", 1)[1]) < 65536]
        if not brokers or bad:
            raise ValueError(f"expected comma-separated host:port broker addresses, got {value!r}")
        return ",".join(brokers)

    @property
    def brokers(self) -> list[str]:
        return self.bootstrap.split(",")


class SchemaSettings(Section):
    registry_url: str | None = None
    """A Confluent Schema Registry; without one the .avsc files shipped in schemas/avro are the registry."""


class ValidationSettings(Section):
    regions: CsvList = ["us", "eu", "apac"]
    max_future_s: float = Field(300, ge=0)
    max_past_s: float = Field(7 * 86400, gt=0)
    max_latency_ms: int = Field(15 * 60 * 1000, gt=0)
    max_tokens: int = Field(10_000_000, gt=0)
    # Input limits (schemas.rules.DecodeLimits): beyond them a message goes to the DLQ with its code.
    max_message_bytes: int = Field(1_000_000, gt=0)
    """Largest message value decoded (code too_large)."""
    max_json_depth: int = Field(16, ge=2)
    """Deepest JSON nesting (code too_deep)."""
    max_number_digits: int = Field(40, ge=20)
    """Longest JSON number literal, checked before conversion (code out_of_range)."""
    max_array_items: int = Field(256, ge=1)
    """Most items in a JSON array or a list field (code too_large)."""
    max_id_chars: int = Field(128, ge=36)
    """event_id, request_id, user_id, org_id, conversation_id, experiment_id (code too_long)."""
    max_name_chars: int = Field(128, ge=16)
    """model, provider, endpoint, region, model_version, error_code, variant, list items (code too_long)."""
    max_text_chars: int = Field(500_000, ge=1000)
    """prompt, response, comment (code too_long)."""


class DlqSettings(Section):
    max_original_bytes: int = Field(64 * 1024, ge=256, le=512 * 1024)
    """The redacted original is cut to this size (its full size and SHA-256 are kept)."""
    spool_path: str = "gatewatch-dlq-spool.jsonl"
    """A DLQ record the broker refuses for good is appended here (JSON lines), with an alert."""


class DedupeSettings(Section):
    horizon_s: float = Field(900, gt=0)
    """How long an event_id is remembered; must cover the window lateness (see Settings)."""
    buckets: int = Field(256, ge=1, le=65536)
    """Keyed-state buckets for event ids and users; more spreads work over more workers."""


class WindowSettings(Section):
    length_s: float = Field(60, gt=0)
    allowed_lateness_s: float = Field(600, ge=0)
    flush_interval_s: float = Field(2, gt=0)
    late_policy: Literal["adjust", "dlq", "current"] = "adjust"
    """adjust: a late event counts once in its own event-time day and month, billed as an
    adjustment; dlq: late events go to the DLQ instead (unbilled); current: counted in the
    user's newest window."""


class ModelPrice(Section):
    """USD per million tokens of each kind."""

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cache_read: Decimal = Field(ge=0)
    cache_write: Decimal = Field(ge=0)


def _price(input: str, output: str, cache_read: str, cache_write: str) -> ModelPrice:
    return ModelPrice(input=Decimal(input), output=Decimal(output),
                      cache_read=Decimal(cache_read), cache_write=Decimal(cache_write))


class PricingSettings(Section):
    """A versioned price table; the version travels with every billing event."""

    version: str = "2026-11-01"
    models: dict[str, ModelPrice] = {
        "gpt-4o": _price("2.50", "10.00", "1.25", "2.50"),
        "gpt-4o-mini": _price("0.15", "0.60", "0.075", "0.15"),
        "claude-sonnet-4": _price("3.00", "15.00", "0.30", "3.75"),
        "gemini-2.0-flash": _price("0.10", "0.40", "0.025", "0.10"),
        "llama-3.3-70b": _price("0.60", "0.60", "0.60", "0.60"),
    }
    default: ModelPrice | None = None
    """Price of models missing from the table; without one their usage is billed at 0 and flagged."""


class TierLimits(Section):
    requests_per_day: int | None = Field(None, ge=0)
    tokens_per_month: int | None = Field(None, ge=0)
    overage_allowed: bool = False


class QuotaSettings(Section):
    default_tier: str = "free"
    tiers: dict[str, TierLimits] = {
        "free": TierLimits(requests_per_day=10, tokens_per_month=100_000, overage_allowed=False),
        "pro": TierLimits(requests_per_day=None, tokens_per_month=None, overage_allowed=True),
        "enterprise": TierLimits(requests_per_day=None, tokens_per_month=None, overage_allowed=True),
    }
    alert_thresholds: list[float] = [0.8, 1.0]
    month_bases: bool = True
    """Month usage per user as a base from the ClickHouse daily aggregates plus the recent
    day counters (Redis memory follows the users active now); false: a month counter per
    user active this month, which grows Redis with the month's long tail (sinks.quota)."""

    replay_counts_from_ms: int | None = None
    """Set by `gatewatch replay` for the open days it replays: the quota sink counts only window
    totals and late events dated from then on; what is older is restated from the aggregates
    (its window records may have expired: counting it again would count it twice)."""

    @model_validator(mode="after")
    def _default_tier_exists(self) -> "QuotaSettings":
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not one of the tiers: {', '.join(self.tiers)}")
        return self


class ParquetSettings(Section):
    root: str = "./gatewatch-data/raw"
    """A local directory or an s3://bucket/prefix URL."""
    s3_endpoint_url: str | None = None
    max_rows: int = Field(10_000, gt=0)
    """Rows per file and per (date, region) batch. A flow process holds every open batch (~3 KB
    per event) and peaks when one is written: 10,000 rather than 50,000 took the heavier of two
    flow processes from 534-602 to 452-454 MB in a 300,000-event drain at the same CPU per event
    (ops/bench/FINDINGS.md, issue 17). Small files are merged later (sinks.parquet_compaction)."""
    max_age_s: float = Field(30, gt=0)
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    put_timeout_s: float = Field(60, gt=0)
    """Longest one upload to S3 may take before the sink gives up on it and retries."""
    text_sample_rate: float = Field(1.0, ge=0, le=1)
    """Share of events whose prompt and response are kept (Parquet and ClickHouse); metrics use every event."""
    text_keys: dict[str, SecretStr] = {}
    """AES keys (base64, 16/24/32 bytes) by key id; old ids stay here to read files they sealed."""
    text_key_id: str | None = None
    """The key that seals raw text in new files; none writes text in the clear."""

    @field_validator("text_keys")
    @classmethod
    def _keys_are_aes(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for key_id, key in value.items():
            try:
                decode_key(key.get_secret_value())
            except ValueError as exc:
                raise ValueError(f"text key {key_id!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _active_key_exists(self) -> "ParquetSettings":
        if self.text_key_id is not None and self.text_key_id not in self.text_keys:
            raise ValueError(f"text_key_id {self.text_key_id!r} is not one of text_keys ({', '.join(self.text_keys) or 'none'})")
        return self

    def store(self, root: str | None = None):
        from sinks.parquet import ParquetStore
        return ParquetStore(root or self.root, self.s3_endpoint_url, self.compression,
                            {key_id: decode_key(key.get_secret_value()) for key_id, key in self.text_keys.items()},
                            self.text_key_id, self.put_timeout_s)


class ClickHouseSettings(Section):
    url: str = "chdb://./gatewatch-data/chdb"
    """`chdb://PATH` for embedded ClickHouse, or `clickhouse://[user:pass@]host:port` for a server.
    An embedded session takes ClickHouse server settings in the URL's query,
    `chdb://PATH?mark_cache_size=67108864&background_pool_size=2` (sinks.chdb_session.chdb_location).
    A flow writing to a server never loads chdb (~230 MB of code in each flow process).
    `chdb+unix:///path/to/host.sock` writes the one chdb database of a `gatewatch chdb-host`
    on the same machine (ops/chdb_host.py): chdb's memory once per machine, not per process."""
    database: str = "gatewatch"
    max_rows: int = Field(20_000, gt=0)
    max_age_s: float = Field(1, gt=0)
    aggregate_interval_s: float = Field(60, ge=0)
    """How often a writer recomputes the usage aggregates of the hours it touched (once more
    an interval and 5 s after its last batch, and when the flow ends); 0 recomputes after every
    batch. Each refresh re-reads every raw event of the touched users' hours, so its cost
    per event falls with the interval
    (60,000 events of skewed users into chdb in 2,000-row inserts: 43 µs per event refreshing
    after every 5th insert, 13 after every 30th); 60 s keeps the aggregates inside the
    2-minute freshness objective (ops/bench/FINDINGS.md)."""

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("chdb://", "chdb+unix://", "clickhouse://", "clickhouses://")):
            raise ValueError(f"expected chdb://PATH, chdb+unix:///HOST.sock or clickhouse://host:port, got {value!r}")
        return value


class RedisSettings(Section):
    url: str = "redis://127.0.0.1:6379/0"

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected redis://host:port/db, got {value!r}")
        return value


class RetrySettings(Section):
    """How a failing sink write is retried: forever, with capped exponential backoff and
    jitter, while the flow holds back (nothing is dropped)."""

    initial_backoff_s: float = Field(0.2, gt=0)
    max_backoff_s: float = Field(30, gt=0)


class RetentionSettings(Section):
    raw_days: int = Field(30, ge=1)
    """Raw Parquet partitions, ClickHouse's raw events (prompt and response with them) and
    feedback comments are deleted after this many days."""
    aggregate_days: int = Field(365, ge=1)
    """ClickHouse's aggregates (and so every metric view over them), audit_log and feedback
    ratings live this long. ClickHouse's TTLs follow a change of either at the next migrate,
    `retention apply` or flow start on chdb (sinks.clickhouse_ttl)."""


class AuditSettings(Section):
    """The audit log (one row per unique event) and the access audit of data commands."""

    url: str = "sqlite:///./gatewatch-data/audit.sqlite3"
    """`sqlite:///PATH` (embedded, for the demo) or `postgresql://user[:pass]@host:port/db`."""
    app_role: str | None = None
    """PostgreSQL role the flows connect as: granted SELECT and INSERT only when the owner migrates."""
    hash_key: SecretStr | None = None
    """Base64 key of the HMAC-SHA-256 that stands for user ids in the audit; without one a
    random key is generated once in hash_key_file."""
    hash_key_file: str = "./gatewatch-data/audit-hash.key"
    months: int = Field(24, ge=1)
    """Monthly partitions older than this many months are dropped by `retention apply`."""
    max_rows: int = Field(5000, gt=0)
    max_age_s: float = Field(1, gt=0)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError(f"expected sqlite:///PATH or postgresql://user@host:port/db, got {value!r}")
        return value

    @field_validator("hash_key")
    @classmethod
    def _key_is_base64(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                raw = base64.b64decode(value.get_secret_value(), validate=True)
            except ValueError:
                raise ValueError("the audit hash key must be base64") from None
            if len(raw) < 16:
                raise ValueError(f"the audit hash key must be at least 16 bytes, this one decodes to {len(raw)}")
        return value


class VaultSettings(Section):
    """The prompt/response vault: original text sealed per (org, user) data key, for
    compliance reads by the roles below; off unless enabled."""

    enabled: bool = False
    root: str = "./gatewatch-data/vault"
    """A local directory or s3://bucket/prefix (S3 endpoint: parquet.s3_endpoint_url)."""
    key_store: str = "./gatewatch-data/vault-keys.sqlite3"
    """SQLite file of the wrapped data keys; deleting a user's row shreds their records."""
    keks: dict[str, SecretStr] = {}
    """Key-encryption keys (base64, 32 bytes) by id; keep old ids until `vault rotate` has run."""
    kek_id: str | None = None
    days: int = Field(730, ge=1)
    roles: dict[str, Literal["auditor", "admin"]] = {}
    """Actor (GATEWATCH_ACTOR or user@host) -> role; only these actors may read the vault."""
    max_rows: int = Field(2000, gt=0)
    max_age_s: float = Field(2, gt=0)

    @field_validator("keks")
    @classmethod
    def _keks_are_aes_256(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for kek_id, kek in value.items():
            try:
                if len(decode_key(kek.get_secret_value())) != 32:
                    raise ValueError("a KEK must be 32 bytes (AES-256)")
            except ValueError as exc:
                raise ValueError(f"KEK {kek_id!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _enabled_has_a_kek(self) -> "VaultSettings":
        if self.enabled and (self.kek_id is None or self.kek_id not in self.keks):
            raise ValueError(f"an enabled vault needs kek_id naming one of keks (kek_id {self.kek_id!r}, "
                             f"keks: {', '.join(self.keks) or 'none'})")
        return self

    def kek_bytes(self) -> dict[str, bytes]:
        return {kek_id: decode_key(kek.get_secret_value()) for kek_id, kek in self.keks.items()}


class RecoverySettings(Section):
    enabled: bool = True
    dir: str = "./gatewatch-data/recovery"
    partitions: int = Field(1, ge=1)
    snapshot_interval_s: float = Field(10, gt=0)
    backup_interval_s: float = Field(0, ge=0)


class MetricsSettings(Section):
    port: int | None = Field(None, ge=0, lt=65536)
    """Prometheus endpoint of a flow process; process i of a cluster serves on port + i."""
    host: str = "127.0.0.1"
    """Listen address of that endpoint: 0.0.0.0 in a container, so probes and Prometheus reach it."""
    offset_by_process: bool = True
    """Add the process index to the port (processes sharing one host); false in a pod of its own."""
    dump_path: str | None = None
    """Where a flow process writes its counter totals as JSON when it exits (used by the demo)."""


class ApiSettings(Section):
    """`gatewatch serve`: the HTTP ingestion API (OTLP GenAI spans and JSON events -> Kafka)."""

    host: str = "127.0.0.1"
    port: int = Field(4318, ge=0, lt=65536)
    workers: int = Field(1, ge=1, le=64)
    keys_path: str = "./gatewatch-data/api/keys.sqlite"
    """The SQLite key store of a single host (used while keys_url is empty)."""
    keys_url: str = ""
    """`postgresql://user[:pass]@host:port/db`: one key table for every replica of serve
    (behind an autoscaler), so a key created or revoked anywhere holds everywhere."""
    spool_dir: str = "./gatewatch-data/api/spool"
    """Each worker process takes the first free slot <spool_dir>/w<N>, so a restarted
    server replays what its predecessor left there."""
    max_spool_bytes: int = Field(256 << 20, ge=1 << 20)
    default_region: str = "us"
    """Region of events when neither the API key nor the event names one."""
    max_body_bytes: int = Field(8 << 20, ge=1024)
    max_decompressed_bytes: int = Field(32 << 20, ge=1024)
    max_items_per_request: int = Field(20_000, ge=1)
    max_pending: int = Field(200_000, ge=1)
    """Events accepted but not yet acknowledged by Kafka above which requests get 429."""
    retry_after_s: int = Field(1, ge=1)
    key_cache_s: float = Field(2.0, ge=0, le=60)
    """How long a key lookup is cached: a revoked key stops working within this time."""
    durable: bool = True
    """A 2xx only once every accepted event is in the worker's spool file (survives a crash
    of serve). false: events may wait in librdkafka's memory when acknowledged; faster,
    but a crash of serve loses them."""

    @field_validator("keys_url")
    @classmethod
    def _keys_url_scheme(cls, value: str) -> str:
        if value and not value.startswith(("postgresql://", "postgres://", "sqlite:///")):
            raise ValueError(f"expected postgresql://user@host:port/db or sqlite:///PATH, got {value!r}")
        return value

    @property
    def key_store_url(self) -> str:
        """Where the API keys are: keys_url, or the SQLite file at keys_path."""
        return self.keys_url or f"sqlite:///{self.keys_path}"


class TracingSettings(Section):
    """OpenTelemetry spans of the pipeline's own batches (flows) and requests (serve), sent
    over OTLP/HTTP to a collector, Jaeger or Tempo; off while otlp_endpoint is empty."""

    otlp_endpoint: str = ""
    """Base URL of an OTLP/HTTP receiver (e.g. http://jaeger:4318); spans go to <it>/v1/traces."""
    service_name: str = "gatewatch"
    sample_ratio: float = Field(1.0, ge=0, le=1)
    """Share of root spans (batches, requests without a traceparent) kept; a request's own
    sampled flag decides for its span."""
    headers: dict[str, SecretStr] = {}
    """Sent with every export (an Authorization header of a hosted backend)."""
    export_timeout_s: float = Field(10, gt=0, le=120)

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s):// URL of an OTLP/HTTP receiver, got {value!r}")
        return value.rstrip("/")


class RegionStorage(Section):
    """Where one region's events are stored; nothing of that region is written elsewhere."""

    parquet_root: str
    clickhouse_database: str


class Settings(Section):
    kafka: KafkaSettings = KafkaSettings()
    schemas: SchemaSettings = SchemaSettings()
    validation: ValidationSettings = ValidationSettings()
    dlq: DlqSettings = DlqSettings()
    redaction: RedactionSettings = RedactionSettings()
    dedupe: DedupeSettings = DedupeSettings()
    windows: WindowSettings = WindowSettings()
    sinks: CsvList = list(DEFAULT_SINKS)
    pricing: PricingSettings = PricingSettings()
    quota: QuotaSettings = QuotaSettings()
    parquet: ParquetSettings = ParquetSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    redis: RedisSettings = RedisSettings()
    retry: RetrySettings = RetrySettings()
    recovery: RecoverySettings = RecoverySettings()
    retention: RetentionSettings = RetentionSettings()
    audit: AuditSettings = AuditSettings()
    vault: VaultSettings = VaultSettings()
    residency: dict[str, RegionStorage] = {}
    """Storage per region. Empty: every region in parquet.root (under region=) and
    clickhouse.database. Once set, a region missing here has its events sent to the DLQ."""
    metrics: MetricsSettings = MetricsSettings()
    api: ApiSettings = ApiSettings()
    tracing: TracingSettings = TracingSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _dedupe_covers_windows(self) -> "Settings":
        # A duplicate that outlives the dedupe horizon while its window is still open would
        # be counted twice, so the horizon must outlast every open window.
        needed = self.windows.allowed_lateness_s + self.windows.length_s
        if self.dedupe.horizon_s < needed:
            raise ValueError(f"dedupe.horizon_s ({self.dedupe.horizon_s:g}) must be at least windows.allowed_lateness_s"
                             f" + windows.length_s ({needed:g}), or late duplicates would be counted twice")
        return self

    def storage_for(self, region: str) -> RegionStorage | None:
        if not self.residency:
            return RegionStorage(parquet_root=self.parquet.root, clickhouse_database=self.clickhouse.database)
        return self.residency.get(region)

    def storages(self) -> list[RegionStorage]:
        """Every distinct place events are stored."""
        if not self.residency:
            return [self.storage_for("")]
        return list({(s.parquet_root, s.clickhouse_database): s for s in self.residency.values()}.values())

    @field_validator("sinks")
    @classmethod
    def _known_sinks(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in SINK_NAMES]
        if unknown:
            raise ValueError(f"unknown sink {', '.join(map(repr, unknown))}; known sinks: {', '.join(SINK_NAMES)}")
        return value


class SettingsError(ValueError):
    """Bad configuration; the message names each bad value and where it came from."""


def _env_layer(environ: dict[str, str]) -> tuple[dict, dict[tuple, str]]:
    values: dict = {}
    origins: dict[tuple, str] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name.startswith(NOT_SETTINGS):
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
        value: Any = raw
        if raw[:1] in "[{":
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                pass
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        origins[path] = f"environment variable {name}"
    return values, origins


def _flatten_origins(tree: dict, origin: str, prefix: tuple = ()) -> dict[tuple, str]:
    found: dict[tuple, str] = {}
    for key, value in tree.items():
        found[prefix + (key,)] = origin
        if isinstance(value, dict):
            found.update(_flatten_origins(value, origin, prefix + (key,)))
    return found


def _deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _service_layer() -> tuple[dict, dict[tuple, str]]:
    """Addresses of the servers `gatewatch services up` started, if any are recorded."""
    try:
        from ops.dev.services.state import load_addresses, state_dir_default
    except ImportError:
        return {}, {}
    state_dir = state_dir_default()
    addresses = load_addresses(state_dir)
    mapping = {
        "kafka_bootstrap": ("kafka", "bootstrap"),
        "redis_url": ("redis", "url"),
        "s3_endpoint_url": ("parquet", "s3_endpoint_url"),
        "clickhouse_url": ("clickhouse", "url"),
        "postgres_url": ("audit", "url"),
    }
    values: dict = {}
    origins: dict[tuple, str] = {}
    for name, path in mapping.items():
        if addresses.get(name):
            values.setdefault(path[0], {})[path[1]] = addresses[name]
            origins[path] = f"services state file in {state_dir}"
    return values, origins


def _origin_of(loc: tuple, origins: dict[tuple, str]) -> str:
    for end in range(len(loc), 0, -1):
        if loc[:end] in origins:
            return origins[loc[:end]]
    # A check over a whole section: name every source that set something in it.
    inside = sorted({origin for path, origin in origins.items() if path[:len(loc)] == loc})
    return ", ".join(inside) or "defaults"


def load_settings(
    config_file: str | os.PathLike | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict | None = None,
    use_service_state: bool = True,
) -> Settings:
    """Build Settings from every source; raise SettingsError naming each bad value and its origin."""
    environ = dict(os.environ if environ is None else environ)
    layers: list[tuple[dict, dict[tuple, str]]] = []
    if use_service_state:
        layers.append(_service_layer())
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if config_file:
        path = Path(config_file)
        try:
            tree = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise SettingsError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
        layers.append((tree, _flatten_origins(tree, f"config file {path}")))
    layers.append(_env_layer(environ))
    if overrides:
        layers.append((overrides, _flatten_origins(overrides, "command-line option")))

    merged: dict = {}
    origins: dict[tuple, str] = {}
    for values, layer_origins in layers:
        merged = _deep_merge(merged, values)
        origins.update(layer_origins)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = tuple(str(part) for part in error["loc"])
            where = ".".join(loc)
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown setting"
            lines.append(f"{where}: {message} (from {_origin_of(loc, origins)}; got {error.get('input')!r})")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
