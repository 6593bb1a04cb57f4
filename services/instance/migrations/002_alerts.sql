-- Alert rules, each device's state under each rule, the history of firings and resolutions,
-- and webhook deliveries waiting to be (re)tried.
CREATE TABLE alert_rules (
    rule_id text PRIMARY KEY,
    name text NOT NULL,
    metric text NOT NULL,
    operator text,
    threshold double precision,
    for_seconds integer NOT NULL,
    devices text[] NOT NULL,
    webhook_url text,
    webhook_secret text,
    created_at timestamptz NOT NULL,
    deleted_at timestamptz
);

CREATE TABLE alert_states (
    rule_id text NOT NULL,
    device_id text NOT NULL,
    state text NOT NULL,
    since timestamptz NOT NULL,
    value double precision,
    PRIMARY KEY (rule_id, device_id)
);

CREATE TABLE alert_history (
    id bigserial PRIMARY KEY,
    rule_id text NOT NULL,
    device_id text NOT NULL,
    event text NOT NULL,
    at timestamptz NOT NULL,
    value double precision,
    message text NOT NULL
);

CREATE TABLE webhook_deliveries (
    id bigserial PRIMARY KEY,
    rule_id text NOT NULL,
    url text NOT NULL,
    body text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_at timestamptz NOT NULL,
    delivered_at timestamptz,
    last_error text
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_at) WHERE delivered_at IS NULL;
