-- A closed account's license ends with it. The license reactor keeps, with its checkpoint,
-- which license is the customer's current one (the last LicenseIssued in log order) and when
-- the account closed: it revokes the current license once, revokes any issued before the
-- closure that reaches the log after it, and issues none afterwards; renewals skip it too.
ALTER TABLE license_plans ADD COLUMN current_license_id text;
ALTER TABLE license_plans ADD COLUMN closed_at timestamptz;
