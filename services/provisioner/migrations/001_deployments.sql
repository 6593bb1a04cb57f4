-- Deployment jobs and their progress as the deployment events record them.
CREATE TABLE deployments (
    job_id text PRIMARY KEY,
    customer_id text NOT NULL,
    kind text NOT NULL,
    plan text,
    priority integer NOT NULL,
    state text NOT NULL,
    progress integer NOT NULL DEFAULT 0,
    step text,
    attempts integer NOT NULL DEFAULT 0,
    backend text,
    instance_url text,
    error text,
    requested_at timestamptz NOT NULL,
    started_at timestamptz,
    finished_at timestamptz
);

CREATE INDEX deployments_customer ON deployments (customer_id, requested_at DESC);
