-- Integrations: the customer's own systems, each told (signed POSTs) about the readings stored
-- and the events of the kinds it subscribed to, from its creation on, and sent backfills of
-- past readings on request. Each keeps its own position in what it is sent.
--
-- Positions are (xid, id): the writing transaction's id, then the row's. Rows become visible in
-- the order their transactions commit, not in the order of their ids, so a reader that moved
-- past id 11 could miss an id 10 committed after it. A row whose xid is below the oldest
-- transaction still running (pg_snapshot_xmin) can no longer change or appear, so the sender
-- reads only those, in (xid, id) order, and nothing committed late is skipped.
CREATE TABLE integrations (
    integration_id text PRIMARY KEY,
    name text NOT NULL,
    url text NOT NULL,
    kinds text[] NOT NULL,
    -- Signs every POST; shown once, in the answer to the creation (or the change that made it).
    secret text NOT NULL,
    created_at timestamptz NOT NULL,
    deleted_at timestamptz,
    -- Where the live delivery stands: the last event and the last reading sent.
    events_xid xid8 NOT NULL,
    events_id bigint NOT NULL DEFAULT 0,
    readings_xid xid8 NOT NULL,
    readings_id bigint NOT NULL DEFAULT 0,
    readings_n bigint NOT NULL DEFAULT 0,
    -- Failed attempts in a row, when the next is due, and what went wrong last.
    failures integer NOT NULL DEFAULT 0,
    next_at timestamptz NOT NULL,
    last_error text,
    failing_since timestamptz,
    delivered_at timestamptz
);

CREATE UNIQUE INDEX integrations_name_active ON integrations (name) WHERE deleted_at IS NULL;

ALTER TABLE integration_events ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX integration_events_position ON integration_events (xid, id);

-- The readings each ingest statement stored, by key, while an integration takes readings:
-- written by a trigger in the statement's own transaction, so a reading stored is a reading
-- sent, whatever restarts in between; an instance without such an integration writes nothing
-- here. Rows every integration has passed are deleted, and so are rows older than the backlog
-- an integration may keep (days; what it missed is still there to backfill).
CREATE TABLE reading_batches (
    id bigserial PRIMARY KEY,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    stored_at timestamptz NOT NULL DEFAULT now(),
    device_ids text[] NOT NULL,
    times timestamptz[] NOT NULL
);
CREATE INDEX reading_batches_position ON reading_batches (xid, id);

CREATE FUNCTION note_readings_for_integrations() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM integrations WHERE deleted_at IS NULL AND 'readings' = ANY (kinds)
    ) THEN
        INSERT INTO reading_batches (device_ids, times)
        SELECT array_agg(device_id ORDER BY device_id, ts), array_agg(ts ORDER BY device_id, ts)
        FROM stored_readings
        HAVING count(*) > 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER readings_for_integrations
AFTER INSERT ON readings
REFERENCING NEW TABLE AS stored_readings
FOR EACH STATEMENT EXECUTE FUNCTION note_readings_for_integrations();
-- Enabled only while an integration takes readings (in the transaction that makes it so): the
-- rows a trigger with a transition table sees are gathered even when it writes nothing.
ALTER TABLE readings DISABLE TRIGGER readings_for_integrations;

-- Past readings replayed to an integration on request, one at a time per integration, at a
-- bounded rate, from a cursor kept here (device, then time) so a restart resumes it.
CREATE TABLE integration_backfills (
    backfill_id text PRIMARY KEY,
    integration_id text NOT NULL REFERENCES integrations (integration_id),
    from_ts timestamptz NOT NULL,
    to_ts timestamptz NOT NULL,
    rate integer NOT NULL,
    state text NOT NULL,  -- queued | running | done | cancelled
    created_at timestamptz NOT NULL,
    started_at timestamptz,
    finished_at timestamptz,
    total bigint,
    done bigint NOT NULL DEFAULT 0,
    cursor_device text,
    cursor_ts timestamptz,
    failures integer NOT NULL DEFAULT 0,
    next_at timestamptz NOT NULL,
    last_error text,
    progressed_at timestamptz
);

CREATE INDEX integration_backfills_of ON integration_backfills (integration_id, created_at);
