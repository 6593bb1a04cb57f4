-- Events this service's reactors decided, written in the same transaction as the reactor's
-- checkpoint and appended to the log by the outbox relay (libs/outbox.py). A redelivered
-- event finds its checkpoint and writes nothing; the effect reaches the log once, however
-- long after the cause, not only within JetStream's duplicate window.
CREATE TABLE outbox (
    id bigserial PRIMARY KEY,
    event_id text NOT NULL UNIQUE,
    subject_key text NOT NULL,
    envelope bytea NOT NULL
);
