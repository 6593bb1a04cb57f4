-- Who billing bills: the contact Stripe's customer is created with, and the two-ID mapping
-- (our customer id <-> Stripe's customer id), projected from CustomerSignedUp and
-- StripeCustomerLinked.
CREATE TABLE billing_customers (
    customer_id text PRIMARY KEY,
    email text NOT NULL,
    company_name text NOT NULL,
    stripe_customer_id text UNIQUE,
    linked_at timestamptz
);
