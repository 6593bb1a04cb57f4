-- Each customer's usage per UTC day, as their instance reported it (UsageReported).
CREATE TABLE usage_days (
    customer_id text NOT NULL,
    day date NOT NULL,
    devices bigint NOT NULL,
    mqtt_messages bigint NOT NULL,
    api_requests bigint NOT NULL,
    rejected_readings bigint NOT NULL,
    storage_bytes bigint NOT NULL,
    final boolean NOT NULL,
    reported_at timestamptz NOT NULL,
    PRIMARY KEY (customer_id, day)
);
