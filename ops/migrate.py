"""The one migration runner: Kafka topics, ClickHouse databases and the audit log, used by
`gatewatch migrate`, the demo and the tests. Every step is idempotent: it creates what is
missing and reports what it did."""

from __future__ import annotations

import time

from ops.settings import KafkaSettings, Settings
from schemas.vocabulary import topic_partitions


def create_topics(
    bootstrap: str,
    topics: dict[str, int],
    timeout: float = 30,
    config: dict[str, str] | None = None,
    replication_factor: int = 1,
) -> dict[str, int]:
    """Create ``{name: partitions}``; topics that already exist are left as they are.

    Waits until the broker's metadata shows every topic and returns ``{name: partitions}`` as
    the broker reports them (an existing topic keeps its own partition count).
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    if not topics:
        return {}
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=replication_factor,
                  config=dict(config or {})) for name, partitions in topics.items()],
        operation_timeout=timeout, request_timeout=timeout)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                exc.add_note(f"while creating topic {name!r} ({topics[name]} partitions) on {bootstrap}")
                raise
    deadline = time.monotonic() + timeout
    while True:
        metadata = admin.list_topics(timeout=max(1.0, deadline - time.monotonic()))
        found = {name: len(metadata.topics[name].partitions) for name in topics
                 if name in metadata.topics and metadata.topics[name].error is None
                 and metadata.topics[name].partitions}
        if len(found) == len(topics):
            return found
        if time.monotonic() >= deadline:
            missing = sorted(set(topics) - set(found))
            raise TimeoutError(f"topics {missing} not visible on {bootstrap} after {timeout:.0f}s")
        time.sleep(0.1)


def migrate_kafka(kafka: KafkaSettings) -> dict[str, int]:
    """Create the pipeline's topics on kafka.bootstrap; return them with the partitions the
    broker reports (a topic that already existed keeps its own)."""
    return create_topics(kafka.bootstrap, topic_partitions(kafka, kafka.partitions))


def clickhouse_databases(settings: Settings) -> list[str]:
    """The default database and every residency region's own."""
    return sorted({settings.clickhouse.database} | {s.clickhouse_database for s in settings.storages()})


def migrate_clickhouse(settings: Settings, database: str | None = None) -> list[str]:
    """Apply the ClickHouse migrations to one database (default: clickhouse.database) and
    bring its TTLs to the retention settings; return the migrations and TTL changes made now."""
    from sinks.clickhouse import ClickHouse

    client = ClickHouse(settings.clickhouse.url, database or settings.clickhouse.database)
    retention = settings.retention
    applied = client.migrate(retention.raw_days, retention.aggregate_days)
    return applied + [str(change) for change in client.apply_retention(retention.raw_days, retention.aggregate_days)]


def migrate_audit(settings: Settings) -> list[str]:
    """Create the audit log's tables and its monthly partitions; return the months ready."""
    from ops.privacy.audit import prepare_audit

    return prepare_audit(settings)
