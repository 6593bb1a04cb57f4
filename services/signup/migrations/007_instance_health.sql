-- What the health watch last said of the customer's instance while it is degraded or being
-- redeployed because of it; cleared once it is healthy again.
ALTER TABLE accounts
    ADD COLUMN instance_degraded_since timestamptz,
    ADD COLUMN instance_health_reason text;
