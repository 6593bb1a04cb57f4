-- The account view: everything the platform knows about a customer, projected from every event
-- about them. Rebuilt from the log by `iotistic replay signup`.
CREATE TABLE accounts (
    customer_id text PRIMARY KEY,
    email text NOT NULL,
    email_display text NOT NULL,
    company_name text NOT NULL,
    full_name text,
    signed_up_at timestamptz NOT NULL,
    plan text NOT NULL,
    subscription_status text NOT NULL DEFAULT 'pending',
    trial_ends_at timestamptz,
    current_period_end timestamptz,
    license_id text,
    license_jwt text,
    license_plan text,
    license_expires_at timestamptz,
    license_features jsonb,
    deployment_job_id text,
    deployment_status text NOT NULL DEFAULT 'pending',
    deployment_progress integer NOT NULL DEFAULT 0,
    deployment_step text,
    deployment_error text,
    instance_url text,
    closed_at timestamptz,
    updated_at timestamptz NOT NULL
);

CREATE UNIQUE INDEX accounts_email ON accounts (email);
