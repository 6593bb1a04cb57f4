-- One customer's data: devices, their readings (partitioned by day), rejected readings and
-- daily usage. The instance owns this database alone.
CREATE TABLE devices (
    device_id text PRIMARY KEY,
    name text NOT NULL,
    mqtt_username text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL,
    status text NOT NULL DEFAULT 'unknown',
    last_seen timestamptz,
    deleted_at timestamptz
);

CREATE TABLE readings (
    device_id text NOT NULL,
    ts timestamptz NOT NULL,
    temperature real NOT NULL,
    humidity real NOT NULL,
    pressure real NOT NULL,
    gas_resistance real NOT NULL,
    iaq real,
    iaq_accuracy smallint,
    co2_equivalent real,
    breath_voc_equivalent real
) PARTITION BY RANGE (ts);

CREATE INDEX readings_device_ts ON readings (device_id, ts);

-- Hourly rollups: long ranges are answered from here, not from the raw readings.
CREATE TABLE readings_hourly (
    device_id text NOT NULL,
    hour timestamptz NOT NULL,
    metric text NOT NULL,
    n bigint NOT NULL,
    total double precision NOT NULL,
    low real NOT NULL,
    high real NOT NULL,
    PRIMARY KEY (device_id, metric, hour)
);

CREATE TABLE dead_letters (
    id bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL,
    topic text NOT NULL,
    device_id text,
    reason text NOT NULL,
    payload bytea NOT NULL
);

CREATE INDEX dead_letters_received ON dead_letters (received_at);

CREATE TABLE usage_days (
    day date PRIMARY KEY,
    mqtt_messages bigint NOT NULL DEFAULT 0,
    stored_readings bigint NOT NULL DEFAULT 0,
    rejected_readings bigint NOT NULL DEFAULT 0,
    over_quota_readings bigint NOT NULL DEFAULT 0,
    api_requests bigint NOT NULL DEFAULT 0
);
