-- Where each projection of this service stands in the event stream. Written in the same
-- transaction as the read-model rows an event changes, so a redelivered event changes nothing.
CREATE TABLE projection_checkpoints (
    projection text PRIMARY KEY,
    last_seq bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Events a projection could not apply. The projection stops at the first one and waits for an
-- operator's decision (`iotistic parked skip|retry`), because applying later events over a gap
-- would leave read models that no replay reproduces.
CREATE TABLE parked_events (
    projection text NOT NULL,
    seq bigint NOT NULL,
    subject text NOT NULL,
    event_type text,
    event_id text,
    payload bytea NOT NULL,
    error text NOT NULL,
    attempts integer NOT NULL,
    parked_at timestamptz NOT NULL DEFAULT now(),
    decision text CHECK (decision IN ('skip', 'retry')),
    decided_at timestamptz,
    resolved_at timestamptz,
    PRIMARY KEY (projection, seq)
);

CREATE INDEX parked_events_open ON parked_events (projection) WHERE resolved_at IS NULL;
