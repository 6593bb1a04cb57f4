-- Each deployed instance's health as the health watch recorded it on the log (InstanceDegraded,
-- InstanceRecovered; a succeeded deployment makes it healthy again): a read model.
CREATE TABLE instance_health (
    customer_id text PRIMARY KEY,
    -- healthy or degraded
    state text NOT NULL,
    reason text,
    degraded_since timestamptz,
    -- degraded episodes so far: the watch derives its events' ids from it
    episodes integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL
);
