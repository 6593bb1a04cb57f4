-- Billing's private memory of Stripe, kept by the reactor that turns stored Stripe events into
-- domain events. It judges order and repeats by Stripe's own ids and timestamps.
CREATE TABLE stripe_customers (
    stripe_customer_id text PRIMARY KEY,
    customer_id text NOT NULL
);

CREATE TABLE stripe_subscriptions (
    stripe_subscription_id text PRIMARY KEY,
    customer_id text NOT NULL,
    stripe_customer_id text,
    plan text NOT NULL,
    status text NOT NULL,
    current_period_end timestamptz,
    -- `created` of the newest Stripe event applied: an older one never moves the state back.
    last_event_created bigint NOT NULL,
    canceled boolean NOT NULL DEFAULT false
);

-- Every Stripe event billing looked at, and what it made of it.
CREATE TABLE stripe_events (
    stripe_event_id text PRIMARY KEY,
    stripe_type text NOT NULL,
    outcome text NOT NULL,
    seq bigint NOT NULL
);
