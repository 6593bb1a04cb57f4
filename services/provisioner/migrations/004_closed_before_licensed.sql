-- A customer who closed their account before any license reached the provisioner is kept as a
-- row without a license, marked closed, so that a license arriving later deploys nothing.
ALTER TABLE customer_licenses
    ALTER COLUMN license_id DROP NOT NULL,
    ALTER COLUMN plan DROP NOT NULL,
    ALTER COLUMN jwt DROP NOT NULL,
    ALTER COLUMN max_devices DROP NOT NULL;
