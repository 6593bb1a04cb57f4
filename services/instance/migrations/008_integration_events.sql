-- What the instance tells the customer's integrations (webhooks they add): quota notices,
-- calibration changes, and whatever else happens to their data, in the order it happened.
-- Rows are appended in the transaction of what they report, and delivered to every integration
-- subscribed to their kind from there (integrations keep their own position in this table).
CREATE TABLE integration_events (
    id bigserial PRIMARY KEY,
    kind text NOT NULL,
    at timestamptz NOT NULL,
    device_id text,
    body jsonb NOT NULL
);

CREATE INDEX integration_events_kind ON integration_events (kind, id);
