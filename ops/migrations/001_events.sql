-- Raw events, one row per unique event_id: ReplacingMergeTree collapses replays and
-- duplicates that slip past the in-flow dedupe horizon. Text columns expire after 30 days,
-- rows after a year (after raw_ttl_days too since 050: the aggregates keep the year).
CREATE TABLE IF NOT EXISTS {db}.events
(
    event_id String,
    request_id String,
    schema_version UInt16,
    event_time DateTime64(3, 'UTC'),
    user_id String,
    org_id LowCardinality(String),
    region LowCardinality(String),
    provider LowCardinality(String),
    endpoint LowCardinality(String),
    model LowCardinality(String),
    model_version Nullable(String),
    status_code UInt16,
    error_code Nullable(String),
    streaming Bool,
    latency_ms UInt32 CODEC(T64, ZSTD(1)),
    time_to_first_token_ms Nullable(UInt32),
    input_tokens UInt64 CODEC(T64, ZSTD(1)),
    output_tokens UInt64 CODEC(T64, ZSTD(1)),
    cache_read_tokens UInt64 CODEC(T64, ZSTD(1)),
    cache_write_tokens UInt64 CODEC(T64, ZSTD(1)),
    prompt Nullable(String) TTL toDateTime(event_time) + INTERVAL {raw_ttl_days} DAY CODEC(ZSTD(3)),
    response Nullable(String) TTL toDateTime(event_time) + INTERVAL {raw_ttl_days} DAY CODEC(ZSTD(3)),
    conversation_id Nullable(String),
    experiment_id Nullable(String),
    variant Nullable(String),
    safety_decisions Array(LowCardinality(String)),
    policy_flags Array(LowCardinality(String)),
    classification LowCardinality(String),
    pii_entity_counts Map(LowCardinality(String), UInt32),
    cost_usd Decimal(18, 9) DEFAULT 0,
    price_version LowCardinality(String) DEFAULT '',
    source_partition Int32,
    source_offset Int64,
    ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (org_id, toDate(event_time), model, user_id, event_id)
TTL toDateTime(event_time) + INTERVAL {aggregate_ttl_days} DAY;
