-- The plan each customer's next license is for, as the reactor that issues licenses has seen
-- it (kept in the same transaction as its checkpoint, so it never lags the events it issues on).
CREATE TABLE license_plans (
    customer_id text PRIMARY KEY,
    plan text NOT NULL
);
