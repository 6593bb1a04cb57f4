-- The subscription's state as the license reactor has seen it, so the renewal scheduler
-- renews only the licenses of subscriptions that are still paid for.
ALTER TABLE license_plans ADD COLUMN subscription_status text NOT NULL DEFAULT 'trialing';
