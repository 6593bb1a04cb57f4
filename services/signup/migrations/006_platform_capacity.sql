-- The platform's room for customer instances, as the provisioner's InstanceCapacityChanged last
-- said it: what a new trial is told when it signs up while the platform is full. One row;
-- rebuilt from the log by `iotistic replay signup`.
CREATE TABLE platform_capacity (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    running integer NOT NULL,
    capacity integer,
    limited_by text,
    "full" boolean NOT NULL,
    changed_at timestamptz NOT NULL
);
