-- Each customer's subscription as the billing events describe it.
CREATE TABLE subscriptions (
    customer_id text PRIMARY KEY,
    plan text NOT NULL,
    status text NOT NULL,
    trial_started_at timestamptz,
    trial_ends_at timestamptz,
    stripe_customer_id text,
    stripe_subscription_id text,
    current_period_end timestamptz,
    last_payment_failure_at timestamptz,
    canceled_at timestamptz,
    updated_at timestamptz NOT NULL
);
