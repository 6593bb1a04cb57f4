-- Stripe's webhook bodies exactly as sent, personal data and all: private state of billing's
-- gateway (like signup's password hashes), not a read model. The log carries only the facts
-- billing derives its events from (StripeEventReceived v2), so nothing is rebuilt from here and
-- nothing here is needed to rebuild anything. Deleted STRIPE_PAYLOAD_RETENTION_DAYS after
-- received_at (the database's clock).
CREATE TABLE stripe_payloads (
    stripe_event_id text PRIMARY KEY,
    stripe_type text NOT NULL,
    payload bytea NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX stripe_payloads_received_at ON stripe_payloads (received_at);
