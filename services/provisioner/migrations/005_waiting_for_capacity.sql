-- A job that would start an instance for a customer who has none waits while the platform
-- runs as many instances as it can hold. This says since when (its
-- DeploymentWaitingForCapacity is recorded then, once); cleared when the job starts.
ALTER TABLE queue_jobs ADD COLUMN waiting_for_capacity_since timestamptz;

-- The last InstanceCapacityChanged on the log and its sequence, as the capacity projection
-- applied it: the next one is appended expecting that sequence, so it is appended once across
-- replicas, and never from a view that lags the log.
CREATE TABLE capacity_recorded (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    seq bigint NOT NULL,
    running integer NOT NULL,
    capacity integer,
    limited_by text,
    "full" boolean NOT NULL,
    changed_at timestamptz NOT NULL
);
