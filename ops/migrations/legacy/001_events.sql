-- Servers older than 21.x (Debian ships 18.16): no DateTime64, LowCardinality, Map, codecs
-- or TTL. Same columns and the same ReplacingMergeTree keyed by event_id, so every query
-- gatewatch runs reads the same; columns missing here (pii_entity_counts) are not written.
CREATE TABLE IF NOT EXISTS {db}.events
(
    event_id String,
    request_id String,
    schema_version UInt16,
    event_time DateTime('UTC'),
    user_id String,
    org_id String,
    region String,
    provider String,
    endpoint String,
    model String,
    model_version Nullable(String),
    status_code UInt16,
    error_code Nullable(String),
    streaming UInt8,
    latency_ms UInt32,
    time_to_first_token_ms Nullable(UInt32),
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_tokens UInt64,
    cache_write_tokens UInt64,
    prompt Nullable(String),
    response Nullable(String),
    conversation_id Nullable(String),
    experiment_id Nullable(String),
    variant Nullable(String),
    safety_decisions Array(String),
    policy_flags Array(String),
    classification String,
    cost_usd Decimal(18, 9) DEFAULT 0,
    price_version String DEFAULT '',
    source_partition Int32,
    source_offset Int64,
    ingested_at DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (org_id, model, user_id, event_id);
