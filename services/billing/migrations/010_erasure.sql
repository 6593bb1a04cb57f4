-- Right to erasure (issue 18, item 6): an erased customer's billing contact is dropped.
ALTER TABLE billing_customers
    ALTER COLUMN email DROP NOT NULL,
    ALTER COLUMN company_name DROP NOT NULL,
    ADD COLUMN erased_at timestamptz;
