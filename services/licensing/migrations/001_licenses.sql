-- Licenses issued to each customer and their history, projected from LicenseIssued/Revoked.
CREATE TABLE licenses (
    license_id text PRIMARY KEY,
    customer_id text NOT NULL,
    plan text NOT NULL,
    kid text NOT NULL,
    license_type text NOT NULL,
    issued_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    grace_until timestamptz,
    features jsonb NOT NULL,
    limits jsonb NOT NULL,
    jwt text NOT NULL,
    revoked_at timestamptz,
    revoked_reason text
);

CREATE INDEX licenses_customer ON licenses (customer_id, issued_at DESC);

CREATE TABLE license_history (
    seq bigint PRIMARY KEY,
    customer_id text NOT NULL,
    license_id text NOT NULL,
    action text NOT NULL,
    license_type text,
    plan text,
    actor text NOT NULL,
    reason text,
    at timestamptz NOT NULL
);

CREATE INDEX license_history_customer ON license_history (customer_id, seq);
