-- What the account view and the operators' customers page show beyond the account row; read
-- models like `accounts`, rebuilt from the log by `iotistic replay signup`.

-- The customer's invoices as billing recorded them (InvoiceRecorded). A state is only replaced
-- by one at least as far along (status_rank), so a late "open" never hides a "paid".
CREATE TABLE account_invoices (
    customer_id text NOT NULL,
    stripe_invoice_id text NOT NULL,
    number text,
    status text NOT NULL,
    status_rank smallint NOT NULL,
    amount bigint NOT NULL,
    currency text NOT NULL,
    created_at timestamptz NOT NULL,
    url text,
    PRIMARY KEY (customer_id, stripe_invoice_id)
);

CREATE INDEX account_invoices_newest ON account_invoices (customer_id, created_at DESC);

-- The newest UTC day an instance reported usage for (UsageReported); an older day's late
-- report never replaces it.
CREATE TABLE account_usage (
    customer_id text PRIMARY KEY,
    day date NOT NULL,
    devices bigint NOT NULL,
    messages bigint NOT NULL,
    api_requests bigint NOT NULL,
    reported_at timestamptz NOT NULL
);

-- The daily quotas of the license in force, beside its features (LicenseIssued's limits).
ALTER TABLE accounts ADD COLUMN license_limits jsonb;

-- The last events about each customer, for the operators' customers page: type, time and a
-- summary with no personal data or secrets. Trimmed to the newest 50 per customer as it goes.
CREATE TABLE customer_events (
    customer_id text NOT NULL,
    seq bigint NOT NULL,
    event_type text NOT NULL,
    occurred_at timestamptz NOT NULL,
    summary text NOT NULL,
    PRIMARY KEY (customer_id, seq)
);

-- The operators' search: newest signups first.
CREATE INDEX accounts_signed_up ON accounts (signed_up_at DESC, customer_id);
