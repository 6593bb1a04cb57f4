-- The subscription of each customer as the closing reactor has seen it, and when the account
-- closed, kept with that reactor's checkpoint: a closed account whose subscription still bills
-- (a checkout that raced the closure) has it canceled at Stripe, whichever arrives first.
CREATE TABLE closed_subscriptions (
    customer_id text PRIMARY KEY,
    stripe_subscription_id text,
    status text,
    closed_at timestamptz
);
