-- Archives restored into this instance (``POST /api/import``): one row per archive, written in
-- the import's own transaction, so a retry of an import that succeeded (its answer lost) finds
-- it here instead of importing twice, and one that failed finds nothing and runs again.
CREATE TABLE imports (
    archive_sha256 text PRIMARY KEY,
    imported_at timestamptz NOT NULL,
    from_customer_id text,
    counts jsonb NOT NULL,
    -- The archive's device ids and the new ones they were given here.
    device_ids jsonb NOT NULL
);
