"""The one migration runner: Kafka topics, ClickHouse databases and the audit log, used by
`gatewatch migrate`, the demo and the tests. Every step is idempotent: it creates what is
missing and reports what it did."""

from __future__ import annotations

from ops.settings import KafkaSettings, Settings


def pipeline_topics(kafka: KafkaSettings) -> dict[str, int]:
    """Every topic the flows read or write, with its partition count. The DLQ and quota
    alerts are low volume and keep their order in one partition."""
    return {kafka.events_topic: kafka.partitions, kafka.dlq_topic: 1, kafka.billing_topic: kafka.partitions,
            kafka.quota_alerts_topic: 1, kafka.feedback_topic: kafka.partitions}


def migrate_kafka(kafka: KafkaSettings) -> dict[str, int]:
    """Create the pipeline's topics on kafka.bootstrap; return them with the partitions the
    broker reports (a topic that already existed keeps its own)."""
    from ops.dev.services import create_topics

    return create_topics(kafka.bootstrap, pipeline_topics(kafka))


def clickhouse_databases(settings: Settings) -> list[str]:
    """The default database and every residency region's own."""
    return sorted({settings.clickhouse.database} | {s.clickhouse_database for s in settings.storages()})


def migrate_clickhouse(settings: Settings, database: str | None = None) -> list[str]:
    """Apply the ClickHouse migrations to one database (default: clickhouse.database);
    return the migrations applied now."""
    from sinks.clickhouse import ClickHouse

    client = ClickHouse(settings.clickhouse.url, database or settings.clickhouse.database)
    return client.migrate(settings.retention.raw_days, settings.retention.aggregate_days)


def migrate_audit(settings: Settings) -> list[str]:
    """Create the audit log's tables and its monthly partitions; return the months ready."""
    from ops.privacy.audit import prepare_audit

    return prepare_audit(settings)
