-- The deployment queue: the provisioner's private state. Each change to a job is made in one
-- transaction with the event that records it (the outbox), so the log and the queue agree.
CREATE TABLE queue_jobs (
    job_id text PRIMARY KEY,
    customer_id text NOT NULL,
    kind text NOT NULL,
    priority integer NOT NULL,
    -- waiting, active, delayed, completed, failed, superseded
    state text NOT NULL,
    data jsonb NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL,
    progress integer NOT NULL DEFAULT 0,
    step text,
    failed_reason text,
    attempt_log jsonb NOT NULL DEFAULT '[]',
    created_at timestamptz NOT NULL,
    -- when a waiting or delayed job may run
    run_after timestamptz NOT NULL,
    processed_on timestamptz,
    finished_on timestamptz,
    lease_owner text,
    lease_until timestamptz,
    superseded_by text
);

CREATE INDEX queue_jobs_runnable ON queue_jobs (priority, created_at)
    WHERE state IN ('waiting', 'delayed', 'active');
CREATE INDEX queue_jobs_customer ON queue_jobs (customer_id, created_at DESC);
CREATE INDEX queue_jobs_state ON queue_jobs (state, finished_on);

CREATE TABLE queue_control (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    paused boolean NOT NULL DEFAULT false
);
INSERT INTO queue_control DEFAULT VALUES;

-- The license each customer's instance should run, as LicenseIssued last said.
CREATE TABLE customer_licenses (
    customer_id text PRIMARY KEY,
    license_id text NOT NULL,
    plan text NOT NULL,
    jwt text NOT NULL,
    max_devices integer NOT NULL,
    closed boolean NOT NULL DEFAULT false
);

-- What the last finished job left: the instance's URL, or that it was removed.
CREATE TABLE customer_instances (
    customer_id text PRIMARY KEY,
    state text NOT NULL,
    instance_url text,
    backend text NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    event_id text NOT NULL UNIQUE,
    subject_key text NOT NULL,
    envelope bytea NOT NULL
);

-- The local backend's instances: which customers run here, on which port.
CREATE TABLE local_instances (
    customer_id text PRIMARY KEY,
    port integer NOT NULL,
    created_at timestamptz NOT NULL
);
